"""`weightport suggest`: mappings proposed from names and shapes, proven by output parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import weightport as wp
from weightport.cli import main as cli
from weightport.mapping.suggest import suggest

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _randomise_buffers(model: nn.Module) -> nn.Module:
    """BatchNorm statistics are identical at init; make them differ so a mispaired buffer shows in outputs."""
    g = torch.Generator().manual_seed(1)
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.copy_(torch.rand(b.shape, generator=g) + 0.5 if name.endswith("running_var") else torch.randn(b.shape))
    return model


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64).eval()


def _timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2).eval()


def _same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


def test_vit_torchvision_to_timm_is_a_handful_of_general_rules_and_exact():
    src, tgt = _tv_vit(), _timm_vit()
    found = suggest(src, tgt)
    assert not found.unmatched_targets and not found.unmatched_sources
    assert len(found.rules) <= 12  # one rule per kind of tensor, not one per layer
    assert {"rename": "encoder.layers.encoder_layer_{a}.ln_{b}.{p}", "to": "blocks.{a}.norm{b}.{p}"} in found.rules
    report = wp.transfer(src, tgt, mapping=found.mapping(), strict=True)
    assert report.coverage == 1.0
    _same_outputs(src, tgt, (2, 3, 32, 32))


def test_file_sources_with_sorted_names_pair_the_same(tmp_path):
    """A safetensors file lists names sorted, so tensor order carries no signal there."""
    src, tgt = _tv_vit(), _timm_vit()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    found = suggest(str(path), tgt)
    assert len(found.rules) <= 12
    wp.transfer(str(path), tgt, mapping=found.mapping(), strict=True)
    _same_outputs(src, tgt, (1, 3, 32, 32))


def test_efficientnet_pairs_every_batchnorm_statistic():
    torch.manual_seed(0)
    src = _randomise_buffers(torchvision.models.efficientnet_b0()).eval()
    tgt = timm.create_model("efficientnet_b0").eval()
    found = suggest(src, tgt)
    wp.transfer(src, tgt, mapping=found.mapping(), strict=True)
    _same_outputs(src, tgt, (1, 3, 64, 64))


def test_equal_element_counts_become_reshape_transforms():
    """torchvision ConvNeXt keeps layer scale as (C, 1, 1), timm as (C,)."""
    torch.manual_seed(0)
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    setting = [
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 64, 1),
        CNBlockConfig(64, 128, 2),
        CNBlockConfig(128, None, 1),
    ]
    src = ConvNeXt(setting).eval()
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("layer_scale"):
                p.normal_()
    tgt = timm.create_model("convnext_tiny", dims=(16, 32, 64, 128), depths=(1, 1, 2, 1)).eval()
    found = suggest(src, tgt)
    assert any(r.get("op") == "reshape" and "layer_scale" in r["transform"] for r in found.rules)
    report = wp.transfer(src, tgt, mapping=found.mapping(), strict=True)
    assert len([e for e in report.loaded if e.ops]) == 5  # one layer scale per block, reshaped exactly
    _same_outputs(src, tgt, (1, 3, 64, 64))


class _Separate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({n: nn.Linear(8, 8) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}) for _ in range(2)
        )


class _Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(8, 24), "proj": nn.Linear(8, 8)}) for _ in range(2))


def test_siblings_that_concatenate_become_fuse_and_split_rules():
    sep, fused = _Separate(), _Fused()
    forward = suggest(sep, fused)
    assert {
        "fuse": ["layers.{a}.q_proj.{p}", "layers.{a}.k_proj.{p}", "layers.{a}.v_proj.{p}"],
        "to": "blocks.{a}.qkv.{p}",
    } in forward.rules
    wp.transfer(sep, fused, mapping=forward.mapping(), strict=True)
    for i in range(2):
        parts = [sep.layers[i][n].weight for n in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(fused.blocks[i]["qkv"].weight, torch.cat(parts))
        assert torch.equal(fused.blocks[i]["proj"].weight, sep.layers[i]["o_proj"].weight)

    back = suggest(fused, _Separate())
    assert any("split" in r for r in back.rules)
    again = _Separate()
    wp.transfer(fused, again, mapping=back.mapping(), strict=True)
    for a, b in zip(again.state_dict().values(), sep.state_dict().values()):
        assert torch.equal(a, b)


def test_what_cannot_be_paired_is_listed_not_guessed():
    src = {"body.weight": (4, 4), "extra.weight": (7,)}
    tgt = {"trunk.weight": (4, 4), "new_head.weight": (3, 4)}
    found = suggest(src, tgt)
    assert found.pairs == {"trunk.weight": ("body.weight",)}
    assert found.unmatched_targets == ["new_head.weight"]
    assert found.unmatched_sources == ["extra.weight"]
    text = found.to_toml(name="mine")
    assert "#   new_head.weight" in text and "#   extra.weight" in text


def test_suggested_rules_send_every_paired_key_where_the_pairing_says():
    """General rules that would catch a key meant elsewhere get a literal rule in front."""
    src = {f"enc.{i}.w": (4,) for i in range(3)} | {"enc.9.w": (5,)}
    tgt = {f"dec.{i}.w": (4,) for i in range(3)} | {"other.w": (5,)}
    found = suggest(src, tgt)
    mapping = found.mapping()
    for t, (s,) in found.pairs.items():
        assert [o.target for o in mapping.resolve(s).outputs] == [t]


def test_cli_writes_a_mapping_file_that_ports(tmp_path, capsys):
    src = _tv_vit()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    target = (
        "timm.models.vision_transformer:VisionTransformer"
        "(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2)"
    )
    out = tmp_path / "mine.toml"
    assert cli(["suggest", str(path), target, "-o", str(out), "--name", "tv->timm"]) == 0
    err = capsys.readouterr().err
    assert "coverage 100.00%" in err
    mapping = wp.load_mapping(out)
    assert mapping.name == "tv->timm" and mapping.target == target
    assert cli(["port", str(path), target, "--mapping", str(out), "--strict", "--dry-run"]) == 0


def test_cli_prints_the_mapping_without_out(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"body.weight": torch.zeros(4, 4)}, str(path))
    assert cli(["suggest", str(path), "torch.nn:Linear(4, 4)"]) == 0
    out = capsys.readouterr().out
    assert 'rename = "body.weight"' in out and 'to = "weight"' in out


def test_cli_bad_target_is_exit_2(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    assert cli(["suggest", str(path), "no.such.module:Thing"]) == 2
    assert "no.such.module" in capsys.readouterr().err
