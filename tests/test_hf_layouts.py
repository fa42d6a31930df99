"""Checkpoints of transformers models in either layout: the classic names ``save_pretrained`` writes
(and the hub holds) and the transformers 5 module names, loaded into transformers 5 classes with
transformers' own conversion mapping (weightport.mapping.hf_conversion)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn

import weightport as wp

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.conversion_mapping", reason="transformers >= 5 converts checkpoint layouts")

CLASSIC = "layout: classic (converted with transformers' conversion mapping for"


def _keys(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def _vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    model = transformers.ViTModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # every tensor distinct: a swapped or missed one shows
            p.copy_(torch.randn_like(p))
    return model


def _assert_same(source: nn.Module, target: nn.Module) -> None:
    want, got = source.state_dict(), target.state_dict()
    assert list(want) == list(got)
    for name, value in want.items():
        assert torch.equal(value, got[name]), name


def test_save_pretrained_writes_the_classic_layout_and_the_model_uses_the_new_names(tmp_path):
    model = _vit(0)
    model.save_pretrained(tmp_path / "classic")
    model.save_pretrained(tmp_path / "new", save_original_format=False)
    assert "layers.0.attention.q_proj.weight" in model.state_dict()
    assert "encoder.layer.0.attention.attention.query.weight" in _keys(tmp_path / "classic")
    assert "layers.0.attention.q_proj.weight" in _keys(tmp_path / "new")


@pytest.mark.parametrize("original_format", [True, False], ids=["classic", "transformers5"])
def test_vit_folder_of_either_layout_loads_bit_exact_with_output_parity(tmp_path, original_format):
    source = _vit(0)
    source.save_pretrained(tmp_path, save_original_format=original_format)
    target = _vit(1)
    report = wp.transfer(tmp_path, target, strict=True)
    _assert_same(source, target)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(pixels).last_hidden_state, target(pixels).last_hidden_state)
    summary = report.summary()
    if original_format:
        assert f"{CLASSIC} 'vit', transformers {transformers.__version__}: 32 tensors)" in summary
        assert report["layers.1.mlp.fc2.weight"].sources == ("encoder.layer.1.output.dense.weight",)
        assert "transformers' conversion mapping for 'vit'" in (report["layers.1.mlp.fc2.weight"].rule or "")
    else:
        assert "layout: transformers 5 (the model's own names; transformers' conversion mapping for 'vit'" in summary
    assert "layout:" in " ".join(report.to_dict()["source"]["notes"])


def test_classic_vit_loads_like_from_pretrained(tmp_path):
    _vit(0).save_pretrained(tmp_path)
    reference = transformers.ViTModel.from_pretrained(tmp_path)
    target = _vit(1)
    wp.transfer(tmp_path, target, strict=True)
    _assert_same(reference, target)


def _dinov2(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        use_swiglu_ffn=True,
    )
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def test_dinov2_classic_fused_swiglu_is_split_with_transformers_chunk(tmp_path):
    source = _dinov2(0)
    source.save_pretrained(tmp_path)
    assert "encoder.layer.0.mlp.weights_in.weight" in _keys(tmp_path)  # fused gate and up, classic layout
    target = _dinov2(1)
    report = wp.transfer(tmp_path, target, strict=True)
    _assert_same(source, target)
    _assert_same(transformers.Dinov2Model.from_pretrained(tmp_path), target)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(pixels).last_hidden_state, target(pixels).last_hidden_state)
    entry = report["encoder.layer.0.mlp.up_proj.weight"]
    assert entry.sources == ("encoder.layer.0.mlp.weights_in.weight",)
    assert entry.ops == ("split[2/2]",)
    assert f"{CLASSIC} 'dinov2'" in report.summary()


def _moe(family: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if family == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            num_experts_per_tok=2,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(
    ("family", "expert", "gate_up"),
    [
        ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w2.weight", "reshape(4, 96, 32)"),
        ("qwen2_moe", "model.layers.0.mlp.experts.3.down_proj.weight", "reshape(4, 48, 32)"),
    ],
)
def test_moe_per_expert_weights_are_stacked_and_fused_like_transformers(tmp_path, family, expert, gate_up):
    source = _moe(family, 0)
    source.save_pretrained(tmp_path)
    assert expert in _keys(tmp_path)  # one tensor per expert, classic layout
    target = _moe(family, 1)
    report = wp.transfer(tmp_path, target, strict=True)
    _assert_same(source, target)
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(source(tokens).logits, target(tokens).logits)
    assert report["model.layers.1.mlp.experts.gate_up_proj"].ops == ("fuse[8]", gate_up)
    down = report["model.layers.1.mlp.experts.down_proj"]
    assert down.ops == ("unsqueeze(0)", "fuse[4]")
    assert f"stack '{expert.replace('layers.0', 'layers.{i}').replace('.3.', '.{e}.')}' over {{e}}" in down.rule
    assert f"{CLASSIC} {family!r}" in report.summary()


def test_a_converter_without_an_exact_weightport_equivalent_is_named_in_a_warning(tmp_path, monkeypatch):
    source = _vit(0)
    source.save_pretrained(tmp_path)
    conversion_mapping = importlib.import_module("transformers.conversion_mapping")
    loading = importlib.import_module("transformers.core_model_loading")
    vit = conversion_mapping.get_checkpoint_conversion_mapping("ViTModel")  # also builds transformers' cache
    odd = loading.WeightConverter("pooler.odd.weight", "pooler.dense.weight", operations=[loading.Interleave(dim=0)])
    monkeypatch.setitem(conversion_mapping._checkpoint_conversion_mapping_cache, "ViTModel", [*vit, odd])
    state = dict(wp.open_source(tmp_path).items())
    state["pooler.odd.weight"] = state.pop("pooler.dense.weight")
    report = wp.transfer(state, _vit(1))
    assert report["pooler.dense.weight"].status == "fresh"
    assert report["layers.1.mlp.fc2.weight"].status == "loaded"
    (warning,) = [w for w in report.warnings if "Interleave" in w]
    assert "pooler.dense.weight" in warning and "cannot express exactly" in warning


def test_without_transformers_conversion_mapping_the_report_says_why_names_stay(tmp_path, monkeypatch):
    _vit(0).save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)  # transformers 4 has none
    report = wp.transfer(tmp_path, _vit(1))
    assert report.counts()["loaded"] == 8
    (warning,) = [w for w in report.warnings if "conversion mapping" in w]
    assert "transformers >= 5" in warning and "'vit'" in warning
    assert "layout: unknown" in report.summary()


def test_without_transformers_conversion_mapping_own_names_load_quietly(tmp_path, monkeypatch):
    _vit(0).save_pretrained(tmp_path, save_original_format=False)
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)
    report = wp.transfer(tmp_path, _vit(1), strict=True)
    assert "layout:" not in report.summary()


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([nn.Linear(2, 2)])})


def test_a_model_outside_transformers_gets_no_conversion(tmp_path):
    source = {"encoder.layer.0.weight": torch.ones(2, 2), "encoder.layer.0.bias": torch.ones(2)}
    report = wp.transfer(source, _Plain(), strict=True)
    assert "layout:" not in report.summary()


def test_the_users_rules_come_before_transformers_conversion(tmp_path):
    source = _vit(0)
    source.save_pretrained(tmp_path)
    rule = wp.drop("encoder.layer.1.output.dense.*")
    report = wp.transfer(tmp_path, _vit(1), rules=[rule])
    assert report["layers.1.mlp.fc2.weight"].status == "fresh"
    assert report["layers.0.mlp.fc2.weight"].status == "loaded"
    assert not [w for w in report.warnings if "matched no source tensor" in w]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vit"


def test_a_task_model_folder_loads_into_its_base_model_and_into_a_submodule(tmp_path):
    config = _vit(0).config
    config.num_labels = 3
    torch.manual_seed(0)
    task = transformers.ViTForImageClassification(config)
    task.save_pretrained(tmp_path / "task")  # classic names under 'vit.'
    base = _vit(1)
    report = wp.transfer(tmp_path / "task", base)  # transformers drops the base model prefix too
    assert report["layers.0.attention.q_proj.weight"].sources == (
        "vit.encoder.layer.0.attention.attention.query.weight",
    )
    assert torch.equal(base.state_dict()["layers.0.mlp.fc1.weight"], task.state_dict()["vit.layers.0.mlp.fc1.weight"])
    other = transformers.ViTForImageClassification(config)
    _vit(2).save_pretrained(tmp_path / "base")
    report = wp.transfer(tmp_path / "base", other, into="vit")
    assert report["layers.1.mlp.fc2.weight"].status == "loaded"
    assert CLASSIC in report.summary()


def test_rules_are_generalised_over_layers_only_where_that_names_every_key_as_transformers_does():
    from weightport.mapping.hf_conversion import _rules, _Step

    steps = [_Step("rename", (f"enc.{i}.query.w",), (f"layers.{i}.q.w",)) for i in (0, 1)]
    (general,) = _rules(steps, ["enc.0.query.w", "enc.1.query.w"], "t")
    assert general.described() == "t: 'enc.{i}.query.w' -> 'layers.{i}.q.w'"
    # a key transformers leaves alone that the general rule would rename: one exact rule per key
    exact = _rules(steps, ["enc.0.query.w", "enc.1.query.w", "enc.2.query.w"], "t")
    assert [r.described() for r in exact] == [
        "t: 'enc.0.query.w' -> 'layers.0.q.w'",
        "t: 'enc.1.query.w' -> 'layers.1.q.w'",
    ]


@pytest.mark.slow  # a fresh interpreter importing torch and transformers
def test_a_transfer_into_another_model_imports_nothing_of_transformers_modeling():
    code = (
        "import sys, torch, transformers, weightport as wp\n"
        "wp.transfer({'weight': torch.ones(2, 2), 'bias': torch.ones(2)}, torch.nn.Linear(2, 2), strict=True)\n"
        "print('transformers.modeling_utils' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
