"""Applying a plan: everything that can fail first, then a commit that cannot.

Two phases:

1. **Prepare** (may fail; the model is untouched). Every value is computed or
   located: plain loads become zero-copy views of the mapped file (nothing is
   read yet), op results are computed, shapes and (optionally) finiteness are
   checked. Tensors that must change dtype or device, and every tensor of a
   meta-built target, are filled into *new* memory here: the old tensor stays
   in the model until the commit.
2. **Commit** (cannot fail; interrupts are deferred until it ends). In-place
   ``copy_`` from the prepared views into existing tensors, and identity-keeping
   swaps of the new tensors into the model (``torch.utils.swap_tensors``, so
   optimizers and tied modules keep seeing the same ``Parameter`` objects).

A built target therefore holds one copy of its weights plus the op results;
a meta-built target holds only the new weights.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import logging
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import filterfalse
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from weightport import _progress
from weightport._gc import gc_paused
from weightport._hooks import meta_shadow
from weightport._reading import ReadJob, Stager, run_reads
from weightport.errors import NonFiniteError, PlanError, ShapeMismatchError
from weightport.mapping.ops import fuse

if TYPE_CHECKING:
    from weightport.plan import Recipe, TransferPlan
    from weightport.report import TransferReport

log = logging.getLogger(__name__)
_tuple = tuple.__new__  # builds a named tuple from a tuple of all its fields, in C


@dataclass(slots=True)
class _Copy:
    """Commit: ``dest.copy_(value)`` in place."""

    dest: torch.Tensor
    value: torch.Tensor
    release: tuple[str, ...]
    nbytes: int  # source bytes, for progress


@dataclass(slots=True)
class _Swap:
    """Commit: put ``new`` in place of ``old`` (same identity where possible)."""

    old: torch.Tensor
    new: torch.Tensor
    owners: list[tuple[nn.Module, str, str]]  # (module, "_parameters" | "_buffers", attr)


def apply_plan(plan: TransferPlan) -> TransferReport:
    if plan._applied:
        raise PlanError("this plan was applied already; call weightport.plan(...) again")
    with gc_paused():  # ~10 objects per tensor, none in cycles (see weightport._gc)
        return _apply(plan)


def _apply(plan: TransferPlan) -> TransferReport:
    start = time.perf_counter()
    owners = _owners(plan.scope)
    _check_unchanged(plan, owners)
    recipes = list(plan.recipes.items())
    sizes = _source_bytes(plan.source, [r for _, r in recipes])
    total = sum(sizes)
    with _progress.progress(plan.progress, total, desc="weightport: loading") as bar:
        prepared = _prepare(plan, recipes, owners, sizes, bar)
        run_reads(plan.source, prepared.jobs, bar)
        if prepared.stager is not None:
            prepared.stager.finish()
        ready = time.perf_counter()
        with _interrupts_deferred(), torch.no_grad():
            _commit(prepared.writes, plan, bar)
            plan._applied = True
    done = time.perf_counter()
    stats = {
        "prepare_s": ready - start,
        "commit_s": done - ready,
        "seconds": done - start,
        "bytes_loaded": float(total),
        "zero_copy_tensors": float(prepared.zero_copy),
    }
    warnings = plan.report.warnings + tuple(prepared.notes)
    return replace(plan.report, applied=True, stats=stats, warnings=warnings)


def _check_unchanged(plan: TransferPlan, owners: dict[int, list[tuple[nn.Module, str, str]]]) -> None:
    """Every planned target tensor is still held by a module of the scope, under its own attribute
    name (the plan holds the tensors, so their ids cannot have been reused)."""
    for name, t in plan.targets.items():
        held = owners.get(id(t.tensor))
        attr = name.rpartition(".")[2]
        if held is None or all(a != attr for _, _, a in held):
            raise PlanError(f"the model changed since it was planned ({name!r}); plan again")


# -- prepare ----------------------------------------------------------------------------------------

_CPU = torch.device("cpu")


def _source_bytes(source: Any, recipes: list[Recipe]) -> list[int]:
    """Source bytes each recipe reads (for progress): one bulk lookup for single-input recipes."""
    sizes = iter(source.nbytes([r.inputs[0].key for r in recipes if len(r.inputs) == 1]))
    meta = source.meta
    return [next(sizes) if len(r.inputs) == 1 else sum(meta(i.key).nbytes for i in r.inputs) for r in recipes]


def _final(t: torch.Tensor, plan: TransferPlan) -> tuple[torch.dtype, torch.device]:
    """The dtype and device ``t`` ends with."""
    dtype = plan.dtype if plan.dtype is not None and t.is_floating_point() else t.dtype
    if plan.device is not None:
        return dtype, plan.device
    return dtype, (_CPU if t.is_meta else t.device)


@dataclass
class _Prepared:
    """What :func:`_prepare` decided: commit writes, reads to perform first, notes."""

    writes: list[Any] = field(default_factory=list)
    jobs: list[ReadJob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stager: Stager | None = None  # pinned host-to-GPU copies of op results
    zero_copy: int = 0


def _prepare(
    plan: TransferPlan,
    recipes: list[tuple[str, Recipe]],
    owners: dict[int, list[tuple[nn.Module, str, str]]],
    sizes: list[int],
    bar: _progress.Progress,
) -> _Prepared:
    out = _Prepared()
    targets = plan.targets
    loaded = {n for n, _ in recipes}
    fresh_names = [n for n in filterfalse(loaded.__contains__, targets) if targets[n].canonical == n]
    needs_init = [n for n in fresh_names if targets[n].tensor.is_meta]
    value_ops = [
        n
        for n, r in recipes
        if (r.post or any(i.ops for i in r.inputs))  # cheap test first: most recipes have no ops
        and targets[n].tensor.is_meta
        and any(op.target_use == "value" for op in r.ops)
    ]
    inits = _fresh_values(plan, needs_init + value_ops, out.notes)
    for (name, recipe), nbytes in zip(recipes, sizes):
        init = inits.get(name) if inits else None
        out.writes.append(_prepare_recipe(plan, recipe, targets[name].tensor, init, owners, nbytes, out, bar))
    for name in fresh_names:
        t = plan.targets[name].tensor
        dtype, device = _final(t, plan)
        if name in inits:
            out.writes.append(_swap(t, inits[name].to(device=device, dtype=dtype), owners))
        elif (dtype, device) != (t.dtype, t.device):
            out.writes.append(_swap(t, t.detach().to(device=device, dtype=dtype, copy=True), owners))
    if plan.dtype is not None or plan.device is not None:
        out.writes.extend(_convert_other_buffers(plan, owners))
    return out


def _prepare_recipe(
    plan: TransferPlan,
    recipe: Recipe,
    target: torch.Tensor,
    init: torch.Tensor | None,
    owners: dict[int, list[tuple[nn.Module, str, str]]],
    nbytes: int,  # source bytes, for progress
    prepared: _Prepared,
    bar: _progress.Progress,
) -> Any:
    plain = recipe.plain
    meta = target.is_meta
    if plain and meta and plan.dtype is None and plan.device is None and not plan.check_finite and not plan.zero_copy:
        # the bulk of a meta-built target, decided first and cheaply (100k small tensors in an MoE):
        # what the branches below decide for it, a new CPU tensor read straight from the file
        return _swap(target, _read_later(prepared, recipe, target, target.dtype, _CPU, nbytes), owners)
    source = plan.source
    dtype, device = _final(target, plan)
    in_place = not meta and dtype == target.dtype and device == target.device
    if plain and plan.zero_copy and meta and device.type == "cpu" and not plan.check_finite:
        view = source.mapped_view(recipe.inputs[0].key)
        if view is not None and view.dtype == dtype and tuple(view.shape) == tuple(target.shape):
            prepared.zero_copy += 1
            bar.update(nbytes)
            return _swap(target, view, owners)  # shares the file's pages (see docs/performance.md)
    if plain and not in_place and not plan.check_finite and device.type in ("cpu", "cuda"):
        return _swap(target, _read_later(prepared, recipe, target, dtype, device, nbytes), owners)
    keys = tuple(i.key for i in recipe.inputs)
    value = compute(recipe, source, init if init is not None else target)
    if tuple(value.shape) != tuple(target.shape):
        raise ShapeMismatchError(
            f"{recipe.target!r}: the ops produced shape {tuple(value.shape)} but the target is "
            f"{tuple(target.shape)}; fix the rule's op"
        )
    if (
        plan.check_finite
        and (value.is_floating_point() or value.is_complex())
        and not bool(torch.isfinite(value).all())
    ):
        message = f"{', '.join(keys)} -> {recipe.target!r}: holds NaN or Inf values"
        if plan.check_finite == "report":
            prepared.notes.append(message)
        else:
            raise NonFiniteError(
                f"{message}; the checkpoint is damaged (pass check_finite=False to load it anyway, or "
                "check_finite='report' to load it and list them in the report)"
            )
    if in_place:
        return _Copy(target, value, keys, nbytes)
    new = torch.empty(target.shape, dtype=dtype, device=device)
    if device.type == "cuda":
        prepared.stager = prepared.stager or Stager()
        prepared.stager.copy(new, value.to(dtype))
    else:
        new.copy_(value)
    for k in keys:
        source.release(k)
    bar.update(nbytes)
    return _swap(target, new, owners)


def _read_later(
    prepared: _Prepared, recipe: Recipe, target: torch.Tensor, dtype: torch.dtype, device: torch.device, nbytes: int
) -> torch.Tensor:
    """A new tensor for a plain recipe, with a job to read its source tensor straight into it."""
    # a tuple shape, and no device argument for the CPU: each halves torch.empty's call overhead,
    # which counts with 100k small tensors
    shape = recipe.shape if recipe.shape is not None else tuple(target.shape)
    if device is _CPU or device.type == "cpu":
        new = torch.empty(shape, dtype=dtype)
    else:
        new = torch.empty(shape, dtype=dtype, device=device)
    prepared.jobs.append(_tuple(ReadJob, (recipe.inputs[0].key, new, nbytes)))
    return new


def compute(recipe: Recipe, source: Any, target: torch.Tensor) -> torch.Tensor:
    """The recipe's value: a zero-copy view for a plain load, op results otherwise."""
    xs = []
    for inp in recipe.inputs:
        x = source.view(inp.key)
        for op in inp.ops:
            x = op.run(x, target)
        xs.append(x)
    out = fuse(xs, recipe.fuse_dim) if recipe.fuse_dim is not None else xs[0]
    for op in recipe.post:
        out = op.run(out, target)
    return out


