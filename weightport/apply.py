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
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import filterfalse
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from weightport import _progress, _torch_fast
from weightport._fresh import fresh_values, recompute_buffers
from weightport._gc import gc_paused
from weightport._reading import ReadJob, Stager, run_reads
from weightport.errors import NonFiniteError, PlanError, ShapeMismatchError
from weightport.options import ApplyOptions
from weightport.planning.data import Recipe, evaluate

if TYPE_CHECKING:
    from weightport.planning.data import TransferPlan
    from weightport.report import TransferReport

log = logging.getLogger(__name__)
Owners = dict[int, list[tuple[nn.Module, str, str]]]  # id(tensor) -> (module, "_parameters" | "_buffers", attr)


@dataclass(slots=True)
class Copy:
    """Commit: ``dest.copy_(value)`` in place."""

    dest: torch.Tensor
    value: torch.Tensor
    release: tuple[str, ...]
    nbytes: int  # source bytes, for progress


@dataclass(slots=True)
class Swap:
    """Commit: put ``new`` in place of ``old`` (same identity where possible)."""

    old: torch.Tensor
    new: torch.Tensor
    owners: list[tuple[nn.Module, str, str]]  # (module, "_parameters" | "_buffers", attr)


def apply_plan(plan: TransferPlan, options: ApplyOptions) -> TransferReport:
    """Perform ``plan`` with ``options``: all or nothing (module docstring)."""
    if plan.applied:
        raise PlanError("this plan was applied already; call weightport.plan(...) again")
    with gc_paused():  # many small objects per tensor, none in cycles (see weightport._gc)
        return _apply(plan, options)


def _apply(plan: TransferPlan, options: ApplyOptions) -> TransferReport:
    start = time.perf_counter()
    owners = owners_of(plan.scope)
    check_unchanged(plan, owners)
    recipes = list(plan.recipes.values())
    sizes = _source_bytes(plan.source, recipes)
    total = sum(sizes)
    with _progress.progress(options.progress, total, desc="weightport: loading") as bar:
        prepared = _prepare(plan, options, recipes, owners, sizes, bar)
        run_reads(plan.source, prepared.jobs, bar)
        if prepared.stager is not None:
            prepared.stager.finish()
        ready = time.perf_counter()
        stats = {
            "prepare_s": ready - start,
            "bytes_loaded": float(total),
            "zero_copy_tensors": float(prepared.zero_copy),
        }
        # the report exists before the first write: nothing after the commit can fail
        report = replace(plan.report, applied=True, stats=stats, warnings=plan.report.warnings + tuple(prepared.notes))
        with interrupts_deferred(), torch.no_grad():
            commit(prepared.writes, plan, bar)
            plan.applied = True
    done = time.perf_counter()
    stats.update(commit_s=done - ready, seconds=done - start)  # plain float values: cannot fail
    note = report.fresh_parameters_note()
    if note is not None:
        log.warning("%s", note)  # logging reports its own failures; it never raises here
    return report


def check_unchanged(plan: TransferPlan, owners: Owners) -> None:
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


def final_place(t: torch.Tensor, options: ApplyOptions) -> tuple[torch.dtype, torch.device]:
    """The dtype and device ``t`` ends with."""
    dtype = options.dtype if options.dtype is not None and t.is_floating_point() else t.dtype
    if options.device is not None:
        return dtype, options.device
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
    options: ApplyOptions,
    recipes: list[Recipe],
    owners: Owners,
    sizes: list[int],
    bar: _progress.Progress,
) -> _Prepared:
    out = _Prepared()
    targets = plan.targets
    loaded = {r.target for r in recipes}
    fresh_names = [n for n in filterfalse(loaded.__contains__, targets) if targets[n].canonical == n]
    needs_init = [n for n in fresh_names if targets[n].tensor.is_meta]
    value_ops = [
        r.target
        for r in recipes
        if (r.post or any(i.ops for i in r.inputs))  # cheap test first: most recipes have no ops
        and targets[r.target].tensor.is_meta
        and any(op.target_use == "value" for op in r.ops)
    ]
    inits = fresh_values(plan.scope, needs_init + value_ops, lambda t: final_place(t, options), out.notes)
    for recipe, nbytes in zip(recipes, sizes):
        init = inits.get(recipe.target) if inits else None
        target = targets[recipe.target].tensor
        out.writes.append(_prepare_recipe(plan, options, recipe, target, init, owners, nbytes, out, bar))
    for name in fresh_names:
        t = plan.targets[name].tensor
        dtype, device = final_place(t, options)
        if name in inits:
            out.writes.append(_swap(t, inits[name].to(device=device, dtype=dtype), owners))
        elif (dtype, device) != (t.dtype, t.device):
            out.writes.append(_swap(t, t.detach().to(device=device, dtype=dtype, copy=True), owners))
    if options.dtype is not None or options.device is not None:
        out.writes.extend(_convert_other_buffers(plan, options, owners))
    out.writes.extend(materialise_others(plan, options, out.notes))
    return out


