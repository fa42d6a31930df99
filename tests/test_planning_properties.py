"""Planning against a naive oracle: rename by the mapping, keep what fits by shape, load_state_dict.

Hypothesis generates modules (a stack of layers, optionally tied weights and a buffer), rules
(renames, prefix strips, drops) and checkpoints (renamed names, missing keys, extra keys, wrong
shapes, two keys for one target). The oracle is written in a few lines from the contract: every
key goes where the mapping sends it; a target fed by two keys is a collision; a target fed by one
key of its own shape loads it, any other shape leaves it fresh (``on_mismatch="skip"``); of a group
of tied names the first one fed decides. The plan must report exactly that, and applying it must
leave the model exactly as ``load_state_dict(strict=False)`` of the oracle's renamed state dict.
Models of up to ~160 tensors cross the size above which keys are resolved in bulk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import weightport as wp
from weightport.errors import CollisionError, NothingLoadedError

SHAPES = {"weight": (3, 2), "bias": (3,), "gamma": (2,)}


class Stack(nn.Module):
    def __init__(self, depth: int, kinds: tuple[str, ...], tied: bool, buffer: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            layer = nn.Module()
            for kind in kinds:
                layer.register_parameter(kind, nn.Parameter(torch.zeros(SHAPES[kind])))
            self.layers.append(layer)
        self.head = nn.Module()
        self.head.weight = nn.Parameter(torch.zeros(SHAPES["weight"]))
        if tied and "weight" in kinds:
            self.head.weight = self.layers[0].weight  # tied: two names, one tensor
        if buffer:
            self.register_buffer("scale", torch.zeros(2))


@dataclass
class Scenario:
    depth: int
    kinds: tuple[str, ...]
    tied: bool
    buffer: bool
    naming: str  # how the checkpoint names layers
    rules: list[Any]
    state: dict[str, torch.Tensor]


NAMINGS = {
    "same": ("layers.{i}.{p}", []),
    "prefixed": ("backbone.layers.{i}.{p}", [wp.strip_prefix("backbone.")]),
    "renamed": ("blocks.{i}.{p}", [wp.rename("blocks.{i}.{p}", "layers.{i}.{p}")]),
}


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    depth = draw(st.integers(1, 50))
    kinds = tuple(draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=3, unique=True)))
    tied, buffer = draw(st.booleans()), draw(st.booleans())
    naming = draw(st.sampled_from(sorted(NAMINGS)))
    pattern, rules = NAMINGS[naming]
    rules = list(rules)
    counter = iter(range(1, 10**6))

    def value(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.full(shape, float(next(counter)))

    state: dict[str, torch.Tensor] = {}
    for i in range(depth):
        for kind in kinds:
            key = pattern.format(i=i, p=kind)
            fate = draw(st.sampled_from(["load"] * 8 + ["missing", "mismatch"]))
            if fate == "load":
                state[key] = value(SHAPES[kind])
            elif fate == "mismatch":
                state[key] = value((4, *SHAPES[kind][1:]))
    if draw(st.booleans()):
        state["head.weight"] = value(SHAPES["weight"])
    if buffer and draw(st.booleans()):
        state["scale"] = value((2,))
    for j in range(draw(st.integers(0, 3))):  # keys that feed nothing
        state[f"extra.{j}.weight"] = value((5,))
    if draw(st.booleans()):
        rules.append(wp.drop("extra.**"))
    if draw(st.booleans()) and depth > 1 and "bias" in kinds:  # a second key for one target
        rules.insert(0, wp.rename("alias.bias", "layers.1.bias"))
        state["alias.bias"] = value(SHAPES["bias"])
    assume(state)  # an empty checkpoint is refused when it is opened
    order = draw(st.permutations(sorted(state)))
    return Scenario(depth, kinds, tied, buffer, naming, rules, {k: state[k] for k in order})


def _model(s: Scenario) -> Stack:
    return Stack(s.depth, s.kinds, s.tied, s.buffer)


def oracle(s: Scenario) -> dict[str, Any]:
    """What the contract says, from the mapping's names, shapes and load_state_dict alone."""
    mapping = wp.Mapping(s.rules)
    target = _model(s).state_dict(keep_vars=True)
    canonical: dict[int, str] = {}
    groups: dict[str, list[str]] = {}
    for name, t in target.items():
        groups.setdefault(canonical.setdefault(id(t), name), []).append(name)
    feeds: dict[str, list[str]] = {}
    dropped, fed = [], set()
    for key in s.state:
        resolution = mapping.resolve(key)
        if resolution.dropped:
            dropped.append(key)
        for out in resolution.outputs:
            if out.target in target:
                feeds.setdefault(out.target, []).append(key)
                fed.add(key)
    collisions = {n for n, keys in feeds.items() if len(keys) > 1}
    entries, renamed, ignored = {}, {}, set()
    for first, names in groups.items():
        chosen = next((n for n in names if n in feeds), None)
        for other in names:
            if other != chosen and other in feeds:
                ignored.update(feeds[other])
        if chosen is None:
            reason = "dropped" if any(n in dropped for n in names) else "missing"
            entries.update({n: ("fresh", (), reason) for n in names})
            continue
        key = feeds[chosen][0]
        if s.state[key].shape == target[first].shape:
            renamed[first] = s.state[key]
            entries.update({n: ("loaded", (key,), None) for n in names})
        else:
            ignored.add(key)
            entries.update({n: ("fresh", (), "shape mismatch") for n in names})
    unused = [k for k in s.state if (k not in fed or k in ignored) and k not in dropped]
    return {"collisions": collisions, "entries": entries, "renamed": renamed, "unused": unused, "dropped": dropped}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_planning_agrees_with_the_naive_oracle(s: Scenario) -> None:
    want = oracle(s)
    model = _model(s)
    if want["collisions"]:
        try:
            wp.plan(s.state, model, rules=s.rules)
        except CollisionError as e:
            assert {c.target for c in e.collisions} == want["collisions"]
            return
        raise AssertionError("no CollisionError")
    if not want["renamed"]:  # nothing would load: refused unless the caller says it is intended
        with pytest.raises(NothingLoadedError):
            wp.plan(s.state, _model(s), rules=s.rules)
    planned = wp.plan(s.state, model, rules=s.rules, allow_empty=True)
    report = planned.report
    got = {e.target: (e.status, e.sources, e.reason) for e in report.entries}
    assert got == want["entries"]
    assert list(report.unused) == want["unused"]
    assert list(report.dropped) == want["dropped"]
    planned.apply()
    reference = _model(s)
    reference.load_state_dict(want["renamed"], strict=False)
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_a_file_source_plans_what_a_state_dict_plans(tmp_path_factory: Any, s: Scenario) -> None:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    save_file({k: v.contiguous() for k, v in s.state.items()}, str(path))
    outcomes = []
    for source in (s.state, str(path)):
        try:
            report = wp.plan(source, _model(s), rules=s.rules, allow_empty=True).report
            outcomes.append(([(e.target, e.status, e.sources, e.reason) for e in report.entries], set(report.unused)))
        except CollisionError as e:
            outcomes.append(("collision", {c.target for c in e.collisions}))
    assert outcomes[0] == outcomes[1]


def test_most_tensors_of_a_large_model_take_the_cheap_branch() -> None:
    """The cheap branch (columns, no recipe objects) takes every plain load; the rest are decided
    one by one."""
    s = Scenario(40, ("weight", "bias"), False, False, "same", [], {})
    state = {k: torch.ones(v.shape) for k, v in _model(s).state_dict().items()}
    state["layers.3.bias"] = torch.ones(9)  # a mismatch
    state["alias"] = state.pop("layers.5.bias")  # a key with an op
    planned = wp.plan(state, _model(s), rules=[wp.transform("alias", "layers.5.bias", "scale", factor=2.0)])
    lane = planned.recipes.lane
    assert len(lane.names) == len(planned.targets) - 2
    assert "layers.3.bias" not in lane.names and "layers.5.bias" not in lane.names
    assert planned.report["layers.5.bias"].status == "adapted"
