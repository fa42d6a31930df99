"""Name patterns, rule builders, the mapping engine (its rule index too) and inverses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport.errors import MappingError, PatternError, WeightportError
from weightport.mapping.pattern import Pattern


def _target(mapping: wp.Mapping, key: str) -> str | None:
    res = mapping.resolve(key)
    return None if res.dropped else res.outputs[0].target


@pytest.mark.parametrize(
    ("pattern", "key", "captures"),
    [
        ("blocks.{i}.attn.{p}", "blocks.3.attn.weight", {"i": "3", "p": "weight"}),
        ("blocks.{i}.attn.{p}", "blocks.3.attn.qkv.weight", None),  # {p} is one segment
        ("blocks.{rest*}", "blocks.3.attn.qkv.weight", {"rest": "3.attn.qkv.weight"}),
        ("layer{n}_{m}.w", "layer1_2.w", {"n": "1", "m": "2"}),
        ("*.weight", "fc.weight", {}),
        ("*.weight", "a.fc.weight", None),
        ("**.weight", "a.fc.weight", {}),
        ("a.{x}.{x}", "a.b.b", {"x": "b"}),
        ("a.{x}.{x}", "a.b.c", None),
        ("fc.weight", "fc.weight", {}),
        ("fc.weight", "fc.weightx", None),  # anchored to the whole key
        ("fc.weight", "xfc.weight", None),
        ("re:^enc\\.(?P<i>\\d+)\\.w$", "enc.12.w", {"i": "12"}),
        ("{{literal}}.{p}", "{literal}.w", {"p": "w"}),
    ],
)
def test_pattern_matching(pattern, key, captures):
    assert Pattern(pattern).match(key) == captures


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("a.{b", "never closed"),
        ("a.b}", "unmatched"),
        ("a.{1x}", "not a placeholder"),
        ("a.{i+1}", "offsets belong in templates"),
        ("", "non-empty"),
        ("re:(", "invalid regular expression"),
    ],
)
def test_pattern_syntax_errors(pattern, message):
    with pytest.raises(PatternError, match=message):
        Pattern(pattern)


def test_offsets_shift_integer_captures_and_only_match_integers():
    m = wp.Mapping([wp.rename("layer{i}.{p*}", "stages.{i-1}.{p}")])
    assert _target(m, "layer1.0.conv.weight") == "stages.0.0.conv.weight"
    assert _target(m, "layerX.0.conv.weight") == "layerX.0.conv.weight"  # no match: keeps its name
    up = wp.Mapping([wp.rename("blocks.{i}.w", "b.{i+10}.w")])
    assert _target(up, "blocks.5.w") == "b.15.w"
    with pytest.raises(MappingError, match="gives -1"):
        wp.Mapping([wp.rename("l{i}.w", "l{i-1}.w")]).resolve("l0.w")


def test_template_placeholder_not_captured_fails_at_construction():
    with pytest.raises(MappingError, match=r"uses \{q\}.*does not capture"):
        wp.rename("blocks.{i}.w", "b.{q}.w")
    with pytest.raises(PatternError, match="cannot contain"):
        wp.rename("blocks.*.w", "b.*.w")


def test_builders_validate_their_arguments():
    with pytest.raises(MappingError, match="at least two"):
        wp.split("qkv.{p}", ["q.{p}"])
    with pytest.raises(MappingError, match="sizes"):
        wp.split("qkv.{p}", ["q.{p}", "kv.{p}"], sizes=[1])
    with pytest.raises(MappingError, match="at least two"):
        wp.fuse(["q.{p}"], "qkv.{p}")
    with pytest.raises(MappingError, match="unknown op 'nope'"):
        wp.transform("a", "b", "nope")
    with pytest.raises(MappingError, match="no parameter 'dims0'"):
        wp.transform("a", "b", "transpose", dims0=1)
    with pytest.raises(MappingError, match="prefix"):
        wp.strip_prefix("")
    with pytest.raises(MappingError, match="rules"):
        wp.Mapping(["not a rule"])  # type: ignore[list-item]


def test_first_matching_rule_decides_and_unmatched_keys_keep_their_name():
    m = wp.Mapping(
        [
            wp.drop("head.**"),
            wp.rename("head.fc.{p}", "never.{p}"),  # shadowed by the drop above
            wp.rename("backbone.{rest*}", "{rest}"),
            wp.rename("{rest*}", "other.{rest}"),
        ]
    )
    assert m.resolve("head.fc.weight").dropped
    assert _target(m, "backbone.conv.weight") == "conv.weight"
    assert _target(m, "neck.w") == "other.neck.w"
    assert _target(wp.Mapping(), "x.y") == "x.y"


def test_strip_and_add_prefix():
    m = wp.Mapping([wp.strip_prefix("model.encoder.")])
    assert _target(m, "model.encoder.layer.0.w") == "layer.0.w"
    assert _target(m, "model.decoder.w") == "model.decoder.w"
    assert _target(wp.Mapping([wp.add_prefix("backbone.")]), "conv.w") == "backbone.conv.w"


def test_split_and_fuse_outputs():
    s = wp.Mapping([wp.split("blocks.{i}.qkv.{p}", ["b.{i}.q.{p}", "b.{i}.k.{p}", "b.{i}.v.{p}"])])
    outs = s.resolve("blocks.2.qkv.weight").outputs
    assert [o.target for o in outs] == ["b.2.q.weight", "b.2.k.weight", "b.2.v.weight"]
    assert [o.ops[0].label() for o in outs] == ["split[1/3]", "split[2/3]", "split[3/3]"]
    f = wp.Mapping([wp.fuse(["l.{i}.q.{p}", "l.{i}.k.{p}", "l.{i}.v.{p}"], "b.{i}.qkv.{p}")])
    out = f.resolve("l.4.k.bias").outputs[0]
    assert (out.target, out.part) == ("b.4.qkv.bias", (1, 3))


def test_inverse_of_renames_splits_fuses_and_transposes():
    m = wp.Mapping(
        [
            wp.rename("encoder.layers.encoder_layer_{i}.ln_{n}.{p}", "blocks.{i}.norm{n}.{p}"),
            wp.rename("layer{i}.{rest*}", "stages.{i-1}.{rest}"),
            wp.split("x.{i}.qkv.{p}", ["a.{i}.q.{p}", "a.{i}.k.{p}", "a.{i}.v.{p}"]),
            wp.transform("proj.weight", "out.weight", "transpose"),
            wp.drop("heads.pre_logits.**"),
        ]
    )
    inv = m.inverse()
    assert _target(inv, "blocks.3.norm1.weight") == "encoder.layers.encoder_layer_3.ln_1.weight"
    assert _target(inv, "stages.0.conv.weight") == "layer1.conv.weight"
    out = inv.resolve("a.7.k.weight").outputs[0]
    assert (out.target, out.part) == ("x.7.qkv.weight", (1, 3))
    t = inv.resolve("out.weight")
    assert t.outputs[0].target == "proj.weight" and t.outputs[0].ops[0].label() == "transpose(0,1)"
    assert len(inv) == 4  # the drop has nothing to undo


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (lambda: wp.rename("a.*.w", "b.w"), "anonymous wildcards"),
        (lambda: wp.rename("re:a(?P<x>.)", "b{x}"), "anonymous wildcards and 're:'"),
        (lambda: wp.rename("a.{i}.{j}", "b.{i}"), r"drops \{j\}"),
        (lambda: wp.transform("a", "b", "select", index=[0]), "no inverse"),
    ],
)
def test_non_invertible_rules_are_named(rule, message):
    with pytest.raises(MappingError, match=message):
        wp.Mapping([rule()]).inverse()


def test_many_keys_and_rules_resolve_fast_enough():
    rules = [wp.rename(f"model.layers.{{i}}.block{j}.{{p}}", f"blocks.{{i}}.b{j}.{{p}}") for j in range(200)]
    m = wp.Mapping(rules)
    keys = [f"model.layers.{i % 50}.block{i % 200}.weight" for i in range(100_000)]
    targets = [m.resolve(k).outputs[0].target for k in keys]
    assert targets[12345] == "blocks.45.b145.weight"


# -- properties --------------------------------------------------------------------------------------

segment = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
index = st.integers(0, 999).map(str)


@settings(max_examples=200, deadline=None)
@given(prefix=segment, i=index, rest=st.lists(segment, min_size=1, max_size=3), shift=st.integers(0, 3))
def test_rename_then_inverse_gives_back_the_original(prefix, i, rest, shift):
    m = wp.Mapping([wp.rename(f"{prefix}.{{i}}.{{rest*}}", f"out.{{i+{shift}}}.x.{{rest}}")])
    key = f"{prefix}.{i}.{'.'.join(rest)}"
    forward = _target(m, key)
    assert forward == f"out.{int(i) + shift}.x.{'.'.join(rest)}"
    assert _target(m.inverse(), forward) == key


@settings(max_examples=200, deadline=None)
@given(
    pattern=st.text(alphabet="ab.{}*+-1i_ ", max_size=12),
    template=st.text(alphabet="ab.{}*+-1i_", max_size=12),
    key=st.text(alphabet="ab.1_", max_size=12),
)
def test_random_rules_raise_only_weightport_errors(pattern, template, key):
    try:
        m = wp.Mapping([wp.rename(pattern, template)])
        m.resolve(key)
        m.inverse().resolve(key)
    except WeightportError:
        pass


# -- the rule index, and planning many keys with many rules -------------------------------------


def test_rule_index_keeps_first_match_order_across_index_kinds():
    rules = [
        wp.strip_prefix("model."),  # variable length, indexed by its first segment
        wp.rename("model.layers.{i}.w", "fixed.{i}"),  # fixed skeleton, later: must lose
        wp.drop("**.inv_freq"),  # truly variable: tried for every key
        wp.rename("other.{rest*}", "o.{rest}"),
    ]
    m = wp.Mapping(rules)
    assert m.resolve("model.layers.3.w").outputs[0].target == "layers.3.w"
    assert m.resolve("other.a.b").outputs[0].target == "o.a.b"
    assert m.resolve("x.rotary.inv_freq").dropped
    assert m.resolve("model.rotary.inv_freq").outputs[0].target == "rotary.inv_freq"  # first rule wins
    assert m.resolve("modelx.a").rule is None  # a head is a whole segment, not a prefix
    reordered = wp.Mapping([rules[1], rules[0]])
    assert reordered.resolve("model.layers.3.w").outputs[0].target == "fixed.3"


def test_planning_many_keys_with_many_rules_is_exact(tmp_path):
    layers, experts, projs = 10, 25, 4  # 1000 keys: the same shape as the 100k benchmark case
    state = {
        f"model.layers.{i}.mlp.experts.{e}.proj_{p}.weight": torch.zeros(2)
        for i in range(layers)
        for e in range(experts)
        for p in range(projs)
    }
    state["lm_head.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "many.safetensors")
    rules = [wp.rename(f"model.layers.{{i}}.attn.head_{k}.{{p}}", f"blocks.{{i}}.h{k}.{{p}}") for k in range(190)]
    rules += [
        wp.rename(f"model.layers.{{i}}.mlp.experts.{{e}}.proj_{p}.weight", f"b.{{i}}.{{e}}.w{p}") for p in range(4)
    ]
    rules += [wp.drop("lm_head.*"), wp.strip_prefix("model.")]

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for p in range(projs):
                self.register_parameter(f"w{p}", nn.Parameter(torch.ones(2)))

    model = nn.Module()
    model.b = nn.ModuleList(nn.ModuleList(Expert() for _ in range(experts)) for _ in range(layers))
    plan = wp.plan(tmp_path / "many.safetensors", model, rules=rules, strict=True)
    assert len(plan.recipes) == layers * experts * projs and plan.report.dropped == ("lm_head.weight",)
    assert plan.recipes["b.3.7.w2"].inputs[0].key == "model.layers.3.mlp.experts.7.proj_2.weight"
    assert "b.3.7.w2" in plan.recipes and "b.3.7.w9" not in plan.recipes
    # the plain lane's recipes and report rows are made on demand: planning and the summary make neither
    assert plan.report.entries._all is None
    assert "1000 loaded" in plan.summary() and plan.report.entries._all is None
    assert plan.report["b.3.7.w2"].sources == ("model.layers.3.mlp.experts.7.proj_2.weight",)
    plan.apply()
    assert all(float(p.detach().sum()) == 0.0 for p in model.parameters())
