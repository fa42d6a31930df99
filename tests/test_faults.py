"""A failed transfer leaves the model bitwise unchanged, whatever fails and wherever.

Faults (an exception, or ``KeyboardInterrupt``) are injected at every stage: opening the
source, planning (each tensor's metadata, each routing decision, each shape inference),
each tensor read, each op, and the commit. Every tensor of the model is hashed before
and after (``conftest.digest``); parameter identities are checked too.
"""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import TinyNet, digest, trained

import weightport as wp
from weightport.mapping.ops import OpCall
from weightport.meta import init_empty
from weightport.sources import files as files_module
from weightport.sources.base import Source

apply_module = importlib.import_module("weightport.apply")
plan_module = importlib.import_module("weightport.planning.build")

FAULTS = [RuntimeError("injected fault"), KeyboardInterrupt()]


class Injected(Exception):
    pass


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("faults")
    state = trained().state_dict()
    paths = {"zip": str(folder / "w.pth"), "legacy": str(folder / "w_legacy.pth"), "st": str(folder / "w.safetensors")}
    torch.save(state, paths["zip"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    wp.save(state, paths["st"])
    return paths


@contextmanager
def fail_on_call(
    monkeypatch: pytest.MonkeyPatch, owner: Any, attr: str, n: int, fault: BaseException
) -> Iterator[list[int]]:
    """Make the ``n``-th call of ``owner.attr`` raise ``fault``; yields the call counter."""
    original = getattr(owner, attr)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise fault
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(owner, attr, wrapper)
        yield calls


def identities(model: torch.nn.Module) -> list[int]:
    return [id(t) for t in list(model.parameters()) + list(model.buffers())]


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, attr: str, run: Callable[[], Any]) -> int:
    with fail_on_call(monkeypatch, owner, attr, 0, Injected()) as calls:
        run()
    return calls[0]


def assert_every_fault_leaves_model_unchanged(
    monkeypatch: pytest.MonkeyPatch,
    owner: Any,
    attr: str,
    make_model: Callable[[], torch.nn.Module],
    transfer: Callable[[torch.nn.Module], Any],
) -> int:
    """Inject each fault at each call of ``owner.attr`` in turn; returns the number of calls."""
    loaded = make_model()
    total = count_calls(monkeypatch, owner, attr, lambda: transfer(loaded))
    assert total > 0, f"{attr} is never called: the injection point is wrong"
    full, changed = digest(loaded), []
    for n in range(1, total + 1):
        for fault in FAULTS if n in (1, total) else FAULTS[n % 2 : n % 2 + 1]:  # both kinds at the ends
            model = make_model()
            before, ids = digest(model), identities(model)
            with fail_on_call(monkeypatch, owner, attr, n, fault), pytest.raises((type(fault), wp.WeightportError)):
                transfer(model)
            after = digest(model)
            where = f"{attr} call {n}/{total} ({type(fault).__name__})"
            assert after in (before, full), f"{where} left the model half-loaded"  # never half: all or nothing
            assert identities(model) == ids
            if after != before:
                changed.append(where)
    assert not changed, f"the transfer raised but had changed the model: {changed}"
    return total


def built() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyNet()


def on_meta() -> torch.nn.Module:
    with init_empty():
        return TinyNet()


CAST = torch.float64  # forces new tensors filled by read_into instead of in-place copies from views


def _stages() -> list[Any]:
    """(format, owner, attribute, dtype): every injection point, on each path that reaches it."""
    cases: list[Any] = []
    for fmt in ("zip", "legacy", "st"):
        opener = "open_safetensors" if fmt == "st" else "parse_torch_file"
        cases += [
            pytest.param(fmt, files_module, opener, None, id=f"{fmt}-open"),
            pytest.param(fmt, Source, "meta", None, id=f"{fmt}-meta"),
            pytest.param(fmt, Source, "view", None, id=f"{fmt}-read-view"),
            pytest.param(fmt, Source, "read_into_many", CAST, id=f"{fmt}-read-into"),
            pytest.param(fmt, apply_module, "_prepare_recipe", None, id=f"{fmt}-prepare"),
            pytest.param(fmt, apply_module, "_prepare_recipe", CAST, id=f"{fmt}-prepare-cast"),
        ]
    return cases + [  # planning does not depend on the file format
        pytest.param("zip", plan_module, "decide", None, id="plan-decide"),
        pytest.param("zip", plan_module, "route", None, id="plan-route"),
        pytest.param("zip", plan_module, "collect_targets", None, id="plan-targets"),
    ]


@pytest.mark.parametrize(("fmt", "owner", "attr", "dtype"), _stages())
def test_fault_at_every_stage_leaves_model_unchanged(monkeypatch, sources, fmt, owner, attr, dtype):
    path = sources[fmt]

    def transfer(model: torch.nn.Module) -> Any:
        return wp.transfer(path, model, dtype=dtype)

    assert_every_fault_leaves_model_unchanged(monkeypatch, owner, attr, built, transfer)


def test_fault_on_a_meta_built_model_leaves_it_on_meta(monkeypatch, sources):
    for owner, attr in [(Source, "view"), (Source, "read_into_many"), (plan_module, "decide")]:
        total = count_calls(monkeypatch, owner, attr, lambda: wp.transfer(sources["zip"], on_meta()))
        assert total > 0, attr
        for n in range(1, total + 1):
            model = on_meta()
            with fail_on_call(monkeypatch, owner, attr, n, KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):
                wp.transfer(sources["zip"], model)
            assert all(t.is_meta for t in model.parameters()), (attr, n)


def test_fault_in_each_op_leaves_model_unchanged(monkeypatch, sources):
    rules = [
        wp.transform("blocks.{i}.0.weight", "blocks.{i}.0.weight", lambda t: t * 1),
        wp.transform("fc.bias", "fc.bias", "scale", factor=1.0),
    ]

    def transfer(model: torch.nn.Module) -> Any:
        return wp.transfer(sources["zip"], model, rules=rules)

    report = transfer(built())
    assert {e.target for e in report.adapted} >= {"blocks.0.0.weight", "blocks.1.0.weight", "fc.bias"}
    calls = assert_every_fault_leaves_model_unchanged(monkeypatch, OpCall, "run", built, transfer)
    assert calls >= 3  # plan-time (meta) and apply-time runs of all three ops


def test_interrupt_during_commit_finishes_the_commit(monkeypatch, sources):
    """A real Ctrl-C (SIGINT) during the commit is held until the commit ends: the model is fully
    loaded, then KeyboardInterrupt is raised. Covers in-place copies and swaps of new tensors."""
    for dtype in (None, torch.float64):  # in-place copy_ / swap of cast tensors
        expected = built()
        wp.transfer(sources["zip"], expected, dtype=dtype)
        model, original, sent = built(), apply_module.commit, []

        def commit_interrupted(
            writes: list[Any], plan: Any, *rest: Any, original: Any = original, sent: list = sent
        ) -> None:
            half = len(writes) // 2
            original(writes[:half], plan, *rest)
            os.kill(os.getpid(), signal.SIGINT)  # arrives with half the writes done
            sent.append(1)
            original(writes[half:], plan, *rest)

        with monkeypatch.context() as m:
            m.setattr(apply_module, "commit", commit_interrupted)
            with pytest.raises(KeyboardInterrupt):
                wp.transfer(sources["zip"], model, dtype=dtype)
        assert sent and digest(model) == digest(expected), dtype


def test_failed_transfer_keeps_optimizer_identity(sources, monkeypatch):
    model = built()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [id(p) for g in opt.param_groups for p in g["params"]]
    with fail_on_call(monkeypatch, Source, "view", 3, KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):
        wp.transfer(sources["zip"], model)
    assert [id(p) for p in model.parameters()] == before


def _commit_interrupted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the commit receive a real SIGINT half way through; returns the list it marks."""
    original, sent = apply_module.commit, []

    def commit(writes: list[Any], plan: Any, *rest: Any) -> None:
        half = len(writes) // 2
        original(writes[:half], plan, *rest)
        os.kill(os.getpid(), signal.SIGINT)
        sent.append(1)
        original(writes[half:], plan, *rest)

    monkeypatch.setattr(apply_module, "commit", commit)
    return sent


def test_an_interrupt_during_the_commit_goes_to_the_process_own_handler(monkeypatch, sources):
    expected = built()
    wp.transfer(sources["zip"], expected)
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        sent = _commit_interrupted(monkeypatch)
        model = built()
        report = wp.transfer(sources["zip"], model)  # no KeyboardInterrupt: the handler decides
        assert report.applied and sent and digest(model) == digest(expected)
        assert received == [signal.SIGINT]  # called once, after the commit
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_ignored_interrupt_stays_ignored_during_the_commit(monkeypatch, sources):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sent = _commit_interrupted(monkeypatch)
        report = wp.transfer(sources["zip"], built())
        assert report.applied and sent
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
