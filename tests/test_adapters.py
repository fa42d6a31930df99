"""Shape adapters: equal to timm's own functions, chosen by on_mismatch='adapt', nameable in rules."""

from __future__ import annotations

import pytest
import torch
import torchvision
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv
from torch import nn

import weightport as wp
from weightport.errors import OpError
from weightport.mapping.ops import OpCall


def _run(op: str, x: torch.Tensor, target: torch.Tensor, **params) -> torch.Tensor:
    return OpCall.make(op, params, "test").run(x, target)


# -- in_channels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 4, 6, 13])
@pytest.mark.parametrize("source_channels", [3, 1, 4])
def test_in_channels_equals_timm_adapt_input_conv(channels, source_channels):
    torch.manual_seed(channels)
    w = torch.randn(8, source_channels, 3, 3)
    got = _run("in_channels", w, torch.empty(8, channels, 3, 3))
    want = adapt_input_conv(channels, w.clone(), base_chans=source_channels)
    assert got.shape == (8, channels, 3, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_in_channels_keeps_half_precision_and_works_on_meta():
    w = torch.randn(4, 3, 7, 7, dtype=torch.float16)
    got = _run("in_channels", w, torch.empty(4, 1, 7, 7))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, adapt_input_conv(1, w.clone()), rtol=0, atol=0)
    meta = _run("in_channels", w.to("meta"), torch.empty(4, 13, 7, 7, device="meta"))
    assert meta.is_meta and meta.shape == (4, 13, 7, 7)


def test_in_channels_explicit_maps_rgb_to_bgr_and_zero_or_init_new_channels():
    w = torch.randn(5, 3, 3, 3)
    bgr = _run("in_channels", w, torch.empty(5, 3, 3, 3), map=[2, 1, 0])
    assert torch.equal(bgr, w.flip(1))
    rgbd = _run("in_channels", w, torch.empty(5, 4, 3, 3), map=[0, 1, 2, -1])
    assert torch.equal(rgbd[:, :3], w) and torch.equal(rgbd[:, 3], torch.zeros(5, 3, 3))
    init = torch.full((5, 4, 3, 3), 7.0)
    kept = _run("in_channels", w, init, map=[0, 1, 2, -1], fill="init")
    assert torch.equal(kept[:, :3], w) and torch.equal(kept[:, 3], init[:, 3])


def test_rgb_plus_zero_depth_channel_leaves_rgb_outputs_unchanged():
    torch.manual_seed(0)
    rgb = nn.Conv2d(3, 4, 3)
    rgbd = nn.Conv2d(4, 4, 3)
    wp.transfer(rgb, rgbd, rules=[wp.transform("weight", "weight", "in_channels", map=[0, 1, 2, -1])])
    x = torch.randn(2, 3, 8, 8)
    depth = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(rgbd(torch.cat([x, depth], 1)), rgb(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"map": [0, 1, 5]}, "not source channels"),
        ({"map": [0, 1]}, "2 entries for 3"),
        ({"source_channels": 4}, "source_channels=4"),
        ({"fill": "noise"}, "fill must be"),
    ],
)
def test_in_channels_bad_parameters_name_the_problem(params, message):
    with pytest.raises(OpError, match=message):
        _run("in_channels", torch.randn(2, 3, 3, 3), torch.empty(2, 3, 3, 3), **params)


# -- pos_embed ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "prefix"),
    [((14, 14), (24, 24), 1), ((24, 24), (14, 14), 1), ((7, 7), (5, 9), 1), ((4, 6), (8, 3), 0), ((6, 6), (9, 9), 5)],
)
def test_pos_embed_equals_timm_resample_abs_pos_embed(old, new, prefix):
    torch.manual_seed(0)
    x = torch.randn(1, old[0] * old[1] + prefix, 16)
    target = torch.empty(1, new[0] * new[1] + prefix, 16)
    got = _run("pos_embed", x, target, old_size=list(old), new_size=list(new), num_prefix_tokens=prefix)
    want = resample_abs_pos_embed(x, list(new), list(old), num_prefix_tokens=prefix)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got[:, :prefix], x[:, :prefix])  # class/register tokens kept as they are


def test_pos_embed_infers_square_grids_and_prefix_tokens():
    x = torch.randn(1, 197, 8)
    got = _run("pos_embed", x, torch.empty(1, 577, 8))
    torch.testing.assert_close(got, resample_abs_pos_embed(x, [24, 24], num_prefix_tokens=1), rtol=0, atol=0)
    flat = _run("pos_embed", x[0], torch.empty(577, 8))  # (tokens, dim) as in CLIP
    torch.testing.assert_close(flat, got[0], rtol=0, atol=0)
    with pytest.raises(OpError, match="cannot infer"):
        _run("pos_embed", torch.randn(1, 200, 8), torch.empty(1, 577, 8), num_prefix_tokens=1)


