"""Whether a plan's targets are sharded, decided without importing torch's distributed packages.

Importing :mod:`torch.distributed.checkpoint` costs about two seconds (it pulls in sympy); a process
that never made a DTensor has not imported :mod:`torch.distributed.tensor`, so it holds none, and
``import weightport`` stays as fast as it was.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weightport.options import ApplyOptions
    from weightport.planning.data import Recipe, Target, TransferPlan
    from weightport.report import TransferReport

__all__ = ["apply_sharded", "is_sharded", "whole_reads_note"]


def is_sharded(targets: dict[str, Target]) -> bool:
    """Whether any target tensor is a DTensor (FSDP2, tensor parallel): then :func:`apply_sharded` applies the plan."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:  # never imported: no tensor of this process is a DTensor
        return False
    dtensor = module.DTensor
    return any(isinstance(t.tensor, dtensor) for t in targets.values())


def whole_reads_note(targets: dict[str, Target], recipes: Iterable[Recipe]) -> tuple[str, ...]:
    """The report's warning naming the sharded targets whose ops have no region map, so that every
    rank that holds part of one reads its inputs whole (the same on every rank)."""
    from torch.distributed.tensor import DTensor

    from weightport.distributed.regions import whole_read_ops

    whole = {}
    for r in recipes:
        if isinstance(targets[r.target].tensor, DTensor) and (ops := whole_read_ops(r)):
            whole[r.target] = ops
    if not whole:
        return ()
    listed = ", ".join(f"{name!r} ({', '.join(ops)})" for name, ops in sorted(whole.items()))
    return (f"read whole on each rank that holds part of them (ops without a region map): {listed}",)


def apply_sharded(plan: TransferPlan, options: ApplyOptions) -> TransferReport:
    """:func:`weightport.distributed.load.apply_sharded`, imported when first needed."""
    from weightport.distributed.load import apply_sharded as apply

    return apply(plan, options)
