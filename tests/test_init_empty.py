"""weightport.init_empty and what a transfer makes of a meta-built model: nothing left on meta
(outside ``into=`` included), constructor-computed buffers real, fresh tensors initialised as an
eager build initialises them (torchvision, timm and transformers each by their own init)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightport as wp
from weightport.errors import PlanError


def _no_meta(model: nn.Module) -> bool:
    return not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


class _Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def test_into_leaves_nothing_on_meta_and_reports_what_it_initialised_outside(caplog):
    source = _Detector().backbone.state_dict()
    with wp.init_empty():
        model = _Detector()
    report = wp.transfer(source, model, into="backbone")
    assert _no_meta(model)
    assert report.outside == ("head.1.weight", "head.1.bias")
    assert any("outside into='backbone'" in w and "head.1.weight, head.1.bias" in w for w in report.warnings)
    assert report.to_dict()["outside"] == ["head.1.weight", "head.1.bias"]
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 4)  # the first forward works
    assert model.head[1].weight.std() > 0  # initialised as nn.Linear initialises, not zeros


def test_plan_of_an_into_transfer_changes_nothing_until_applied():
    with wp.init_empty():
        model = _Detector()
    plan = wp.plan(_Detector().backbone.state_dict(), model, into="backbone")
    assert model.head[1].weight.is_meta and plan.report.outside == ("head.1.weight", "head.1.bias")
    plan.apply()
    assert _no_meta(model)


@pytest.mark.slow
def test_timm_swin_built_on_meta_gets_its_attention_masks_and_equals_an_eager_build():
    timm = pytest.importorskip("timm")
    kw = dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=3)
    eager = timm.create_model("swin_tiny_patch4_window7_224", **kw).eval()
    with wp.init_empty():
        model = timm.create_model("swin_tiny_patch4_window7_224", **kw).eval()
    assert any(b.is_meta for b in model.buffers())  # attn_mask is computed from a meta parameter's device
    wp.transfer(eager.state_dict(), model, strict=True)
    assert _no_meta(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))


def test_a_buffer_no_method_can_compute_is_refused_naming_it_and_the_fix():
    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.rope = Rotary()

    with torch.device("meta"):
        model = Net()
    with pytest.raises(PlanError, match=r"rope.inv_freq.*\(Rotary\) has no method that computes them.*init_empty"):
        wp.plan(Net().state_dict(), model)

    class Masked(nn.Module):  # computes its buffer from a parameter's device, with no method to redo it
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("mask", torch.ones(2, device=self.fc.weight.device), persistent=False)

    with wp.init_empty():
        model = Masked()
    with pytest.raises(PlanError, match=r"'mask'|mask.*build this model normally \(without init_empty\)"):
        wp.plan(Masked().state_dict(), model)


def _stats(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().float()
    return float(t.mean()), float(t.std())


def _like_eager(fresh: torch.Tensor, eager: torch.Tensor) -> None:
    """The same initialisation: zeros stay zeros, otherwise equal mean and std (new draws)."""
    if not eager.any():
        assert not fresh.any()
        return
    (m1, s1), (m2, s2) = _stats(fresh), _stats(eager)
    assert s1 == pytest.approx(s2, rel=0.1) and m1 == pytest.approx(m2, abs=6 * s2 / fresh.numel() ** 0.5 + 1e-6)


def _fresh_head_like_eager(build, head: list[str]) -> None:
    torch.manual_seed(0)
    eager = build()
    backbone = {k: v for k, v in eager.state_dict().items() if k not in head}
    with wp.init_empty():
        model = build()
    report = wp.transfer(backbone, model)
    assert sorted(e.target for e in report.fresh) == sorted(head)
    for name in head:
        _like_eager(model.get_parameter(name), eager.get_parameter(name))


def test_fresh_torchvision_head_is_initialised_as_torchvision_does():
    torchvision = pytest.importorskip("torchvision")
    # torchvision's ViT zero-initialises its head in the constructor (reset_parameters would not)
    _fresh_head_like_eager(
        lambda: torchvision.models.VisionTransformer(32, 16, 1, 2, 32, 64, num_classes=500),
        ["heads.head.weight", "heads.head.bias"],
    )
    # its ResNet kaiming-normal-initialises convolutions in a loop over modules
    _fresh_head_like_eager(lambda: torchvision.models.resnet18(num_classes=10), ["conv1.weight"])


def test_fresh_timm_head_is_initialised_as_timm_does():
    timm = pytest.importorskip("timm")
    # timm's ViT: trunc_normal(std=.02) and zero bias; reset_parameters would give std ~0.07
    _fresh_head_like_eager(
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=64, num_heads=2, num_classes=1000
        ),
        ["head.weight", "head.bias"],
    )


@pytest.mark.slow
def test_fresh_transformers_classifier_and_vocabulary_rows_follow_init_weights():
    transformers = pytest.importorskip("transformers")
    sizes = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, num_labels=500)
    cfg = transformers.BertConfig(vocab_size=3000, **sizes)
    build = lambda: transformers.BertForSequenceClassification(cfg)  # noqa: E731
    _fresh_head_like_eager(build, ["classifier.weight", "classifier.bias"])  # std 0.02, zero bias

    small = transformers.BertForSequenceClassification(transformers.BertConfig(**{**cfg.to_dict(), "vocab_size": 1000}))
    with wp.init_empty():
        model = build()
    wp.transfer(small.state_dict(), model, adapters=["vocab"])
    table = model.bert.embeddings.word_embeddings.weight
    assert torch.equal(table[:1000], small.bert.embeddings.word_embeddings.weight)
    assert _stats(table[1000:])[1] == pytest.approx(cfg.initializer_range, rel=0.1)  # not nn.Embedding's 1.0


def test_recorded_init_follows_views_aliases_and_constructed_values():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8, padding_idx=3)  # normal_(), then row 3 zeroed through a view
            self.gamma = nn.Parameter(1e-5 * torch.ones(8))  # LayerScale: a value given at construction
            self.proj = nn.Linear(8, 8)
            self.proj.weight.data.fill_(0.5)  # through .data
            with torch.no_grad():
                self.proj.bias[:4] = 2.0  # part of a tensor

    with wp.init_empty():
        model = Custom()
    wp.transfer({"other": torch.zeros(1)}, model, allow_empty=True)
    assert not model.embed.weight[3].any() and model.embed.weight[4].std() > 0
    assert torch.equal(model.gamma, torch.full((8,), 1e-5))
    assert torch.equal(model.proj.weight, torch.full((8, 8), 0.5))
    assert torch.equal(model.proj.bias[:4], torch.full((4,), 2.0))


def test_a_meta_built_model_stays_picklable_and_loads_in_place():
    import copy
    import pickle

    with wp.init_empty():
        model = nn.Linear(4, 4)
    copy.deepcopy(model)
    weight = model.weight
    wp.transfer({"weight": torch.ones(4, 4)}, model)
    assert model.weight is weight  # the record left no weak reference that blocks the in-place swap
    pickle.loads(pickle.dumps(model))


def test_recomputing_a_buffer_leaves_the_model_untouched_until_the_commit():
    class Block(nn.Module):  # reset_parameters re-draws its weight and computes its mask from its device
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.reset_parameters()

        def reset_parameters(self) -> None:
            self.fc.reset_parameters()
            self.register_buffer("mask", torch.ones(4, device=self.fc.weight.device), persistent=False)

    eager = Block()
    with wp.init_empty():
        model = Block()
    plan = wp.plan(eager.state_dict(), model)
    assert model.mask.is_meta
    plan.apply()
    assert torch.equal(model.fc.weight, eager.fc.weight)  # loaded, not re-drawn by the recomputation
    assert torch.equal(model.mask, torch.ones(4)) and _no_meta(model)
