"""Applying a plan to a sharded model: stage, agree across ranks, then commit on every rank or none.

Every rank runs the same steps on the same plan (planning reads names and shapes only, so every
rank planned the same transfer):

1. **Stage**: a new local tensor for each loaded target, shaped like the rank's local shard
   (a DTensor with the target's mesh and placements). Ranks agree that staging worked.
2. **Read** with :func:`torch.distributed.checkpoint.load` into the staged tensors, through a
   :class:`~weightport.distributed.reader.PlanReader`: each rank reads only the source boxes its
   shards need. DCP gathers every rank's failure and raises it on all of them.
3. **Check** (``check_finite``) the staged values; ranks agree, and exchange the bytes each read.
4. **Commit**, which cannot fail: copy into materialised local shards in place, or put the staged
   tensors in place of meta ones. Interrupts wait until it ends.

Until every rank has passed step 3 no rank has written anything, so a failure anywhere leaves every
rank's model bitwise unchanged and every rank raises :class:`~weightport.errors.DistributedError`.
Every collective runs on a process group of its own with ``timeout=`` seconds: a rank that stops
answering makes the others raise instead of hang.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import timedelta
from itertools import filterfalse
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from weightport import _progress
from weightport._fresh import fresh_values
from weightport._gc import gc_paused
from weightport.apply import (
    Copy,
    Swap,
    check_unchanged,
    commit,
    finite_as_stored,
    interrupts_deferred,
    materialise_others,
    owners_of,
)
from weightport.distributed.agree import dcp_failures, describe, exchange, failed
from weightport.distributed.reader import PlanReader
from weightport.errors import DistributedError, NonFiniteError, OptionError, PlanError
from weightport.options import ApplyOptions

if TYPE_CHECKING:
    from weightport.planning.data import Recipe, TransferPlan
    from weightport.report import TransferReport

__all__ = ["apply_sharded"]

log = logging.getLogger(__name__)


def apply_sharded(plan: TransferPlan, options: ApplyOptions) -> TransferReport:
    """Perform ``plan`` on a sharded model, on every rank: all ranks change or none does."""
    if plan.applied:
        raise PlanError("this plan was applied already; call weightport.plan(...) again")
    _check_options(options)
    if not dist.is_available() or not dist.is_initialized():
        raise PlanError(
            "the model's parameters are DTensors but no process group is initialised; call "
            "torch.distributed.init_process_group() (torchrun does) before weightport.transfer"
        )
    try:  # a collective too: every rank must arrive within the timeout
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=options.timeout))
    except Exception as e:
        raise DistributedError(
            f"starting a sharded transfer: rank {dist.get_rank()} did not hear from every rank within "
            f"timeout={options.timeout} s ({type(e).__name__}: {e}); every rank must call weightport.transfer "
            "with the same arguments; nothing was changed"
        ) from e
    try:
        with gc_paused():
            return _apply(plan, options, group)
    finally:
        dist.destroy_process_group(group)


def _check_options(options: ApplyOptions) -> None:
    for name in ("dtype", "device"):
        if getattr(options, name) is not None:
            raise OptionError(
                f"{name}= does not apply to a sharded model: its placement and dtype are the device mesh's and "
                "FSDP's; load with the model's own, and set mixed precision in fully_shard(..., mp_policy=...)"
            )
    if options.zero_copy:
        raise OptionError("zero_copy=True does not apply to a sharded model: each rank holds copies of its shards")


def _apply(plan: TransferPlan, options: ApplyOptions, group: Any) -> TransferReport:
    start = time.perf_counter()
    rank = dist.get_rank()
    owners = owners_of(plan.scope)
    check_unchanged(plan, owners)
    recipes = list(plan.recipes.values())
    notes: list[str] = []
    staged: dict[str, torch.Tensor] = {}
    fresh: dict[str, torch.Tensor] = {}
    others: list[Swap] = []  # the model's meta tensors outside the targets (into=, non-persistent buffers)
    fresh_names = _fresh_names(plan, recipes)  # meta-built targets that load nothing
    reader = PlanReader(plan.source, recipes, {r.target: plan.targets[r.target].tensor for r in recipes})

    # 1. stage; the ranks agree, and on rank 0's seed for the tensors that load nothing
    failure = _attempt(lambda: _stage(plan, options, recipes, staged, others, notes))
    seed = _agree(group, failure, "preparing", _seed_if(fresh_names))[0][1]
    # 2. read: DCP agrees on failures itself, raising CheckpointException (a BaseException) on every rank
    try:
        dcp.load(staged, storage_reader=reader, process_group=group)
    except dcp.CheckpointException as e:
        raise _from_dcp(e) from None
    except Exception as e:  # a collective timed out, or the process group failed
        raise DistributedError(f"reading the shards failed on rank {rank}: {type(e).__name__}: {e}") from e

    # 3. initialise, check, agree, and exchange the bytes read
    def initialise_and_check() -> None:
        _fresh(plan, fresh_names, int(seed), fresh, notes)
        _check_finite(plan, recipes, staged, options, notes)

    failure = _attempt(initialise_and_check)
    answers = _agree(group, failure, "checking", reader.bytes_read)
    writes = [_write(plan.targets[r.target].tensor, staged[r.target], r, owners) for r in recipes]
    writes.extend(_write(plan.targets[n].tensor, t, None, owners) for n, t in fresh.items())
    writes.extend(others)
    ready = time.perf_counter()
    per_rank = tuple(int(a[1]) for a in answers)
    stats = {"prepare_s": ready - start, "bytes_loaded": float(reader.bytes_read), "world_size": float(len(answers))}
    report = replace(
        plan.report,
        applied=True,
        stats=stats,
        bytes_read_per_rank=per_rank,
        warnings=plan.report.warnings + tuple(notes),
    )
    # 4. commit: nothing here can fail
    with _progress.progress(False, 0, desc="weightport: committing") as bar, interrupts_deferred(), torch.no_grad():
        commit(writes, plan, bar)
        plan.applied = True
    stats.update(commit_s=time.perf_counter() - ready, seconds=time.perf_counter() - start)
    return report


def _attempt(step: Any) -> str | None:
    """Run ``step``; its failure as a message for the other ranks (``None``: it worked)."""
    try:
        step()
    except Exception as e:  # a WeightportError, out of memory, a torch error: every rank must hear of it
        log.debug("a sharded transfer step failed", exc_info=True)
        return f"{type(e).__name__}: {e}"
    return None


def _agree(group: Any, failure: str | None, step: str, value: float = 0) -> list[tuple[str | None, Any]]:
    """Every rank's ``(failure, value)``; raises :class:`DistributedError` on every rank if any rank failed."""
    try:
        answers = exchange(failure, value, group)
    except Exception as e:
        raise DistributedError(
            f"{step} a sharded transfer: rank {dist.get_rank()} heard nothing from the other ranks "
            f"({type(e).__name__}: {e}); nothing was changed on this rank"
        ) from e
    failures = failed(answers)
    if failures:
        listed = describe(failures, len(answers))
        raise DistributedError(f"{step} a sharded transfer failed, so no rank changed its model: {listed}", failures)
    return answers


