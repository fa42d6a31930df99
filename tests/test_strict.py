"""Strictness as torch's ``load_state_dict(strict=True)`` has it: keys a target module's own loading
code consumes are used; ``require=`` patterns relative to ``into`` or absolute."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import weightport as wp
from weightport.errors import StrictnessError


def _frozen_resnet() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    source = resnet18(num_classes=10)
    return resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d), source.state_dict()


def test_strict_accepts_what_frozen_batchnorm_consumes_as_torch_does():
    ours, state = _frozen_resnet()
    theirs, _ = _frozen_resnet()
    assert not theirs.load_state_dict(state, strict=True).unexpected_keys  # torch's verdict

    report = wp.transfer(state, ours, strict=True)

    tracked = [k for k in state if k.endswith("num_batches_tracked")]
    assert sorted(report.consumed) == sorted(tracked) and report.unused == () and report.unexpected_keys == []
    assert report.consumed["layer1.0.bn1.num_batches_tracked"] == "consumed by FrozenBatchNorm2d 'layer1.0.bn1'"
    assert "used without a target of their own (20)" in report.summary()
    assert report.to_dict()["consumed"] == report.consumed
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_consumed_keys_are_found_under_into_too():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, state = _frozen_resnet()
            self.state = state

    model = Wrapper()
    report = wp.transfer(model.state, model, into="backbone", strict=True)
    assert "bn1.num_batches_tracked" in report.consumed


class _Legacy(nn.Linear):
    """Reads an old ``scale`` entry into its weight, as a module upgrading old checkpoints does."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        state_dict.pop(prefix + "scale", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def test_any_module_whose_loading_code_removes_a_key_consumes_it_not_only_frozen_batchnorm():
    model = nn.Sequential(_Legacy(2, 2))
    hooked = nn.Sequential(nn.Linear(2, 2))
    hooked[0]._register_load_state_dict_pre_hook(
        lambda state, prefix, *rest: state.pop(prefix + "old_bias", None)  # type: ignore[no-untyped-def]
    )
    state = {"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}

    for target, extra in ((model, "0.scale"), (hooked, "0.old_bias")):
        before = {k: v.clone() for k, v in target.state_dict().items()}
        plan = wp.plan({**state, extra: torch.ones(2)}, target, strict=True)
        assert list(plan.report.consumed) == [extra] and plan.report.unused == ()
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # planning changed nothing
        plan.apply()
        assert torch.equal(target[0].weight, torch.ones(2, 2))


def test_a_key_the_loading_code_keeps_stays_unused_and_strict_refuses_it_as_torch_does():
    state = {"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2), "0.other": torch.ones(2)}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        nn.Sequential(_Legacy(2, 2)).load_state_dict(state, strict=True)
    with pytest.raises(StrictnessError, match=r"source tensors not used: 0\.other") as e:
        wp.transfer(state, nn.Sequential(_Legacy(2, 2)), strict=True)
    assert e.value.report.consumed == {}


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        self.fc = nn.Linear(2, 1)


def test_require_takes_names_relative_to_into_or_absolute():
    state = nn.Sequential(nn.Linear(2, 2)).state_dict()  # loads backbone.0; backbone.1 stays fresh
    for pattern in ("0.*", "backbone.0.*", "backbone.0.weight"):
        assert wp.plan(state, _Model(), into="backbone", require=pattern).report.counts()["loaded"] == 2
    for pattern in ("1.*", "backbone.1.*"):
        with pytest.raises(StrictnessError, match=r"not loaded: 1\.weight"):
            wp.plan(state, _Model(), into="backbone", require=pattern)


def test_a_require_pattern_that_matches_nothing_shows_the_names_in_both_forms():
    state = nn.Sequential(nn.Linear(2, 2)).state_dict()
    with pytest.raises(StrictnessError) as e:
        wp.plan(state, _Model(), into="backbone", require="fc.*")
    pattern = r"require='fc\.\*' matched no target under into='backbone'; target names look like '(\d\.\w+)' "
    match = re.search(pattern + r"\(or absolute 'backbone\.(\d\.\w+)'\)", str(e.value))
    assert match is not None and match[1] == match[2], str(e.value)
    with pytest.raises(
        StrictnessError, match=r"require='head\.\*' matched no target; target names look like '(backbone|fc)\."
    ):
        wp.plan(state, _Model(), require="head.*", allow_empty=True)
