"""verify looks inside the network: corresponding modules compared one by one, the first that diverges
named; differences a known numerical cause explains reported with it; forward figures when the round
trip cannot be checked."""

from __future__ import annotations

import json

import pytest
import torch

import weightport as wp
from weightport.cli import main as cli
from weightport.mapping.verify import pairs, verify

_TINY = "conftest:TinyNet"
# the two blocks exchanged: shapes agree, numbers do not
_SWAP = wp.Mapping(
    [wp.rename("blocks.0.0.{p}", "blocks.1.0.{p}"), wp.rename("blocks.1.0.{p}", "blocks.0.0.{p}")], name="swap"
)


def test_the_first_diverging_module_is_named_with_its_input_and_output_differences():
    result = verify(_SWAP, source=_TINY, target=_TINY, input_size=(3, 8, 8))
    assert not result.ok()
    assert [m.source for m in result.modules] == ["conv1", "bn1", "blocks.0.0", "blocks.1.0", "fc"]
    first = result.first_divergence
    assert first is not None and (first.source, first.target) == ("blocks.0.0", "blocks.1.0")
    assert first.output_diff > 1e-3 and first.input_diff is not None and first.input_diff > 1e-3
    assert all(m.ok and m.output_diff == 0 for m in result.modules[:2])  # conv1 and bn1 agree


def test_a_right_mapping_compares_every_corresponding_module():
    result = verify(wp.Mapping([], name="identity"), source=_TINY, target=_TINY, input_size=(3, 8, 8))
    assert result.ok() and result.first_divergence is None
    assert len(result.modules) == 5 and all(m.output_diff == 0 and m.input_diff == 0 for m in result.modules)


def test_json_gives_the_per_module_table(tmp_path, capsys):
    path = tmp_path / "swap.toml"
    path.write_text(
        'name = "swap"\nsource = "conftest:TinyNet"\ntarget = "conftest:TinyNet"\n'
        '[[rule]]\nrename = "blocks.0.0.{p}"\nto = "blocks.1.0.{p}"\n'
        '[[rule]]\nrename = "blocks.1.0.{p}"\nto = "blocks.0.0.{p}"\n'
    )
    assert cli(["verify", str(path), "--input-size", "3,8,8", "--json"]) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["first_divergence"]["source"] == "blocks.0.0" and row["first_divergence"]["target"] == "blocks.1.0"
    assert {"source", "target", "input_diff", "output_diff", "scale", "ok"} <= set(row["modules"][0])
    assert cli(["verify", str(path), "--input-size", "3,8,8"]) == 1
    assert "first diverging module: blocks.0.0 -> blocks.1.0: output diff" in capsys.readouterr().out


def _efficientnet_swap() -> wp.Mapping:
    """The shipped mapping with the stem BatchNorm bias and a squeeze-excite bias (both 32 values) swapped."""
    m = wp.load_mapping("torchvision.efficientnet->timm.efficientnet")
    stem, se = "features.0.1.bias", "features.1.0.block.1.fc2.bias"
    to_stem, to_se = m.resolve(stem).outputs[0].target, m.resolve(se).outputs[0].target
    assert (to_stem, to_se) == ("bn1.bias", "blocks.0.0.se.conv_expand.bias")
    return wp.Mapping([wp.rename(stem, to_se), wp.rename(se, to_stem), *m.rules], name="swapped")


def test_a_bias_swap_deep_in_efficientnet_fails_though_the_final_outputs_agree():
    pair = {"source": "torchvision:efficientnet_b0", "target": "timm:efficientnet_b0", "batch": 1}
    right = verify("torchvision.efficientnet->timm.efficientnet", input_size=(3, 64, 64), **pair)
    assert right.ok() and right.max_abs_diff == 0 and len(right.modules) > 100
    wrong = verify(_efficientnet_swap(), input_size=(3, 64, 64), **pair)
    assert wrong.max_abs_diff is not None and wrong.max_abs_diff < 1e-4  # the final output hides the swap
    assert not wrong.ok()
    first = wrong.first_divergence
    assert first is not None and (first.source, first.target) == ("features.0.1", "bn1")
    assert first.input_diff == 0 and first.output_diff > 0.1


def test_norm_eps_that_differ_explain_the_difference_and_the_mapping_passes(capsys):
    name = "torchvision.mobilenetv3_small->timm.mobilenetv3_small"
    assert cli(["verify", name, "--source", "torchvision:mobilenet_v3_small", "--input-size", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok")
    assert "explained by BatchNorm2d eps 0.001 (source) vs 1e-05 (target) on 34 modules" in out
    pair = {"source": "torchvision:mobilenet_v3_small", "target": "timm:mobilenetv3_small_100"}
    result = verify(name, input_size=(3, 32, 32), **pair)
    assert result.max_abs_diff is not None and result.max_abs_diff > result.atol  # the eps difference shows
    assert result.explained_diff is not None and result.explained_diff < 1e-6 and result.ok()


def test_a_real_error_is_not_explained_away_by_an_eps_difference():
    m = wp.load_mapping("torchvision.mobilenetv3_small->timm.mobilenetv3_small")
    swapped = wp.Mapping(
        [wp.rename("features.0.1.bias", "blocks.0.0.bn1.bias"), wp.rename("features.1.block.0.1.bias", "bn1.bias")]
        + list(m.rules),
        name="swapped",
    )
    pair = {"source": "torchvision:mobilenet_v3_small", "target": "timm:mobilenetv3_small_100"}
    result = verify(swapped, input_size=(3, 32, 32), **pair)
    assert not result.ok() and result.cause is None
    assert result.first_divergence is not None and result.first_divergence.source == "features.0.1"


def test_a_mapping_file_carries_its_tolerance_and_atol_overrides_it(tmp_path, capsys):
    path = tmp_path / "swap.toml"
    path.write_text(
        'name = "swap"\nsource = "conftest:TinyNet"\ntarget = "conftest:TinyNet"\natol = 1000.0\n'
        '[[rule]]\nrename = "blocks.0.0.{p}"\nto = "blocks.1.0.{p}"\n'
        '[[rule]]\nrename = "blocks.1.0.{p}"\nto = "blocks.0.0.{p}"\n'
    )
    assert cli(["verify", str(path), "--input-size", "3,8,8", "-v"]) == 0
    assert "accepted up to 1000 (--atol)" in capsys.readouterr().out
    assert cli(["verify", str(path), "--input-size", "3,8,8", "--atol", "1e-4"]) == 1


class _CollidingInverse(wp.Mapping):
    """Ports fine, but its inverse makes two tensors write one name."""

    def inverse(self) -> wp.Mapping:
        return wp.Mapping([wp.rename("blocks.1.0.{p}", "blocks.0.0.{p}")])


def test_forward_figures_come_back_when_the_round_trip_cannot_be_checked(capsys):
    result = verify(_CollidingInverse([], name="one-way"), source=_TINY, target=_TINY, input_size=(3, 8, 8))
    assert result.max_abs_diff == 0 and result.ok()
    assert result.round_trip is None and result.round_trip_note is not None
    assert "two source tensors write 'blocks.0.0.weight'" in result.round_trip_note
    regex = wp.Mapping([wp.rename(r"re:^fc\.(?P<p>\w+)$", "fc.{p}")], name="regex")
    result = verify(regex, source=_TINY, target=_TINY, input_size=(3, 8, 8))
    assert result.ok() and result.round_trip is None and "does not invert" in (result.round_trip_note or "")


@pytest.mark.parametrize("seed", [0, 1])
def test_module_activations_are_sampled_within_a_bound(seed, monkeypatch):
    from weightport.mapping import _activations

    monkeypatch.setattr(_activations, "MAX_ELEMENTS", 7)
    monkeypatch.setattr(_activations, "MAX_MODULES", 3)
    right = verify(wp.Mapping([], name="identity"), source=_TINY, target=_TINY, input_size=(3, 8, 8), seed=seed)
    assert right.ok() and len(right.modules) == 3
    kept = _activations._keep(torch.arange(2 * 8 * 4 * 4.0).reshape(2, 8, 4, 4))
    assert kept.values.numel() <= 7 and kept.shape == (2, 8, 4, 4)


def test_transformers_modules_renamed_in_memory_still_pair():
    name = "hf.vit->timm.vit"
    result = verify(name, source=pairs(wp.load_mapping(name))[0][0], target=pairs(wp.load_mapping(name))[0][1])
    found = {(m.source, m.target) for m in result.modules}
    # the checkpoint says vit.encoder.layer.0.output.dense; transformers holds it as vit.layers.0.mlp.fc2
    assert ("vit.layers.0.mlp.fc2", "blocks.0.mlp.fc2") in found and len(found) == 13 and result.ok()