def test_pos_embed_nhwc_grid():
    x = torch.randn(1, 4, 4, 8)
    got = _run("pos_embed", x, torch.empty(1, 6, 6, 8))
    want = nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(6, 6), mode="bicubic", antialias=True)
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1), rtol=0, atol=0)


# -- patch_embed --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), [((16, 16), (8, 8)), ((8, 8), (16, 16)), ((4, 4), (6, 3))])
def test_patch_embed_equals_timm_resample_patch_embed(old, new):
    torch.manual_seed(0)
    w = torch.randn(12, 3, *old)
    got = _run("patch_embed", w, torch.empty(12, 3, *new))
    torch.testing.assert_close(got, resample_patch_embed(w, list(new)), rtol=0, atol=0)


def test_patch_embed_flexivit_property_holds_on_upsampled_patches():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    big = _run("patch_embed", w, torch.empty(4, 3, 8, 8))
    patch = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    up = nn.functional.interpolate(patch, size=(8, 8), mode="bicubic", antialias=True)
    torch.testing.assert_close((up * big).sum((1, 2, 3)), (patch * w).sum((1, 2, 3)), rtol=1e-4, atol=1e-4)


# -- head and vocab -----------------------------------------------------------------------------------


def test_head_keeps_first_rows_or_chosen_rows_and_target_init_elsewhere():
    x = torch.arange(12.0).reshape(6, 2)
    init = torch.full((4, 2), -1.0)
    first = _run("head", x, init)
    assert torch.equal(first, x[:4])
    grown = _run("head", x, torch.full((8, 2), -1.0))
    assert torch.equal(grown[:6], x) and torch.equal(grown[6:], torch.full((2, 2), -1.0))
    chosen = _run("head", x, init, index=[5, -1, 0])
    assert torch.equal(chosen, torch.tensor([[10.0, 11.0], [-1, -1], [0, 1], [-1, -1]]))
    bias = _run("head", torch.arange(6.0), torch.zeros(3), index=[4, 2, 0])
    assert torch.equal(bias, torch.tensor([4.0, 2.0, 0.0]))
    with pytest.raises(OpError, match="index must list"):
        _run("head", x, init, index=[9])


def test_vocab_keeps_overlapping_rows():
    x = torch.randn(10, 4)
    init = torch.zeros(12, 4)
    out = _run("vocab", x, init)
    assert torch.equal(out[:10], x) and torch.equal(out[10:], init[10:])
    assert torch.equal(_run("vocab", x, torch.zeros(7, 4)), x[:7])


# -- chosen by on_mismatch="adapt" ---------------------------------------------------------------------


class _Classifier(nn.Module):
    def __init__(self, in_chans: int = 3, classes: int = 10, vocab: int = 20) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 4, 3)
        self.mid = nn.Conv2d(4, 4, 3)
        self.embed = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, classes)


def test_adapt_keeps_meaning_and_leaves_a_resized_head_and_vocabulary_fresh():
    src = _Classifier()
    dst = _Classifier(in_chans=1, classes=5, vocab=24)
    head_before, embed_before = dst.head.weight.clone(), dst.embed.weight.clone()
    report = wp.transfer(src, dst, on_mismatch="adapt")
    assert {e.target: e.ops for e in report.adapted} == {"stem.weight": ("in_channels 3->1",)}
    fresh = {e.target: e.reason for e in report.fresh}
    assert fresh == {"head.weight": "shape mismatch", "head.bias": "shape mismatch", "embed.weight": "shape mismatch"}
    assert torch.equal(dst.head.weight, head_before) and torch.equal(dst.embed.weight, embed_before)
    assert report.coverage < 1.0
    assert set(wp.list_adapters(auto=True)) == {"in_channels", "pos_embed", "patch_embed"}


def test_head_and_vocab_adapt_when_asked_by_option_or_class_index_map():
    torch.manual_seed(0)
    src = _Classifier()
    dst = _Classifier(classes=3)
    report = wp.transfer(src, dst, adapters={"head": {"index": [7, -1, 2]}})  # on_mismatch stays "skip"
    assert report["head.weight"].status == "adapted" and report["head.weight"].ops == ("head 10->3 index[3]",)
    assert torch.equal(dst.head.weight[0], src.head.weight[7]) and torch.equal(dst.head.weight[2], src.head.weight[2])
    with pytest.raises(wp.errors.OptionError, match="'haed' is not a shape adapter; did you mean 'head'"):
        wp.transfer(src, dst, adapters=["haed"])


