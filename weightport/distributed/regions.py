"""STAND-IN (replaced by the region-map module): every input read whole, the box cut from the result."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from weightport.planning.data import Recipe, evaluate
from weightport.sources.base import Box, box_slices


class RegionPlan(NamedTuple):
    reads: tuple[Box | None, ...]
    compute: Callable[[Sequence[torch.Tensor | None]], torch.Tensor]
    whole: tuple[str, ...]


def region_plan(recipe: Recipe, source_shapes: Sequence[tuple[int, ...]], target: torch.Tensor, box: Box) -> RegionPlan:
    reads = tuple(tuple((0, n) for n in shape) for shape in source_shapes)
    keys = [i.key for i in recipe.inputs]

    def compute(values: Sequence[torch.Tensor | None]) -> torch.Tensor:
        by_key = dict(zip(keys, values))
        return evaluate(recipe, lambda k: by_key[k], target)[box_slices(box)]  # type: ignore[return-value,arg-type]

    return RegionPlan(reads, compute, whole_read_ops(recipe))


def whole_read_ops(recipe: Recipe) -> tuple[str, ...]:
    return tuple(op.label() for op in recipe.ops)
