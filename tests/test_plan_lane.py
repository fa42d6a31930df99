"""The plain lane (keys decided in bulk) plans exactly what the general, key-by-key path plans."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import TiedLM, TinyNet, trained
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport.errors import WeightportError

plan_module = importlib.import_module("weightport.plan")  # (weightport.plan is also the function)


def _general_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every key down the general path (the reference)."""
    original = plan_module._plain_lane

    def no_lane(keys, groups, targets, ties, hooks):  # type: ignore[no-untyped-def]
        return original(keys, groups, targets, ties, True)  # hooks=True: nothing takes the lane

    monkeypatch.setattr(plan_module, "_plain_lane", no_lane)


def _outcome(source, model_fn, **kwargs):  # type: ignore[no-untyped-def]
    try:
        p = wp.plan(source, model_fn(), **kwargs)
    except WeightportError as e:
        return ("error", type(e).__name__, str(e))
    recipes = {name: (r.inputs, r.fuse_dim, r.post, r.rule, tuple(r.shape or ())) for name, r in p.recipes.items()}
    report = p.report.to_dict()
    return ("plan", recipes, report)


class Stack(nn.Module):
    """Enough keys (> 64) for grouped bulk resolution, with a tied pair and a buffer."""

    def __init__(self, n: int = 24, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(n))
        self.head = nn.Linear(width, classes)
        self.register_buffer("scale", torch.ones(width))


def _state(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Stack().state_dict().items()}
    state.update(changes)
    return state


SCENARIOS = {
    "same names": (lambda: _state(), Stack, {}),
    "prefixed, stripped by a rule": (
        lambda: {f"backbone.{k}": v for k, v in _state().items()},
        Stack,
        {"rules": [wp.strip_prefix("backbone.")]},
    ),
    "renamed in bulk": (
        lambda: {k.replace("layers.", "blocks."): v for k, v in _state().items()},
        Stack,
        {"rules": [wp.rename("blocks.{i}.{p}", "layers.{i}.{p}")]},
    ),
    "a shape mismatch, skipped": (lambda: _state(**{"head.weight": torch.zeros(7, 4)}), Stack, {}),
    "a shape mismatch, refused": (
        lambda: _state(**{"head.weight": torch.zeros(7, 4)}),
        Stack,
        {"on_mismatch": "error"},
    ),
    "a shape mismatch, adapted": (
        lambda: _state(**{"head.weight": torch.zeros(7, 4), "head.bias": torch.zeros(7)}),
        Stack,
        {"on_mismatch": "adapt"},
    ),
    "two keys for one target": (
        lambda: {**_state(), "extra.weight": torch.zeros(4, 4)},
        Stack,
        {"rules": [wp.rename("extra.weight", "layers.3.weight")]},
    ),
    "a split feeding a target the lane also feeds": (
        lambda: {**_state(), "qkv": torch.zeros(8, 4)},
        Stack,
        {"rules": [wp.split("qkv", ["layers.0.weight", "layers.1.weight"])]},
    ),
    "missing and unused keys": (
        lambda: {k + ("_old" if "norms.1" in k else ""): v for k, v in _state().items()},
        Stack,
        {},
    ),
    "strict": (lambda: _state(), Stack, {"strict": True}),
    "strict, failing": (lambda: {k: v for k, v in _state().items() if "norms.2" not in k}, Stack, {"strict": True}),
    "require": (lambda: _state(), Stack, {"require": ["layers.*"]}),
    "dropped": (lambda: _state(), Stack, {"rules": [wp.drop("norms.**")]}),
    "a transform": (
        lambda: _state(),
        Stack,
        {"rules": [wp.transform("layers.{i}.weight", "layers.{i}.weight", "scale", factor=2.0)]},
    ),
    "tied target": (lambda: TiedLM().state_dict(), TiedLM, {}),
    "tied target, both names in the source": (
        lambda: {**TiedLM().state_dict(), "head.weight": torch.zeros(20, 6)},
        TiedLM,
        {},
    ),
    "small model": (lambda: trained().state_dict(), TinyNet, {}),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_plain_lane_plans_what_the_general_path_plans(name, monkeypatch, tmp_path):
    make_state, model_fn, kwargs = SCENARIOS[name]
    path = str(tmp_path / "w.safetensors")
    state = {k: v.detach().clone().contiguous() for k, v in make_state().items()}
    save_file(state, path)
    for source in (state, path):
        fast = _outcome(source, model_fn, **kwargs)
        with monkeypatch.context() as m:
            _general_only(m)
            slow = _outcome(source, model_fn, **kwargs)
        assert fast == slow, name


def test_the_plain_lane_takes_the_bulk_of_a_large_model(monkeypatch):
    taken = []
    original = plan_module._settle

    def spy(lane, source, targets, routing):  # type: ignore[no-untyped-def]
        out = original(lane, source, targets, routing)
        taken.append(len(out.names))
        return out

    monkeypatch.setattr(plan_module, "_settle", spy)
    p = wp.plan(_state(**{"head.weight": torch.zeros(7, 4)}), Stack())
    assert taken == [len(p.targets) - 1]  # all but the mismatched head weight
    assert p.report["head.weight"].status == "fresh"


def test_a_model_with_loading_hooks_takes_the_general_path(monkeypatch):
    class Renaming(Stack):
        def _load_from_state_dict(self, state_dict, prefix, *args):  # type: ignore[no-untyped-def]
            return super()._load_from_state_dict(state_dict, prefix, *args)

    taken = []
    original = plan_module._settle
    monkeypatch.setattr(plan_module, "_settle", lambda lane, *a: taken.append(len(lane.names)) or original(lane, *a))
    wp.plan(_state(), Renaming())
    assert taken == [0]
