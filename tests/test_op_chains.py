"""Op chains on every rule kind: rename, transform, split outputs and fuse inputs, in Python and
in mapping files; their inverses, and the report's listing of the whole chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import weightport as wp
from weightport.errors import MappingError
from weightport.mapping.files import parse_mapping
from weightport.mapping.rules import Fuse, Split
from weightport.mapping.verify import map_state_dict

C = 8
QKV = ["attn.{i}.q.weight", "attn.{i}.k.weight", "attn.{i}.v.weight"]


def _gpt2(seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=C, n_layer=1, n_head=2, n_positions=16, vocab_size=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


class SeparateQKV(nn.Module):
    """One attention block's q, k and v as ``nn.Linear`` (weights (out, in))."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleList([nn.ModuleDict({n: nn.Linear(C, C, bias=False) for n in "qkv"})])


def test_split_then_transpose_turns_gpt2_conv1d_c_attn_into_linear_weights_and_back() -> None:
    state = _gpt2(0).state_dict()
    c_attn = state["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (C, 3 * C)  # Conv1D: (in, out)
    mapping = wp.Mapping([wp.split("transformer.h.{i}.attn.c_attn.weight", QKV, dim=1, ops=["transpose"])])
    model = SeparateQKV()
    report = wp.transfer(state, model, mapping=mapping, strict=False)
    for n, name in enumerate("qkv"):
        assert torch.equal(model.attn[0][name].weight, c_attn[:, n * C : (n + 1) * C].T)
    assert report["attn.0.q.weight"].ops == ("split[1/3]", "transpose(0,1)")
    assert report["attn.0.q.weight"].status == "loaded"

    back = _gpt2(1)
    report = wp.transfer(model, back, mapping=mapping.inverse(), strict=False)
    assert torch.equal(back.transformer.h[0].attn.c_attn.weight, c_attn)
    assert report["transformer.h.0.attn.c_attn.weight"].ops == ("transpose(0,1)", "fuse[3]")


def test_fuse_applies_its_ops_to_each_input_and_its_inverse_splits_then_undoes_them() -> None:
    torch.manual_seed(0)
    parts = {f"p{n}.weight": torch.randn(3, 2) for n in range(3)}
    rule = wp.fuse(["p0.{x}", "p1.{x}", "p2.{x}"], "fused.{x}", dim=1, ops=["transpose", ("scale", {"factor": 2.0})])
    model = nn.Module()
    model.fused = nn.Linear(9, 2, bias=False)  # weight (2, 9): three (3, 2) parts, transposed, fused
    plan = wp.plan(parts, model, rules=[rule], strict=False)
    assert plan.report["fused.weight"].ops == ("transpose(0,1)", "scale(2.0)", "fuse[3]")
    plan.apply()
    want = torch.cat([2.0 * parts[f"p{n}.weight"].T for n in range(3)], dim=1)
    assert torch.equal(model.fused.weight.detach(), want)

    inverse = rule.inverse()
    assert isinstance(inverse, Split)
    assert [op.label() for op in inverse.ops] == ["scale(0.5)", "transpose(0,1)"]
    outs = inverse.outputs(0, {"x": "weight"})
    assert [o.target for o in outs] == ["p0.weight", "p1.weight", "p2.weight"]
    assert [op.label() for op in outs[1].ops] == ["split[2/3]", "scale(0.5)", "transpose(0,1)"]


def test_rename_and_transform_take_a_chain_whose_inverse_is_the_inverses_reversed() -> None:
    chain = ["transpose", {"op": "permute", "dims": [1, 0]}, ("scale", {"factor": 4.0})]
    for rule in (wp.rename("a.{x}", "b.{x}", ops=chain), wp.transform("a.{x}", "b.{x}", ops=chain)):
        assert [op.label() for op in rule.ops] == ["transpose(0,1)", "permute(1, 0)", "scale(4.0)"]
        inverse = rule.inverse()
        assert [op.label() for op in inverse.ops] == ["scale(0.25)", "permute(1, 0)", "transpose(0,1)"]
    x = torch.randn(2, 3)
    model = nn.Module()
    model.b = nn.Linear(2, 3, bias=False)
    wp.transfer({"a.weight": x}, model, rules=[wp.rename("a.{x}", "b.{x}", ops=chain[:1] + chain[2:])])
    assert torch.equal(model.b.weight.detach(), 4.0 * x.T)


def test_split_chain_inverts_through_the_mapping_and_a_chain_without_inverse_names_the_op() -> None:
    mapping = wp.Mapping([wp.split("w.{i}", ["a.{i}", "b.{i}"], dim=1, ops=["transpose", ("scale", {"factor": 2.0})])])
    fuse_back = mapping.inverse().rules[0]
    assert isinstance(fuse_back, Fuse) and fuse_back.dim == 1
    assert [op.label() for op in fuse_back.ops] == ["scale(0.5)", "transpose(0,1)"]
    with pytest.raises(MappingError, match=r"op pad\(0\) has no inverse"):
        wp.split("w", ["a", "b"], ops=["transpose", "pad"]).inverse()
    with pytest.raises(MappingError, match=r"op cast\(float16\) has no inverse"):
        wp.Mapping([wp.fuse(["a", "b"], "w", ops=[("cast", {"dtype": "float16"})])]).inverse()


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ("transpose", "must be a list of ops"),
        (["nope"], r"ops\[1\]: unknown op 'nope'"),
        ([("transpose", {"dim2": 1})], r"ops\[1\]: op 'transpose' has no parameter 'dim2'"),
        ([{"dims": [0]}], r"ops\[1\]: op must be a registered name"),
    ],
)
def test_a_bad_chain_is_refused_where_the_rule_is_built(ops: object, message: str) -> None:
    with pytest.raises(MappingError, match=message):
        wp.split("w", ["a", "b"], ops=ops)  # type: ignore[arg-type]
    with pytest.raises(MappingError, match=message):
        wp.fuse(["a", "b"], "w", ops=ops)  # type: ignore[arg-type]
    with pytest.raises(MappingError, match=message):
        wp.rename("a", "b", ops=ops)  # type: ignore[arg-type]