def _owners(scope: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    found: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for module in scope.modules():
        for kind in ("_parameters", "_buffers"):
            for attr, t in getattr(module, kind).items():
                if t is not None:
                    found.setdefault(id(t), []).append((module, kind, attr))
    return found


def _swap(old: torch.Tensor, new: torch.Tensor, owners: dict[int, list[tuple[nn.Module, str, str]]]) -> _Swap:
    if isinstance(old, nn.Parameter):
        if type(old) is nn.Parameter and type(new) is torch.Tensor:
            # what nn.Parameter(new, requires_grad=...) does for a plain tensor, without its Python __new__
            param = torch.Tensor._make_subclass(nn.Parameter, new, old.requires_grad)
        elif type(old) is not nn.Parameter and _can_rebuild(old):  # keep Parameter subclasses
            param = type(old)(new, requires_grad=old.requires_grad)
        else:
            param = nn.Parameter(new, requires_grad=old.requires_grad)
        if old.__dict__:
            param.__dict__.update(old.__dict__)
        new = param
    return _Swap(old, new, owners.get(id(old), []))


def _can_rebuild(p: nn.Parameter) -> bool:
    try:
        type(p)(torch.empty(0), requires_grad=False)
    except Exception:  # noqa: BLE001 - a custom subclass with another constructor
        return False
    return True


def _convert_other_buffers(plan: TransferPlan, owners: dict[int, list[tuple[nn.Module, str, str]]]) -> list[_Swap]:
    """Non-persistent buffers follow ``device=`` / ``dtype=`` like the rest of the scope."""
    seen = {id(t.tensor) for t in plan.targets.values()}
    out = []
    for _, b in plan.scope.named_buffers():
        if id(b) in seen or b.is_meta:
            continue
        seen.add(id(b))
        dtype, device = _final(b, plan)
        if (dtype, device) != (b.dtype, b.device):
            out.append(_swap(b, b.to(device=device, dtype=dtype, copy=True), owners))
    return out


# -- fresh tensors of a meta-built target -------------------------------------------------------------


def _fresh_values(plan: TransferPlan, names: list[str], notes: list[str]) -> dict[str, torch.Tensor]:
    """Initialise meta tensors by their modules' own ``reset_parameters``, on a shadow copy."""
    by_module: dict[str, list[str]] = {}
    for name in names:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, members in by_module.items():
        module = plan.scope.get_submodule(path) if path else plan.scope
        shadow = _shadow(module, plan)
        init = getattr(shadow, "reset_parameters", None) or getattr(shadow, "_reset_parameters", None)
        if callable(init):
            with torch.no_grad():
                init()
        else:
            notes.append(
                f"{path or 'the model'} ({type(module).__name__}) has no reset_parameters(): "
                f"{', '.join(members)} initialised to zeros"
            )
        for name in members:
            attr = name.rpartition(".")[2]
            value: torch.Tensor | None = shadow._parameters.get(attr)
            if value is None:
                value = shadow._buffers.get(attr)
            if value is None or value.is_meta:
                raise PlanError(
                    f"cannot materialise {name!r}: it is not a direct parameter or buffer "
                    "of its module; build the model normally instead of on meta"
                )
            out[name] = value.detach()
    return out


def _shadow(module: nn.Module, plan: TransferPlan) -> nn.Module:
    """A copy of ``module`` whose own meta tensors are real (zeros) and whose other tensors
    are meta stand-ins, so ``reset_parameters`` can run without touching the model."""
    shadow = copy.copy(module)
    shadow._parameters = {}
    shadow._buffers = {}
    shadow._modules = {n: meta_shadow(c) for n, c in module._modules.items() if c is not None}
    for kind in ("_parameters", "_buffers"):
        for attr, t in getattr(module, kind).items():
            if t is None:
                getattr(shadow, kind)[attr] = None
                continue
            dtype, device = _final(t, plan)
            if t.is_meta:
                real = torch.zeros(t.shape, dtype=dtype, device=device)
            else:
                real = torch.empty_like(t, device="meta")
            getattr(shadow, kind)[attr] = (
                nn.Parameter(real, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else real
            )
    return shadow


# -- commit -----------------------------------------------------------------------------------------


def _commit(writes: list[Any], plan: TransferPlan, bar: _progress.Progress) -> None:
    source = plan.source
    for w in writes:
        if isinstance(w, _Copy):
            w.dest.copy_(w.value)
            for k in w.release:
                source.release(k)
            bar.update(w.nbytes)
        else:
            _replace(w)


def _replace(w: _Swap) -> None:
    old, new = w.old, w.new
    if type(old) is type(new) and _swappable(old) and _swappable(new):
        if _swap_impl is not None and not copyreg._slotnames(type(old)):  # type: ignore[attr-defined]
            # torch.utils.swap_tensors' own steps for two tensors of one class without slots, with no
            # weak references or other users (checked above): its Python checks cost 7 us a tensor
            if old.__dict__ or new.__dict__:
                old.__dict__, new.__dict__ = new.__dict__, old.__dict__
            _swap_impl(old, new)
        else:
            torch.utils.swap_tensors(old, new)
        return
    for module, kind, attr in w.owners:
        getattr(module, kind)[attr] = new


_swap_impl = getattr(torch._C, "_swap_tensor_impl", None)  # the primitive under torch.utils.swap_tensors


def _swappable(t: torch.Tensor) -> bool:
    if weakref.getweakrefs(t):
        return False
    try:
        return t._use_count() <= 1  # type: ignore[attr-defined]
    except AttributeError:  # older torch
        return False


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise it: the commit is never half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)
        log.warning("interrupt received during the commit; finishing the commit first")

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt
