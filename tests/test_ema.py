"""``ema=``: a checkpoint's EMA weights or its raw weights, chosen as timm's ``use_ema`` does, and said."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import TinyNet, trained

import weightport as wp
from weightport.errors import OptionError, SourceError


@pytest.fixture
def weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    raw = trained().state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    return raw, ema


def _took(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return torch.equal(model.fc.weight, state["fc.weight"])


@pytest.fixture(params=["file", "dict"])
def both(request, tmp_path, weights):
    """A timm-style training checkpoint: raw weights, their EMA, and other entries."""
    raw, ema = weights
    ckpt = {"state_dict": raw, "state_dict_ema": ema, "epoch": 3, "optimizer": {"state": {}}}
    if request.param == "dict":
        return ckpt
    torch.save(ckpt, tmp_path / "train.pth")
    return tmp_path / "train.pth"


def test_by_default_the_raw_weights_are_taken_and_the_summary_says_the_ema_exists(both, weights):
    model = TinyNet()
    report = wp.transfer(both, model)
    assert _took(model, weights[0])
    assert "raw weights taken, not the EMA weights under 'state_dict_ema' (ema=True takes those)" in report.summary()
    assert set(report.source.ignored) == {"epoch", "optimizer"}  # the EMA weights are weights, not "ignored"


def test_ema_true_takes_the_ema_weights_and_the_summary_says_the_raw_exist(both, weights):
    model = TinyNet()
    report = wp.transfer(both, model, ema=True)
    assert _took(model, weights[1])
    assert "EMA weights taken, not the raw weights under 'state_dict' (ema=False takes those)" in report.summary()
    assert wp.plan(both, TinyNet(), ema=True).report.source.wrapper == "state_dict_ema"


def test_ema_false_takes_the_raw_weights(both, weights):
    model = TinyNet()
    wp.transfer(both, model, ema=False)
    assert _took(model, weights[0])


def test_timms_order_state_dict_ema_before_model_ema(weights):
    raw, ema = weights
    other = {k: v * 0 for k, v in ema.items()}
    model = TinyNet()
    wp.transfer({"model": raw, "model_ema": other, "state_dict_ema": ema}, model, ema=True)
    assert _took(model, ema)


def test_a_checkpoint_with_only_ema_weights(tmp_path, weights):
    torch.save({"model_ema": weights[1], "epoch": 1}, tmp_path / "ema.pth")
    model = TinyNet()
    report = wp.transfer(tmp_path / "ema.pth", model)
    assert _took(model, weights[1])
    assert "EMA weights taken from 'model_ema' (the checkpoint holds no raw weights)" in report.summary()
    with pytest.raises(SourceError, match=r"ema\.pth: ema=False asks for the raw weights.*'model_ema'"):
        wp.transfer(tmp_path / "ema.pth", TinyNet(), ema=False)


@pytest.mark.parametrize("kind", ["nested", "flat", "module"])
def test_ema_true_without_ema_weights_names_the_source(tmp_path, weights, kind):
    source = {
        "nested": {"state_dict": weights[0]},
        "flat": weights[0],
        "module": trained(),
    }[kind]
    with pytest.raises(SourceError, match="ema=True, but it holds no EMA weights"):
        wp.transfer(source, TinyNet(), ema=True)
    torch.save({"state_dict": weights[0]}, tmp_path / "raw.pth")
    with pytest.raises(SourceError, match=rf"{tmp_path / 'raw.pth'}: ema=True.*under 'state_dict'"):
        wp.open_source(tmp_path / "raw.pth", ema=True)


def test_ema_and_checkpoint_key_are_not_both_given(both):
    with pytest.raises(SourceError, match="checkpoint_key='state_dict' and ema=True both choose the weights"):
        wp.transfer(both, TinyNet(), checkpoint_key="state_dict", ema=True)


def test_ema_is_an_open_option_of_transfer_and_plan():
    assert inspect.signature(wp.transfer).parameters["ema"].default is None
    assert inspect.signature(wp.plan).parameters["ema"].default is None
    with pytest.raises(OptionError, match="ema must be True, False or None, not 'yes'"):
        wp.transfer({}, TinyNet(), ema="yes")
