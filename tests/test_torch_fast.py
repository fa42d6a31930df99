"""weightport._torch_fast: the private torch calls, each beside its public fallback; both paths load alike."""

from __future__ import annotations

import pytest
import torch
from conftest import TiedLM, TinyNet, trained
from torch import nn

import weightport as wp
from weightport import _torch_fast


def _load(model_fn, source):  # type: ignore[no-untyped-def]
    model = model_fn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # holds the Parameter objects
    held = list(model.parameters())
    wp.transfer(source, model, dtype="float64")
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in held]
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(p) for p in model.parameters()]


@pytest.mark.parametrize(
    "model_fn",
    [TinyNet, TiedLM, lambda: _meta(TinyNet)],
    ids=["built", "tied", "meta"],
)
def test_the_public_path_loads_what_the_fast_path_loads(monkeypatch, model_fn):
    source = trained().state_dict() if model_fn is not TiedLM else TiedLM().state_dict()
    calls = []
    original = _torch_fast._swap_impl
    with monkeypatch.context() as m:
        m.setattr(_torch_fast, "_swap_impl", lambda a, b: calls.append(1) or original(a, b))
        fast = _load(model_fn, source)
    assert calls, "the fast path did not use the primitive"
    with monkeypatch.context() as m:
        m.setattr(_torch_fast, "FAST", False)

        def forbidden(*args):  # type: ignore[no-untyped-def]
            raise AssertionError("the private primitive was called on the public path")

        m.setattr(_torch_fast, "_swap_impl", forbidden)
        public = _load(model_fn, source)
    assert fast[1] == public[1]
    assert fast[0].keys() == public[0].keys()
    assert all(torch.equal(fast[0][k], public[0][k]) for k in fast[0])


def _meta(cls):  # type: ignore[no-untyped-def]
    with wp.init_empty():
        return cls()


def test_as_parameter_is_a_parameter_either_way(monkeypatch):
    data = torch.ones(2)
    for fast in (True, False):
        monkeypatch.setattr(_torch_fast, "FAST", fast)
        p = _torch_fast.as_parameter(data, requires_grad=False)
        assert type(p) is nn.Parameter and p.requires_grad is False and torch.equal(p, data)


def test_a_tensor_with_a_weak_reference_or_another_user_is_not_swappable():
    import weakref

    t = torch.zeros(2)
    assert _torch_fast.swappable(t)
    ref = weakref.ref(t)
    assert not _torch_fast.swappable(t) and ref() is t
