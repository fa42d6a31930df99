"""Model facts in op parameters: the expression language, where facts are found, and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport.errors import MappingError, OptionError
from weightport.mapping import facts
from weightport.planning.facts import model_facts

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("text", "value"),
    [("$heads", 8), ("$heads * $head_dim", 128), ("$heads // $kv_heads", 4), ("($heads + 2) * 3 - 1", 29)],
)
def test_a_fact_expression_evaluates_on_the_facts(text, value):
    assert facts.bind(text, {"heads": 8, "kv_heads": 2, "head_dim": 16}) == value


@pytest.mark.parametrize("text", ["$heads * heads", "$", "$a.b", "$a ** 2", "$a / 2", "$a + 1.5", "$__import__(1)"])
def test_a_malformed_fact_is_refused_where_the_rule_is_written(text):
    with pytest.raises(MappingError, match="rope_permute"):
        wp.rename("a", "b", ops=[("rope_permute", {"heads": text})])


def test_a_rule_lists_and_binds_its_facts():
    rule = wp.split("qkv.{p}", ["q.{p}", "k.{p}", "v.{p}"], sizes=["$heads * $head_dim", 32, 32], groups="$kv_heads")
    assert rule.facts() == {"heads", "head_dim", "kv_heads"}
    bound = rule.bind({"heads": 4, "head_dim": 16, "kv_heads": 2})
    assert bound.sizes == (64, 32, 32) and bound.groups == 2 and bound.facts() == frozenset()
    plain = wp.rename("a", "b")
    assert plain.bind({"heads": 1}) is plain


class Attention(nn.Module):
    """Attention attributes the way torchtune names them."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = 4, 2, 8
        self.q = nn.Linear(32, 32, bias=False)
        self.k = nn.Linear(32, 16, bias=False)


class TuneLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 32)
        self.attn = Attention()


def test_facts_come_from_a_models_attention_modules_and_embedding():
    assert model_facts(TuneLike()) == {"heads": 4, "kv_heads": 2, "head_dim": 8, "vocab": 50, "hidden": 32}


def test_facts_come_from_a_transformers_config():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    assert model_facts(model) == {"heads": 6, "kv_heads": 2, "head_dim": 8, "hidden": 48, "vocab": 64}


def _k_rule():
    return wp.rename("attn.k.weight", "attn.k.weight", ops=[("rope_permute", {"heads": "$kv_heads"})])


def _permuted(k: torch.Tensor, heads: int) -> torch.Tensor:
    return wp.mapping.OpCall("rope_permute", {"heads": heads}).run(k)


def test_a_fact_from_the_target_model_parametrises_the_op():
    src = TuneLike().state_dict()
    model = TuneLike()
    report = wp.transfer(src, model, rules=[_k_rule()])
    assert torch.equal(model.attn.k.weight.detach(), _permuted(src["attn.k.weight"], 2))
    (entry,) = [e for e in report.entries if e.target == "attn.k.weight"]
    assert entry.ops == ("rope_permute(heads=2, ->interleaved)",)


def test_the_facts_option_overrides_the_model():
    src = TuneLike().state_dict()
    model = TuneLike()
    wp.transfer(src, model, rules=[_k_rule()], facts={"kv_heads": 1})
    assert torch.equal(model.attn.k.weight.detach(), _permuted(src["attn.k.weight"], 1))


class Bare(nn.Module):
    """States no fact: no config, no attention attributes, no embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.k = nn.Linear(32, 16, bias=False)


@pytest.mark.parametrize("name", ["config.json", "params.json"])
def test_a_fact_comes_from_the_sources_config_file(tmp_path, name):
    src = {"attn.k.weight": torch.randn(16, 32)}
    save_file(src, tmp_path / "model.safetensors")
    config = (
        {"num_attention_heads": 4, "num_key_value_heads": 2}
        if name == "config.json"
        else {"n_heads": 4, "n_kv_heads": 2}
    )
    (tmp_path / name).write_text(json.dumps({"dim": 32, **config}))
    model = Bare()
    wp.transfer(tmp_path / "model.safetensors", model, rules=[_k_rule()])
    assert torch.equal(model.attn.k.weight.detach(), _permuted(src["attn.k.weight"], 2))


def test_a_fact_nobody_states_names_the_fact_and_the_fix():
    model = Bare()
    before = model.attn.k.weight.detach().clone()
    with pytest.raises(MappingError, match=r"'kv_heads'.*facts=\{'kv_heads': N\}"):
        wp.transfer({"attn.k.weight": torch.randn(16, 32)}, model, rules=[_k_rule()])
    assert torch.equal(model.attn.k.weight, before)


def test_target_and_source_disagreeing_on_a_fact_is_an_error(tmp_path):
    save_file({"attn.k.weight": torch.randn(16, 32)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 4}))
    with pytest.raises(MappingError, match=r"'kv_heads' is 2 in the target model but 4 in the source's config.json"):
        wp.transfer(tmp_path / "model.safetensors", TuneLike(), rules=[_k_rule()], allow_empty=True)


@pytest.mark.parametrize("bad", [{"heads": 0}, {"heads": "4"}, {"heads": True}, {"no way": 2}, [("heads", 2)]])
def test_bad_facts_are_refused_before_anything_is_read(bad):
    with pytest.raises(OptionError, match="facts"):
        wp.transfer("does-not-exist.safetensors", TuneLike(), facts=bad)


def test_a_mapping_file_names_facts_in_ops_sizes_and_groups(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(
        """
name = "x->y"
[[rule]]
split = "qkv.{p}"
to = ["q.{p}", "k.{p}", "v.{p}"]
sizes = ["$heads * $head_dim", "$kv_heads * $head_dim", "$kv_heads * $head_dim"]
groups = "$kv_heads"
[[rule]]
rename = "k.{p}"
to = "kk.{p}"
ops = [{op = "rope_permute", heads = "$kv_heads"}]
"""
    )
    mapping = wp.load_mapping(path)
    assert mapping.facts() == {"heads", "head_dim", "kv_heads"}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nsplit = "a"\nto = ["b", "c"]\ngroups = "$kv heads"\n')
    with pytest.raises(MappingError, match=r"bad.toml rule 1 \(split\).*groups"):
        wp.load_mapping(bad)


def test_the_cli_passes_facts(tmp_path, capsys):
    from weightport import cli

    save_file({"attn.k.weight": torch.randn(16, 32)}, tmp_path / "w.safetensors")
    mapping = tmp_path / "m.toml"
    mapping.write_text(
        '[[rule]]\nrename = "attn.k.weight"\nto = "attn.k.weight"\nops = [{op = "rope_permute", heads = "$kv_heads"}]\n'
    )
    (tmp_path / "bare.py").write_text(
        "from torch import nn\n\ndef make():\n    m = nn.Module()\n    m.attn = nn.Module()\n"
        "    m.attn.k = nn.Linear(32, 16, bias=False)\n    return m\n"
    )
    args = ["port", str(tmp_path / "w.safetensors"), "bare:make", "--mapping", str(mapping), "--dry-run"]
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        assert cli.main(args) == 2
        assert "--fact kv_heads=N" in capsys.readouterr().err
        assert cli.main([*args, "--fact", "kv_heads=2"]) == 0
        assert cli.main([*args, "--fact", "kv_heads=two"]) == 2
        assert "NAME=N" in capsys.readouterr().err
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("bare", None)