def materialise_others(plan: TransferPlan, options: ApplyOptions, notes: list[str]) -> list[Swap]:
    """Real tensors for the model's meta tensors that no target covers (``plan.materialise``):
    outside ``into=`` initialised as fresh tensors are, non-persistent buffers recomputed."""
    todo = plan.materialise
    if plan.model is None or todo is None or not (todo.fresh or todo.buffers):
        return []
    model = plan.model
    place = lambda t: final_place(t, options)  # noqa: E731
    values = fresh_values(model, list(todo.fresh), place, notes)
    values.update(recompute_buffers(model, list(todo.buffers), place))
    owners = owners_of(model)
    out = []
    for name, value in values.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path) if path else model
        old: torch.Tensor | None = module._parameters.get(attr)
        if old is None:
            old = module._buffers[attr]
        assert old is not None
        dtype, device = place(old)
        out.append(_swap(old, value.to(device=device, dtype=dtype), owners))
    return out


def _prepare_recipe(
    plan: TransferPlan,
    options: ApplyOptions,
    recipe: Recipe,
    target: torch.Tensor,
    init: torch.Tensor | None,
    owners: Owners,
    nbytes: int,  # source bytes, for progress
    prepared: _Prepared,
    bar: _progress.Progress,
) -> Any:
    plain = recipe.plain
    meta = target.is_meta
    check_finite = options.check_finite
    if (
        plain
        and meta
        and options.dtype is None
        and options.device is None
        and not check_finite
        and not options.zero_copy
    ):
        # the bulk of a meta-built target, decided first and cheaply (many small tensors in an MoE):
        # what the branches below decide for it, a new CPU tensor read straight from the file
        return _swap(target, _read_later(prepared, recipe, target, target.dtype, _CPU, nbytes), owners)
    source = plan.source
    dtype, device = final_place(target, options)
    in_place = not meta and dtype == target.dtype and device == target.device and writable_in_place(target)
    if plain and options.zero_copy and meta and device.type == "cpu" and not check_finite:
        view = source.mapped_view(recipe.inputs[0].key)
        if view is not None and view.dtype == dtype and tuple(view.shape) == tuple(target.shape):
            prepared.zero_copy += 1
            bar.update(nbytes)
            return _swap(target, view, owners)  # shares the file's pages (see docs/performance.md)
    if plain and not in_place and not check_finite and device.type in ("cpu", "cuda"):
        return _swap(target, _read_later(prepared, recipe, target, dtype, device, nbytes), owners)
    keys = tuple(i.key for i in recipe.inputs)
    views: list[torch.Tensor] = []

    def read(key: str) -> torch.Tensor:
        views.append(source.view(key))
        return views[-1]

    base = init if init is not None else target
    value = evaluate(recipe, read, base)
    if tuple(value.shape) != tuple(target.shape):
        raise ShapeMismatchError(
            f"{recipe.target!r}: the ops produced shape {tuple(value.shape)} but the target is "
            f"{tuple(target.shape)}; fix the rule's op"
        )
    if check_finite and not finite_as_stored(value, dtype):
        cast = f" once cast to {_dtype_name(dtype)}" if value.dtype != dtype else ""
        message = f"{', '.join(keys)} -> {recipe.target!r}: holds NaN or Inf values{cast}"
        if check_finite == "report":
            prepared.notes.append(message)
        else:
            raise NonFiniteError(
                f"{message}; the checkpoint is damaged (pass check_finite=False to load it anyway, or "
                "check_finite='report' to load it and list them in the report)"
            )
    if in_place and _disjoint(target, value):
        return Copy(target, value, keys, nbytes)
    if _made_by_ops(recipe, value, dtype, device, [*views, base]):
        new = value  # a fuse or a permutation already made a new tensor: no second copy
    else:
        new = torch.empty(target.shape, dtype=dtype, device=device)
        _fill(new, value, device, prepared)
    for k in keys:
        source.release(k)
    bar.update(nbytes)
    return _swap(target, new, owners)