def test_adapt_picks_each_adapter_and_reports_it():
    torch.manual_seed(0)
    src = _Classifier()
    dst = _Classifier(in_chans=1, classes=5, vocab=24)
    report = wp.transfer(src, dst, on_mismatch="adapt", adapters=["head", "vocab"])
    ops = {e.target: e.ops for e in report.adapted}
    assert ops == {
        "stem.weight": ("in_channels 3->1",),
        "head.weight": ("head 10->5",),
        "head.bias": ("head 10->5",),
        "embed.weight": ("vocab 20->24",),
    }
    assert torch.equal(dst.stem.weight, src.stem.weight.sum(1, keepdim=True))
    assert torch.equal(dst.head.weight, src.head.weight[:5])
    assert torch.equal(dst.embed.weight[:20], src.embed.weight)


def test_adapt_leaves_what_no_adapter_fits_to_the_policy():
    src = _Classifier()
    dst = _Classifier()
    dst.mid = nn.Conv2d(4, 4, 5)  # a changed kernel in the middle of a network is not a patch embedding
    dst.head = nn.Sequential(nn.Linear(4, 3))  # not named like a classifier: head.0 still is (head)
    report = wp.transfer(src, dst, on_mismatch="adapt")
    assert report["mid.weight"].status == "fresh" and report["mid.weight"].reason == "shape mismatch"
    with pytest.raises(wp.errors.ShapeMismatchError, match="mid.weight"):
        wp.transfer(src, _with_mid(5), on_mismatch="error")


def _with_mid(k: int) -> _Classifier:
    m = _Classifier()
    m.mid = nn.Conv2d(4, 4, k)
    return m


def test_a_middle_conv_with_many_channels_is_not_taken_for_an_input_layer():
    src = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 8, 1))
    dst = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 8, 1))
    report = wp.transfer(src, dst, on_mismatch="adapt")
    assert report["1.weight"].status == "fresh"


def test_failed_adapted_transfer_leaves_the_model_unchanged():
    from tests.conftest import digest

    src = _Classifier()
    dst = _Classifier(in_chans=1)
    before = digest(dst)

    def broken(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(OpError, match="boom"):  # the stem adapts first, then the head's op fails
        wp.transfer(src, dst, rules=[wp.transform("head.weight", "head.weight", broken)], on_mismatch="adapt")
    assert digest(dst) == before


# -- the acceptance scenario -------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 4])
def test_torchvision_resnet50_to_1_and_4_channels_equals_timm(channels):
    torch.manual_seed(0)
    src = torchvision.models.resnet50()
    with wp.init_empty():
        dst = torchvision.models.resnet50()
        dst.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    report = wp.transfer(src, dst, on_mismatch="adapt", strict=True)
    assert [(e.target, e.ops) for e in report.adapted] == [("conv1.weight", (f"in_channels 3->{channels}",))]
    want = adapt_input_conv(channels, src.conv1.weight.detach().clone())
    torch.testing.assert_close(dst.conv1.weight, want, rtol=0, atol=0)
    assert torch.equal(dst.layer4[2].conv3.weight, src.layer4[2].conv3.weight)


@pytest.mark.slow
def test_vit_b_16_at_224_to_384_equals_timm():
    torch.manual_seed(0)
    src = torchvision.models.vit_b_16()
    with wp.init_empty():
        dst = torchvision.models.vit_b_16(image_size=384)
    report = wp.transfer(src, dst, on_mismatch="adapt", strict=True)
    assert [(e.target, e.ops) for e in report.adapted] == [("encoder.pos_embedding", ("pos_embed 14x14->24x24 +1",))]
    want = resample_abs_pos_embed(src.encoder.pos_embedding.detach(), [24, 24], num_prefix_tokens=1)
    torch.testing.assert_close(dst.encoder.pos_embedding, want, rtol=0, atol=0)
    assert torch.equal(dst.encoder.layers[11].mlp[3].weight, src.encoder.layers[11].mlp[3].weight)


@pytest.mark.slow
def test_torchvision_vit_b_16_into_timm_at_384_with_the_shipped_mapping():
    import timm

    torch.manual_seed(0)
    src = torchvision.models.vit_b_16()
    with wp.init_empty():
        dst = timm.create_model("vit_base_patch16_384")
    report = wp.transfer(src, dst, mapping="torchvision.vit->timm.vit", on_mismatch="adapt", strict=True)
    assert [(e.target, e.ops) for e in report.adapted] == [("pos_embed", ("pos_embed 14x14->24x24 +1",))]
    want = resample_abs_pos_embed(src.encoder.pos_embedding.detach(), [24, 24], num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed, want, rtol=0, atol=0)


def test_non_square_target_grid_comes_from_the_model():
    import timm

    src = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    with wp.init_empty():
        dst = timm.create_model("vit_tiny_patch16_224", img_size=(48, 64), num_classes=0)
    report = wp.transfer(src, dst, on_mismatch="adapt", strict=True)
    assert report["pos_embed"].ops == ("pos_embed 2x2->3x4 +1",)
    want = resample_abs_pos_embed(src.pos_embed.detach(), [3, 4], num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed, want, rtol=0, atol=0)
