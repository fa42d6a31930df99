"""weightport.options: the keyword options of transfer/plan/apply, declared once."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import torch
from conftest import TinyNet, trained

import weightport as wp
from weightport.errors import OptionError, PlanError
from weightport.options import ApplyOptions, OpenOptions, PlanOptions, split_options


def _declared(*phases: type) -> list[str]:
    return [f.name for phase in phases for f in fields(phase)]


def test_public_signatures_are_generated_from_the_option_fields():
    every = _declared(OpenOptions, PlanOptions, ApplyOptions)
    for fn in (wp.transfer, wp.plan):
        params = inspect.signature(fn).parameters
        assert list(params) == ["source", "model", *every], fn.__name__
        assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in every)
        assert params["on_mismatch"].default == "skip" and params["check_hash"].default is True
        for name in every:  # each documented, from the field's metadata
            assert f"{name}: " in (fn.__doc__ or ""), (fn.__name__, name)
    apply_params = inspect.signature(wp.TransferPlan.apply).parameters
    assert list(apply_params) == ["self", *_declared(ApplyOptions)]


def test_an_unknown_option_is_refused_with_the_closest_names():
    with pytest.raises(OptionError, match=r"unknown option 'strcit'; did you mean 'strict'") as info:
        wp.transfer(trained().state_dict(), TinyNet(), strcit=True)
    assert isinstance(info.value, TypeError) and isinstance(info.value, PlanError)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_mismatch": "ignore"}, "on_mismatch must be one of"),
        ({"check_finite": "yes"}, "check_finite must be True, False or 'report'"),
        ({"dtype": "float77"}, "dtype='float77' is not a torch dtype"),
        ({"device": "gpu:x"}, "device='gpu:x' is not a torch device"),
        ({"require": [1]}, "require must be glob patterns"),
        ({"rules": ["a->b"]}, "rules must be rules"),
        ({"progress": "auto"}, "progress must be None, True or False"),
    ],
)
def test_bad_values_are_refused_before_anything_is_opened(tmp_path, options, message):
    missing = tmp_path / "not-there.pth"  # never opened: the options are checked first
    with pytest.raises(OptionError, match=message):
        wp.plan(missing, TinyNet(), **options)


def test_values_are_normalised_once():
    opening, planning, applying = split_options({"require": "a.*", "dtype": "bfloat16", "device": "cpu"})
    assert planning.require == ("a.*",) and applying.dtype is torch.bfloat16
    assert applying.device == torch.device("cpu") and opening == OpenOptions()
    with pytest.raises(Exception, match="frozen|cannot assign"):
        planning.strict = True  # type: ignore[misc]


def test_apply_time_options_belong_to_apply_and_default_to_the_plans():
    source = trained().state_dict()
    planned = wp.plan(source, TinyNet(), dtype="float16")
    assert planned.apply_options.dtype is torch.float16
    model = TinyNet()
    report = wp.plan(source, model, dtype="float16").apply(dtype="float64", check_finite=True)
    assert report.applied and all(p.dtype is torch.float64 for p in model.parameters())
    model = TinyNet()
    wp.plan(source, model, dtype="float16").apply()
    assert all(p.dtype is torch.float16 for p in model.parameters())
    with pytest.raises(OptionError, match="unknown option 'strict'"):
        wp.plan(source, TinyNet()).apply(strict=True)  # a planning option: too late to apply


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_before_anything_changes():
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OptionError, match="no CUDA device is available"):
        wp.transfer(trained().state_dict(), model, device="cuda")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
