"""Resuming from a training checkpoint: :func:`resume` and :class:`ResumeState`.

Everything that can fail happens before anything changes: the file is opened and
its metadata checked, the model transfer is planned (names, shapes, strictness),
the optimizer state is mapped, read and placed, the scheduler, scaler and RNG
states are decoded and checked on private objects. Then the model transfer is
applied (all or nothing) and the optimizer, scheduler, scaler and RNG states are
set; those last steps only assign values that were validated.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from weightport.api import plan as plan_transfer
from weightport.apply import interrupts_deferred
from weightport.checkpoint import _dcp, _optim, _rng, _sharded
from weightport.checkpoint._format import CheckpointFile
from weightport.checkpoint._optim import OptimizerReport
from weightport.checkpoint._save import type_name, unwrap
from weightport.checkpoint._tree import decode
from weightport.errors import CheckpointError, WeightportError
from weightport.mapping.core import Mapping
from weightport.mapping.rules import Rule
from weightport.options import as_device
from weightport.report import TransferReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeState:
    """What :func:`resume` restored.

    Attributes:
        path: The checkpoint file.
        epoch: The saved epoch counter (``None`` if none was saved).
        step: The saved step counter.
        extra: The saved ``extra`` dict (tensors on ``map_location``, or CPU).
        metrics: The saved metrics.
        report: The model transfer's :class:`~weightport.TransferReport`.
        optimizer: Where each parameter's optimizer state came from, or ``None`` without an optimizer.
        restored: The parts restored: ``"model"``, ``"optimizer"``, ``"scheduler"``, ``"scaler"``,
            ``"rng:torch"``, ``"rng:cuda"``, ``"rng:numpy"``, ``"rng:python"``.
        notes: What was not restored and why.
        created: When the checkpoint was written (ISO 8601, UTC).
    """

    path: str
    epoch: int | None
    step: int | None
    extra: dict[str, Any]
    metrics: dict[str, Any]
    report: TransferReport
    optimizer: OptimizerReport | None = None
    restored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    created: str | None = None

    def summary(self) -> str:
        """A few lines: counters, the model transfer, the optimizer state, what else was restored."""
        counters = ", ".join(f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.step)) if v is not None)
        lines = [f"resumed from {self.path}" + (f" ({counters})" if counters else "")]
        lines.append("model " + self.report.summary().splitlines()[0])
        if self.optimizer is not None:
            lines.extend(self.optimizer.summary().splitlines())
        rest = [r for r in self.restored if r not in ("model", "optimizer")]
        if rest:
            lines.append("also restored: " + ", ".join(rest))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "epoch": self.epoch,
            "step": self.step,
            "metrics": dict(self.metrics),
            "created": self.created,
            "restored": list(self.restored),
            "notes": list(self.notes),
            "optimizer": self.optimizer.to_dict() if self.optimizer is not None else None,
            "report": self.report.to_dict(),
        }


@dataclass
class _Pending:
    """Validated changes, applied in order after the model transfer."""

    actions: list[tuple[str, Callable[[], str | None]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, action: Callable[[], Any]) -> None:
        self.actions.append((name, action))


def resume(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    map_location: str | torch.device | None = None,
    strict: bool = True,
    mapping: str | Mapping | None = None,
    rules: Iterable[Rule] = (),
    on_mismatch: str = "skip",
    rng: bool = True,
) -> ResumeState:
    """Restore a training run from a checkpoint written by :func:`save`.

    The model is loaded with :func:`weightport.transfer`, so a changed architecture resumes
    through ``mapping=`` / ``rules=`` / ``on_mismatch=`` like any transfer. The optimizer state
    follows each parameter to its new name (momentum buffers, Adam moments, step counts);
    parameters with no source, or changed by an adapter, start with fresh state, and
    ``state.optimizer`` says which. Create the scheduler before calling this, as torch requires.

    Args:
        path: A checkpoint file, or the folder of a sharded model's checkpoint. A sharded model (DTensor
            parameters) resumes on every rank: in place, each rank reading its own shards, or through
            a sharded transfer when ``mapping=`` / ``rules=`` are given. Every rank raises when any fails.
        model: The model to restore into (wrappers such as DDP are unwrapped); may be built
            on the meta device with :func:`weightport.init_empty`.
        optimizer: Built over ``model``'s parameters; its state is replaced.
        scheduler: Its state is replaced (same class as saved).
        scaler: A ``torch.amp.GradScaler``; its state is replaced.
        map_location: Device for the model, its optimizer state and ``extra`` tensors. ``None``
            keeps each parameter where it is (a parameter on the meta device lands on the CPU):
            a checkpoint written on a GPU resumes on a CPU model and the other way round.
        strict: Every model tensor loads and every saved one is used, every part passed
            (optimizer, scheduler, scaler) is in the checkpoint, and the optimizer and scheduler
            are of the saved classes. Pass ``False`` to resume into a changed architecture.
        mapping: A mapping name, file or :class:`weightport.Mapping` for the model's names.
        rules: Extra rules for the model's names (``wp.rename(...)``), applied first.
        on_mismatch: For a saved tensor whose shape differs: ``"skip"``, ``"adapt"`` or ``"error"``.
        rng: Restore the saved torch, CUDA, numpy and Python random states.

    Returns:
        A :class:`ResumeState` with epoch, step, extra, metrics and the reports.

    Raises:
        CheckpointError: the file is not a complete checkpoint, its metadata is damaged, or a part
            cannot be restored (the message names the part). Every part is checked, the scheduler
            and scaler by loading a copy, before anything changes.
        WeightportError: the model transfer cannot be done as asked (as :func:`weightport.transfer`).
            Nothing has changed when any error is raised, and no other exception comes from the file.

    Example:
        >>> state = wp.checkpoint.resume("last.safetensors", model=model, optimizer=opt, scheduler=sched)
        >>> start_epoch = state.epoch + 1
    """
    try:
        return _resume(
            path, model, optimizer, scheduler, scaler, map_location, strict, mapping, rules, on_mismatch, rng
        )
    except WeightportError:
        raise
    except OSError as e:  # the file's reads open it by path: it was removed or replaced meanwhile
        raise CheckpointError(
            f"{os.fspath(path)}: the checkpoint could not be read while resuming ({e}); was it removed or "
            "replaced by another process? Nothing was restored"
        ) from e


def _resume(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: Any,
    map_location: str | torch.device | None,
    strict: bool,
    mapping: str | Mapping | None,
    rules: Iterable[Rule],
    on_mismatch: str,
    rng: bool,
) -> ResumeState:
    device = as_device(map_location, "map_location", CheckpointError)
    target, _ = unwrap(model)
    rules = tuple(rules)
    sharded = _dcp.is_sharded(target)
    with _dcp.agreement(sharded, str(path), "opening the checkpoint"):
        ckpt = CheckpointFile(path)
    with ckpt:
        body = ckpt.body
        native = sharded and mapping is None and not rules and body.get("layout") == "dcp"
        loader = None
        with _dcp.agreement(sharded, ckpt.path, "planning the resume"):
            if native:
                if device is not None:
                    raise CheckpointError(
                        "map_location does not apply to a sharded model: each rank reads into its shards"
                    )
                loader = _sharded.plan(ckpt, target, optimizer, strict, on_mismatch)  # type: ignore[arg-type]
            else:
                source = ckpt.part("model", hide=_tied_aliases(ckpt, target))
                planned = plan_transfer(
                    source, target, mapping=mapping, rules=rules, on_mismatch=on_mismatch, strict=strict, device=device
                )
        if loader is not None:
            loader.read()  # every rank together; a failure on any rank raises on all
        pending = _Pending()
        with _dcp.agreement(sharded, ckpt.path, "checking the saved state"):
            if optimizer is not None and loader is None:
                pending.add("rebind", _optim.rebinder(optimizer, target))
            with _part_errors(ckpt.path, "optimizer"):
                if loader is not None:
                    opt_report = _prepare_sharded_optimizer(ckpt, loader, optimizer, strict, pending)
                else:
                    opt_report = _prepare_optimizer(ckpt, optimizer, target, planned, device, strict, pending)
            with _part_errors(ckpt.path, "scheduler"):
                _prepare_component(ckpt, "scheduler", scheduler, strict, pending, optimizer, target)
            with _part_errors(ckpt.path, "scaler"):
                _prepare_scaler(ckpt, scaler, strict, pending)
            if rng:
                with _part_errors(ckpt.path, "RNG"):
                    _prepare_rng(ckpt, pending)
            with _part_errors(ckpt.path, "extra"):
                extra = decode(body.get("extra", {}), lambda k: ckpt.tensor(k, device=device), ckpt.path)
                metrics = decode(body.get("metrics", {}), lambda k: ckpt.tensor(k), ckpt.path)
                if not isinstance(extra, dict) or not isinstance(metrics, dict):
                    raise CheckpointError(
                        f"{ckpt.path}: the saved extra or metrics are not a dict; the file is damaged"
                    )
            _note_unused_parts(body, optimizer, scheduler, scaler, pending)
        # Ctrl-C is held from the model's commit until every part is restored, then handed to the
        # process's own SIGINT handling: an interrupted resume never leaves the model loaded alone.
        with interrupts_deferred():
            # the last step that can refuse; what follows only assigns checked states
            report = loader.apply() if loader is not None else planned.apply()
            restored = ["model", *(r for r in _run(pending, ckpt.path) if r != "rebind")]
    state = ResumeState(
        path=ckpt.path,
        epoch=body.get("epoch"),
        step=body.get("step"),
        extra=extra,
        metrics=metrics,
        report=report,
        optimizer=opt_report,
        restored=tuple(restored),
        notes=tuple(pending.notes),
        created=body.get("created"),
    )
    log.info("%s", state.summary().splitlines()[0])
    return state


def _tied_aliases(ckpt: CheckpointFile, model: nn.Module) -> frozenset[str]:
    """Saved aliases of a tied tensor that the model ties the same way: the canonical name loads the
    shared tensor, and the alias must not count as an unused source tensor."""
    tensors = model.state_dict(keep_vars=True)
    hidden = set()
    for alias, canonical in ckpt.aliases().items():
        a, c = alias.partition("/")[2], canonical.partition("/")[2]
        if alias.startswith("model/") and a in tensors and c in tensors and tensors[a] is tensors[c]:
            hidden.add(alias)
    return frozenset(hidden)


def _missing(ckpt: CheckpointFile, part: str, strict: bool, pending: _Pending) -> None:
    message = f"the checkpoint holds no {part} state"
    if strict:
        raise CheckpointError(f"{ckpt.path}: {message}; pass strict=False to resume without it")
    pending.notes.append(f"{message}; {part} left as it was")


def _type_matches(ckpt: CheckpointFile, part: str, obj: Any, strict: bool, pending: _Pending) -> bool:
    saved = ckpt.body[part].get("type")
    if saved == type_name(obj):
        return True
    message = f"the checkpoint's {part} is a {saved}, the one passed is a {type_name(obj)}"
    if strict:
        raise CheckpointError(f"{ckpt.path}: {message}; pass the same class, or strict=False to start it fresh")
    pending.notes.append(f"{message}; its state was not restored")
    return False


def _optimizer_expected(ckpt: CheckpointFile, optimizer: Any, strict: bool, pending: _Pending) -> bool:
    """Whether ``optimizer`` is given and the checkpoint holds a state of its type (else the
    ``strict`` rules decide what ``pending`` records)."""
    if optimizer is None:
        return False
    if "optimizer" not in ckpt.body:
        _missing(ckpt, "optimizer", strict, pending)
        return False
    return _type_matches(ckpt, "optimizer", optimizer, strict, pending)


def _prepare_optimizer(
    ckpt: CheckpointFile,
    optimizer: Any,
    model: nn.Module,
    planned: Any,
    device: torch.device | None,
    strict: bool,
    pending: _Pending,
) -> OptimizerReport | None:
    if not _optimizer_expected(ckpt, optimizer, strict, pending):
        return None
    state_dict, report = _optim.prepare(ckpt, optimizer, model, planned, device)
    if _dcp.is_sharded(model):  # carried state is computed whole: each rank keeps its parameters' part
        state_dict = _sharded.shard_like_parameters(state_dict, optimizer)
    _optim.check_loadable(optimizer, state_dict)
    pending.add("optimizer", lambda: optimizer.load_state_dict(state_dict))
    return report


def _prepare_sharded_optimizer(
    ckpt: CheckpointFile, loader: _sharded.Loader, optimizer: Any, strict: bool, pending: _Pending
) -> OptimizerReport | None:
    if not _optimizer_expected(ckpt, optimizer, strict, pending):
        return None
    action = loader.optimizer_action()
    if action is not None:
        pending.add("optimizer", action)
    return loader.optimizer_report


def _prepare_component(
    ckpt: CheckpointFile, part: str, obj: Any, strict: bool, pending: _Pending, optimizer: Any, model: nn.Module
) -> None:
    if obj is None:
        return
    if part not in ckpt.body:
        _missing(ckpt, part, strict, pending)
        return
    if not _type_matches(ckpt, part, obj, strict, pending):
        return
    state = decode(ckpt.body[part].get("state_dict"), lambda k: ckpt.tensor(k), ckpt.path)
    _dry_run(ckpt.path, part, obj, state, optimizer, model)
    pending.add(part, lambda: obj.load_state_dict(state))


def _prepare_scaler(ckpt: CheckpointFile, scaler: Any, strict: bool, pending: _Pending) -> None:
    if scaler is None:
        return
    if "scaler" not in ckpt.body:
        _missing(ckpt, "scaler", strict, pending)
        return
    state = decode(ckpt.body["scaler"].get("state_dict"), lambda k: ckpt.tensor(k), ckpt.path)
    enabled = getattr(scaler, "is_enabled", lambda: True)()
    if not state and enabled:
        pending.notes.append("the saved scaler was disabled; the scaler keeps its current scale")
        return
    _dry_run(ckpt.path, "scaler", scaler, state, None, None)
    pending.add("scaler", lambda: scaler.load_state_dict(state))


def _prepare_rng(ckpt: CheckpointFile, pending: _Pending) -> None:
    saved = _dcp.own_rng(ckpt.body)  # a sharded model's checkpoint holds each rank's
    if saved is None:
        why = "for this rank (saved by fewer ranks)" if "rng_by_rank" in ckpt.body else "(saved with rng=False)"
        pending.notes.append(f"the checkpoint holds no RNG states {why}")
        return
    states = decode(saved, lambda k: ckpt.tensor(k), ckpt.path)
    actions, notes = _rng.prepare(states, ckpt.path)
    pending.notes.extend(notes)
    for name, action in actions:
        pending.add(f"rng:{name}", action)


def _note_unused_parts(body: dict[str, Any], optimizer: Any, scheduler: Any, scaler: Any, pending: _Pending) -> None:
    for part, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is None and part in body:
            pending.notes.append(f"the checkpoint holds {part} state; no {part} was passed, so it was not restored")


@contextlib.contextmanager
def _part_errors(path: str, part: str) -> Iterator[None]:
    """Whatever a damaged part makes torch, numpy or the decoder raise is a CheckpointError naming it."""
    try:
        yield
    except (WeightportError, OSError):  # OSError: the file went away while read (resume says so)
        raise
    except Exception as e:  # a crafted part must not escape as a bare TypeError
        raise CheckpointError(
            f"{path}: the saved {part} state cannot be restored ({type(e).__name__}: {e}); nothing was restored. "
            f"The file is damaged; resume without {part}= to skip it"
        ) from e


def _dry_run(path: str, part: str, obj: Any, state: Any, optimizer: Any, model: nn.Module | None) -> None:
    """Load ``state`` into a copy of ``obj`` first: a scheduler or scaler can only be checked by loading,
    and its ``load_state_dict`` may fail halfway (a ``SequentialLR`` whose phases changed), so the real
    object is loaded only after the copy took the state. The copy shares the optimizer and the model
    (which these loads never change) rather than duplicating them."""
    memo: dict[int, Any] = {}
    for shared in (optimizer, getattr(obj, "optimizer", None), model):
        if shared is not None:
            memo[id(shared)] = shared
    try:
        trial = copy.deepcopy(obj, memo)
        trial_state = copy.deepcopy(state)
    except Exception:  # noqa: BLE001 - an object that cannot be copied: check on the object, then put it back
        _load_and_put_back(path, part, obj, state)
        return
    try:
        trial.load_state_dict(trial_state)
    except Exception as e:  # any failure here means the real load would fail too
        raise _part_refused(path, part, obj, e) from e


def _load_and_put_back(path: str, part: str, obj: Any, state: Any) -> None:
    before = obj.state_dict()
    try:
        obj.load_state_dict(state)
    except Exception as e:
        obj.load_state_dict(before)
        raise _part_refused(path, part, obj, e) from e
    obj.load_state_dict(before)


def _part_refused(path: str, part: str, obj: Any, e: Exception) -> CheckpointError:
    example = " (e.g. the same phases of a SequentialLR)" if part == "scheduler" else ""
    return CheckpointError(
        f"{path}: the saved {part} state does not fit the {type_name(obj)} passed ({type(e).__name__}: {e}); "
        f"nothing was restored. Build the {part} as in the run that saved it{example}, "
        f"or resume without {part}= and set it up fresh"
    )


def _run(pending: _Pending, path: str) -> list[str]:
    done: list[str] = []
    for name, action in pending.actions:
        try:
            note = action()
        except Exception as e:  # checked beforehand; should it still happen, say what is done
            raise CheckpointError(
                f"{path}: restoring {name} failed after the model was loaded ({e}); "
                f"the parts before it are restored: {', '.join(done) or 'model only'}"
            ) from e
        if isinstance(note, str):
            pending.notes.append(note)
        done.append(name)
    return done