def _made_by_ops(
    recipe: Recipe, value: torch.Tensor, dtype: torch.dtype, device: torch.device, inputs: list[torch.Tensor]
) -> bool:
    """Whether ``value`` is a tensor weightport's own ops just allocated, in the final dtype, device and
    layout, sharing memory with none of ``inputs`` (the source's views, the target): then it can be
    the new tensor itself. A user's callable may return anything (a cached constant), so not then."""
    if any(op.fn is not None for op in recipe.ops) or value.dtype != dtype or value.device != device:
        return False
    if not value.is_contiguous() or value.requires_grad:
        return False
    storage = value.untyped_storage()
    if storage.nbytes() != value.numel() * value.element_size() or value.storage_offset():
        return False
    return all(t.untyped_storage().data_ptr() != storage.data_ptr() for t in inputs if t.device == value.device)


def _fill(new: torch.Tensor, value: torch.Tensor, device: torch.device, prepared: _Prepared) -> None:
    """``new.copy_(value)``, through the pinned stager for CUDA."""
    if device.type == "cuda":
        prepared.stager = prepared.stager or Stager()
        prepared.stager.copy(new, value.to(new.dtype))
    else:
        new.copy_(value)


def writable_in_place(t: torch.Tensor) -> bool:
    """Whether ``t.copy_(...)`` can succeed in the commit: not an inference tensor (outside
    inference mode), and no two elements share memory (an ``expand``-ed buffer). A tensor that
    fails this gets a new tensor swapped in instead."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        return False
    if t.is_contiguous():  # the common case, without the loop: dense strides never overlap
        return True
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1)
    span = 1
    for stride, size in dims:  # each dimension must step over everything the smaller ones cover
        if stride < span:
            return False
        span = stride * size
    return True


def _disjoint(dest: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``value``'s memory lies apart from ``dest``'s (or is ``dest`` itself): ``copy_``
    refuses a partial overlap."""
    if dest.device != value.device or dest.numel() == 0 or value.numel() == 0:
        return True
    a, b = _byte_span(dest), _byte_span(value)
    same = dest.data_ptr() == value.data_ptr() and dest.stride() == value.stride() and dest.shape == value.shape
    return same or a[1] <= b[0] or b[1] <= a[0]


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    size = t.element_size()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    return t.data_ptr(), t.data_ptr() + (last + 1) * size