def _from_dcp(e: BaseException) -> DistributedError:
    failures = dcp_failures(e)
    return DistributedError(f"reading the shards failed, so no rank changed its model: {describe(failures)}", failures)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _stage(
    plan: TransferPlan,
    options: ApplyOptions,
    recipes: list[Recipe],
    staged: dict[str, torch.Tensor],
    others: list[Swap],
    notes: list[str],
) -> None:
    """New tensors shaped like each loaded target's local shard, and values for the model's meta
    tensors outside the targets (non-persistent buffers, outside ``into=``) on the mesh's device."""
    for recipe in recipes:
        t = plan.targets[recipe.target].tensor
        local = _local(t)
        new = torch.empty(local.shape, dtype=t.dtype, device=_device(t))
        if isinstance(t, DTensor):
            new = DTensor.from_local(
                new, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        staged[recipe.target] = new
    if plan.materialise is not None and plan.targets:
        device = _device(next(t.tensor for t in plan.targets.values() if isinstance(t.tensor, DTensor)))
        others.extend(materialise_others(plan, replace(options, device=device), notes))


def _fresh_names(plan: TransferPlan, recipes: list[Recipe]) -> list[str]:
    """The meta-built targets that load nothing."""
    loaded = {r.target for r in recipes}
    targets = plan.targets
    return [
        n for n in filterfalse(loaded.__contains__, targets) if targets[n].canonical == n and targets[n].tensor.is_meta
    ]


def _seed_if(names: list[str]) -> int:
    """A seed for initialising ``names`` (one draw of this rank's generator), or 0 when there are none."""
    return int(torch.randint(0, 2**62, ())) if names else 0


def _fresh(plan: TransferPlan, names: list[str], seed: int, out: dict[str, torch.Tensor], notes: list[str]) -> None:
    """Initial values for the meta-built targets that load nothing, as their modules' own
    initialisation gives them, computed whole on every rank from rank 0's ``seed`` (so every rank
    computes the same tensor) and cut to the rank's shard: a fresh sharded tensor is held whole
    for a moment, on every rank."""
    if not names:
        return
    devices = (
        [torch.cuda.current_device()] if any(_device(plan.targets[n].tensor).type == "cuda" for n in names) else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        values = fresh_values(plan.scope, names, lambda t: (t.dtype, _device(t)), notes)
    for name, value in values.items():
        t = plan.targets[name].tensor
        if isinstance(t, DTensor):
            value = distribute_tensor(
                value, t.device_mesh, t.placements, src_data_rank=None
            )  # this rank's part, no collective
        out[name] = value


def _device(t: torch.Tensor) -> torch.device:
    """Where a staged tensor for ``t`` lives: its local shard's device, or for a meta-built DTensor
    its mesh's device type (the current CUDA device for ``"cuda"``)."""
    local = _local(t)
    if not local.is_meta:
        return local.device
    kind = t.device_mesh.device_type if isinstance(t, DTensor) else "cpu"
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def _check_finite(
    plan: TransferPlan, recipes: list[Recipe], staged: dict[str, torch.Tensor], options: ApplyOptions, notes: list[str]
) -> None:
    if not options.check_finite:
        return
    bad = [r for r in recipes if not finite_as_stored(_local(staged[r.target]), staged[r.target].dtype)]
    if not bad:
        return
    message = "holds NaN or Inf values in this rank's shard: " + ", ".join(repr(r.target) for r in bad)
    if options.check_finite == "report":
        notes.append(message)
        return
    raise NonFiniteError(
        f"{message}; the checkpoint is damaged (pass check_finite=False to load it anyway, or "
        "check_finite='report' to load it and list them in the report)"
    )


def _write(old: torch.Tensor, new: torch.Tensor, recipe: Recipe | None, owners: Any) -> Copy | Swap:
    """The commit step for one target: an in-place copy into a materialised local shard, or the new
    tensor in place of a meta one (FSDP2 takes the new parameter up when it next initialises)."""
    if not _local(old).is_meta:
        keys = tuple(i.key for i in recipe.inputs) if recipe is not None else ()
        return Copy(_local(old), _local(new), keys, 0)
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    return Swap(old, new, owners.get(id(old), []))