def test_transform_takes_one_op_or_a_chain_not_both() -> None:
    with pytest.raises(MappingError, match="either one op"):
        wp.transform("a", "b", "transpose", ops=["transpose"])
    with pytest.raises(MappingError, match="either one op"):
        wp.transform("a", "b")
    with pytest.raises(MappingError, match="is empty"):
        wp.transform("a", "b", ops=[])


def test_mapping_files_give_chains_on_rename_transform_split_and_fuse() -> None:
    rules = [
        {"rename": "r.{x}", "to": "R.{x}", "ops": ["transpose"]},
        {"transform": "t.{x}", "to": "T.{x}", "ops": [{"op": "reshape", "shape": [-1]}, "transpose"]},
        {"split": "s.{x}", "to": ["S1.{x}", "S2.{x}"], "dim": 1, "ops": ["transpose", {"op": "scale", "factor": 2.0}]},
        {"fuse": ["f1.{x}", "f2.{x}"], "to": "F.{x}", "ops": [{"op": "transpose", "dim0": 0, "dim1": 1}]},
    ]
    mapping = parse_mapping({"rule": rules}, "m.toml")
    assert [[op.label() for op in r.ops] for r in mapping.rules] == [
        ["transpose(0,1)"],
        ["reshape(-1,)", "transpose(0,1)"],
        ["transpose(0,1)", "scale(2.0)"],
        ["transpose(0,1)"],
    ]
    assert [op.label() for op in mapping.rules[2].outputs(0, {"x": "w"})[1].ops] == [
        "split[2/2]",
        "transpose(0,1)",
        "scale(2.0)",
    ]
    assert [op.label() for op in mapping.inverse().rules[2].ops] == ["scale(0.5)", "transpose(0,1)"]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"split": "s", "to": ["a", "b"], "ops": "transpose"}, "field 'ops' must be a list"),
        ({"fuse": ["a", "b"], "to": "f", "ops": [{"dims": [0]}]}, "field 'ops' must be a list"),
        ({"rename": "a", "to": "b", "ops": [{"op": "transpose", "dim2": 1}]}, "no parameter 'dim2'"),
        ({"transform": "a", "to": "b", "op": "transpose", "ops": ["transpose"]}, "either 'op'"),
        ({"transform": "a", "to": "b", "ops": ["nope"]}, "unknown op 'nope'"),
    ],
)
def test_a_bad_chain_in_a_mapping_file_names_the_file_and_rule(rule: dict[str, object], message: str) -> None:
    with pytest.raises(MappingError, match=rf"m\.toml rule 2 .*{message}"):
        parse_mapping({"rule": [{"drop": "x"}, rule]}, "m.toml")


def test_a_split_with_a_chain_takes_equal_parts_not_sizes_read_from_the_chains_output_shapes() -> None:
    # the targets' first dims (1, 1, 4) add up to the source's 6, but they are shapes after the
    # reshape: the parts themselves are equal (2, 2)
    source = {"w": torch.arange(12.0).reshape(6, 2)}
    model = nn.ParameterDict(
        {n: nn.Parameter(torch.zeros(s)) for n, s in (("a", (1, 4)), ("b", (1, 4)), ("c", (4, 1)))}
    )
    wp.transfer(source, model, rules=[wp.split("w", ["a", "b", "c"], ops=["reshape"])])
    assert torch.equal(model["c"].detach(), torch.arange(8.0, 12.0).reshape(4, 1))


def test_a_mapping_file_splits_gpt2_c_attn_with_a_chain_and_its_inverse_restores_it(tmp_path: Path) -> None:
    path = tmp_path / "gpt2-qkv.toml"
    path.write_text(
        'name = "gpt2.c_attn->qkv"\n'
        "[[rule]]\n"
        'split = "transformer.h.{i}.attn.c_attn.weight"\n'
        'to = ["attn.{i}.q.weight", "attn.{i}.k.weight", "attn.{i}.v.weight"]\n'
        "dim = 1\n"
        'ops = [{op = "transpose", dim0 = 1, dim1 = 0}]\n'
    )
    mapping = wp.load_mapping(path)
    state = {k: v for k, v in _gpt2(2).state_dict().items() if k.endswith("c_attn.weight")}
    qkv = map_state_dict(state, mapping)
    c_attn = state["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(qkv["attn.0.k.weight"], c_attn[:, C : 2 * C].T)
    back = map_state_dict(qkv, mapping.inverse())
    assert back.keys() == state.keys() and torch.equal(back["transformer.h.0.attn.c_attn.weight"], c_attn)