def finite_as_stored(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``value`` holds no NaN or Inf once cast to the dtype it is stored as (1e6 is finite
    in float32 and ``inf`` in float16)."""
    if not (dtype.is_floating_point or dtype.is_complex):
        return True
    stored = value if value.dtype == dtype else value.to(dtype)
    if stored.is_floating_point() and stored.element_size() == 1:  # float8: isfinite has no kernel for it
        stored = stored.float()  # exact: every float8 value is a float32 value
    return bool(torch.isfinite(stored).all())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _read_later(
    prepared: _Prepared, recipe: Recipe, target: torch.Tensor, dtype: torch.dtype, device: torch.device, nbytes: int
) -> torch.Tensor:
    """A new tensor for a plain recipe, with a job to read its source tensor straight into it."""
    # a tuple shape, and no device argument for the CPU: both cut torch.empty's call overhead,
    # which counts with many small tensors
    shape = recipe.shape if recipe.shape is not None else tuple(target.shape)
    if device is _CPU or device.type == "cpu":
        new = torch.empty(shape, dtype=dtype)
    else:
        new = torch.empty(shape, dtype=dtype, device=device)
    prepared.jobs.append(ReadJob(recipe.inputs[0].key, new, nbytes))
    return new


def owners_of(scope: nn.Module) -> Owners:
    found: Owners = {}
    for module in scope.modules():
        for kind in ("_parameters", "_buffers"):
            for attr, t in getattr(module, kind).items():
                if t is not None:
                    found.setdefault(id(t), []).append((module, kind, attr))
    return found


def _swap(old: torch.Tensor, new: torch.Tensor, owners: Owners) -> Swap:
    if isinstance(old, nn.Parameter):
        if type(old) is not nn.Parameter and _can_rebuild(old):  # keep Parameter subclasses
            param = type(old)(new, requires_grad=old.requires_grad)
        else:
            param = _torch_fast.as_parameter(new, old.requires_grad)
        if old.__dict__:
            param.__dict__.update(old.__dict__)
        new = param
    return Swap(old, new, owners.get(id(old), []))


def _can_rebuild(p: nn.Parameter) -> bool:
    try:
        type(p)(torch.empty(0), requires_grad=False)
    except Exception:  # noqa: BLE001 - a custom subclass with another constructor
        return False
    return True


def _convert_other_buffers(plan: TransferPlan, options: ApplyOptions, owners: Owners) -> list[Swap]:
    """Non-persistent buffers follow ``device=`` / ``dtype=`` like the rest of the scope."""
    seen = {id(t.tensor) for t in plan.targets.values()}
    out = []
    for _, b in plan.scope.named_buffers():
        if id(b) in seen or b.is_meta:
            continue
        seen.add(id(b))
        dtype, device = final_place(b, options)
        if (dtype, device) != (b.dtype, b.device):
            out.append(_swap(b, b.to(device=device, dtype=dtype, copy=True), owners))
    return out


# -- commit -----------------------------------------------------------------------------------------


def commit(writes: list[Any], plan: TransferPlan, bar: _progress.Progress) -> None:
    """Every write, each proven possible while preparing: in-place copies into writable, disjoint
    tensors of the same shape, dtype and device, and swaps of new tensors."""
    for w in writes:
        if isinstance(w, Copy):
            w.dest.copy_(w.value)
            _release(plan, w.release)
            bar.update(w.nbytes)
        else:
            _replace(w)


def _release(plan: TransferPlan, keys: tuple[str, ...]) -> None:
    """Let the source drop the pages of ``keys``: a hint, which must not fail the commit."""
    for k in keys:
        try:
            plan.source.release(k)
        except Exception:
            log.debug("releasing %s failed", k, exc_info=True)


def _replace(w: Swap) -> None:
    """Swap the new values into the old tensor object where torch allows it (holders keep seeing
    it), else put the new object in each owner's place (which cannot fail)."""
    old, new = w.old, w.new
    if type(old) is type(new) and _torch_fast.swappable(old) and _torch_fast.swappable(new):
        try:
            _torch_fast.swap(old, new)
            return
        except RuntimeError:  # refused before anything changed: fall back to replacing the object
            log.debug("swapping %s refused; replacing the object", type(old).__name__, exc_info=True)
    for module, kind, attr in w.owners:
        getattr(module, kind)[attr] = new


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then hand it to whatever the process had: the commit is
    never half done, and the process's own SIGINT handling is kept. Python's default handler
    raises ``KeyboardInterrupt`` then; a handler of the process's own is called; an ignored
    SIGINT stays ignored (nothing is held); the system default (``SIG_DFL``) is delivered again."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return
    received: list[Any] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(frame)
        log.warning("interrupt received during the commit; finishing the commit first")

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if previous is signal.default_int_handler:
                raise KeyboardInterrupt
            if previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)
            elif callable(previous):
                previous(signal.SIGINT, received[0])
