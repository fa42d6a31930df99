"""Region maps: which part of each source tensor a part of a target needs.

A rank of a sharded target holds one *box* of it (:data:`~weightport.sources.base.Box`, a
``(start, length)`` per dimension): a block of rows for ``Shard(0)``, of columns for
``Shard(1)``, everything for ``Replicate``. :func:`region_plan` walks a recipe backwards from
that box, op by op, to the box of each source tensor the values come from, and gives a function
that computes exactly the target box from those source boxes, bit for bit what the whole recipe
gives there. Each rank then reads only its source boxes (:meth:`Source.read_region`).

Ops with a region map (the source box they read):

- no op (a rename), ``cast``, ``scale``: the same box.
- ``transpose``, ``permute``: the box with its dimensions permuted (rows of a transposed
  target are columns of the source).
- ``take``, ``unsqueeze``, ``squeeze``: the box with the taken or squeezed dimension put back.
- ops that take rows (entries along one dimension) of their input: ``narrow``, ``split`` (with
  or without ``groups``), ``select``, ``rope_permute`` (rows move within each head) and
  ``gqa_split``: the rows from the first to the last that the box takes, found by running the op
  on the row indices. A ``Shard(0)`` rank of ``k`` split from a grouped-query ``wqkv`` reads from
  its first ``k`` row to its last, not the q and v rows around them; of a ``rope_permute`` target,
  at most its whole heads.
- ``reshape``: the box in the leading dimensions both shapes share (a ``Linear`` weight into a
  ``1x1`` conv, a ``(C, 1, 1)`` scale into ``(C,)``); in the first that differs, the whole runs of
  rows that hold the box's elements (a row of ``(3, 8)`` is two rows of ``(6, 4)``); the
  dimensions after it whole.
- ``pad`` to a value: the box's overlap with the source; the rest is the value.
- fusing inputs (``fuse`` rules, with or without groups): each input reads only its rows inside
  the box, and is not read at all without any (a rank whose rows of a fused ``wqkv`` lie in q
  reads only q).

Reads are boxes, so where the rows a box needs have gaps (rotary pairs, the other parts of a
grouped layout) a read spans them. An empty box (a rank without rows of an unevenly sharded
target) reads nothing.

Every other op has no region map: user callables and the shape adapters (``in_channels``,
``pos_embed``, ``patch_embed``). Such an op reads its input whole (on every rank that needs any
of its output), runs, and keeps the box; ops before it then compute their whole output too.
:func:`whole_read_ops` lists them for the report, and each rank's :class:`RegionPlan` says which
did read whole for it (``whole``). Ops that need the target's current values
(``pad(keep_init=True)``, ``head``, ``vocab``, ``in_channels`` with ``fill='init'``) cannot run
on a sharded target, whose values are spread over the ranks: :func:`region_plan` raises
:class:`~weightport.errors.PlanError`. A recipe with a user callable that cannot run on meta
tensors reads every input whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from weightport.errors import OpError, PlanError
from weightport.mapping.ops import OpCall, fuse
from weightport.planning.data import Recipe, evaluate
from weightport.sources.base import Box, box_slices

__all__ = ["RegionPlan", "region_plan", "whole_read_ops"]

Shape = tuple[int, ...]
Fn = Callable[[torch.Tensor], torch.Tensor]
Step = tuple[Box, Fn]  # the input box an output box needs, and the function from one to the other
RegionMap = Callable[[Box], Step]


class RegionPlan(NamedTuple):
    """How one rank computes its box of a target.

    Attributes:
        reads: Per recipe input, in order: the box of that source tensor to read, or ``None`` when
            the box needs nothing of it.
        compute: The values read (``None`` where ``reads`` is) to a tensor of exactly the box's
            shape and values (it may be a view of a value read).
        whole: Labels of the ops without a region map that read their input whole; ``()`` when
            every read is ranged.
    """

    reads: tuple[Box | None, ...]
    compute: Callable[[Sequence[torch.Tensor | None]], torch.Tensor]
    whole: tuple[str, ...]


# -- box arithmetic --------------------------------------------------------------------------------


def _dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


def _set(box: Box, dim: int, span: tuple[int, int]) -> Box:
    return box[:dim] + (span,) + box[dim + 1 :]


def _whole(shape: Shape) -> Box:
    return tuple((0, n) for n in shape)


def _sizes(box: Box) -> Shape:
    return tuple(n for _, n in box)


def _empty(box: Box) -> bool:
    return any(n == 0 for _, n in box)


def _rerun(op: OpCall, **changes: Any) -> OpCall:
    """``op`` with some parameters changed: the same op on a sub-block."""
    return OpCall(op.op, {**op.params, **changes})


def _pick(dim: int, index: torch.Tensor) -> RegionMap:
    """The map of an op whose output takes the input's entries ``index`` along ``dim`` and keeps
    every other dimension: read from the lowest to the highest entry the box takes, then take them
    (a view when they are one run)."""

    def back(box: Box) -> Step:
        start, length = box[dim]
        want = index[start : start + length]
        low, high = int(want.min()), int(want.max()) + 1
        span = _set(box, dim, (low, high - low))
        if high - low == length and bool((want.diff() == 1).all()):
            return span, lambda x: x
        local = want - low
        return span, lambda x: x.index_select(dim, local.to(x.device))

    return back


def _taken(dim: Callable[[OpCall], int]) -> Callable[[OpCall, Shape, Shape], RegionMap]:
    """The map of an op that takes entries along one dimension (``narrow``, ``split``, ``select``,
    the head layouts): which, by running the op on the indices themselves."""

    def make(op: OpCall, i: Shape, o: Shape) -> RegionMap:
        d = _dim(dim(op), len(i))
        indices = torch.arange(i[d]).reshape([i[d] if k == d else 1 for k in range(len(i))])
        return _pick(d, op.run(indices).flatten())

    return make


# -- the region maps of the ops, by name: (op, input shape, output shape) -> box -> step -----------


def _same(op: OpCall, i: Shape, o: Shape) -> RegionMap:
    return lambda box: (box, op.run)


def _transpose(op: OpCall, i: Shape, o: Shape) -> RegionMap:
    order = list(range(len(o)))
    d0, d1 = _dim(op.params.get("dim0", 0), len(o)), _dim(op.params.get("dim1", 1), len(o))
    order[d0], order[d1] = order[d1], order[d0]
    return lambda box: (tuple(box[order[d]] for d in range(len(o))), op.run)


def _permute(op: OpCall, i: Shape, o: Shape) -> RegionMap:
    source_dim = [_dim(d, len(o)) for d in op.params["dims"]]  # output dim k is input dim source_dim[k]
    where = {d: k for k, d in enumerate(source_dim)}
    return lambda box: (tuple(box[where[d]] for d in range(len(i))), op.run)


def _take(op: OpCall, i: Shape, o: Shape) -> RegionMap:
    dim = _dim(op.params.get("dim", 0), len(i))
    index = op.params["index"] % i[dim]
    first = _rerun(op, index=0)
    return lambda box: (box[:dim] + ((index, 1),) + box[dim:], first.run)


def _unsqueeze(op: OpCall, i: Shape, o: Shape) -> RegionMap:
    dim = _dim(op.params.get("dim", 0), len(o))
    return lambda box: (box[:dim] + box[dim + 1 :], op.run)


def _squeeze(op: OpCall, i: Shape, o: Shape) -> RegionMap:
    dim = _dim(op.params.get("dim", 0), len(i))
    return lambda box: (box[:dim] + ((0, 1),) + box[dim:], op.run)


def _reshape(op: OpCall, i: Shape, o: Shape) -> RegionMap:
    """Dimensions both shapes start with keep the box. At the first that differs, whole units of
    it are read: runs of the input's and the output's rows there of the same elements (rows of
    ``(3, 8)`` and pairs of rows of ``(6, 4)``); the dimensions after it are read whole."""
    keep = next((k for k, (a, b) in enumerate(zip(i, o)) if a != b), min(len(i), len(o)))
    if keep == min(len(i), len(o)):  # the rest is dimensions of size 1

        def rest(box: Box) -> Step:
            sub = OpCall("reshape", {"shape": list(_sizes(box[:keep])) + list(o[keep:])})
            return box[:keep] + _whole(i[keep:]), sub.run

        return rest
    unit = math.lcm(math.prod(i[keep + 1 :]), math.prod(o[keep + 1 :]))  # elements in a run
    per_in, per_out = unit // math.prod(i[keep + 1 :]), unit // math.prod(o[keep + 1 :])

    def back(box: Box) -> Step:
        start, length = box[keep]
        first, end = start // per_out, -(-(start + length) // per_out)
        sub = OpCall("reshape", {"shape": [*_sizes(box[:keep]), (end - first) * per_out, *o[keep + 1 :]]})
        cut = (slice(None),) * keep + (slice(start - first * per_out, None),) + box_slices(box[keep + 1 :])
        read = (first * per_in, (end - first) * per_in)
        return box[:keep] + (read,) + _whole(i[keep + 1 :]), lambda x: sub.run(x)[cut].narrow(keep, 0, length)

    return back


def _pad(op: OpCall, i: Shape, o: Shape) -> RegionMap:
    def back(box: Box) -> Step:
        target = torch.empty(_sizes(box), device="meta")  # pad(value) needs only the shape it fills
        overlap = tuple((min(s, d), min(s + n, d) - min(s, d)) for (s, n), d in zip(box, i))
        return overlap, lambda x: op.run(x, target)

    return back


_REGION_MAPS: dict[str, Callable[[OpCall, Shape, Shape], RegionMap]] = {
    "cast": _same,
    "scale": _same,
    "transpose": _transpose,
    "permute": _permute,
    "take": _take,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "narrow": _taken(lambda op: op.params.get("dim", 0)),
    "split": _taken(lambda op: op.params.get("dim", 0)),
    "select": _taken(lambda op: op.params.get("dim", 0)),
    "rope_permute": _taken(lambda op: 0),
    "gqa_split": _taken(lambda op: 0),
    "reshape": _reshape,
    "pad": _pad,
}

#: Ops declared ``target="value"`` that need only the target's shape with these parameters.
_SHAPE_ONLY: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "pad": lambda p: not p.get("keep_init"),
    "in_channels": lambda p: p.get("map") is None or p.get("fill", "zero") != "init",
}


def _region_map(op: OpCall, i: Shape, o: Shape) -> RegionMap | None:
    make = _REGION_MAPS.get(op.op) if op.fn is None else None
    return None if make is None else make(op, i, o)


def _needs_values(op: OpCall) -> bool:
    return op.target_use == "value" and not _SHAPE_ONLY.get(op.op, lambda p: False)(op.params)


# -- walking a recipe ------------------------------------------------------------------------------


class _Trace(NamedTuple):
    """The shapes a recipe's values take: each input's before and after each of its ops, the
    fused parts, and before and after each ``post`` op (the last is the recipe's)."""

    inputs: list[list[Shape]]
    post: list[Shape]


def _chain_shapes(ops: Sequence[OpCall], x: torch.Tensor, target: torch.Tensor) -> list[Shape]:
    shapes = [tuple(x.shape)]
    for op in ops:
        x = op.run(x, target)
        shapes.append(tuple(x.shape))
    return shapes


def _trace(recipe: Recipe, source_shapes: Sequence[Shape], target: torch.Tensor) -> _Trace:
    """Shapes by running the recipe once on meta tensors (the dtype does not change shapes)."""
    inputs = [
        _chain_shapes(inp.ops, torch.empty(shape, device="meta"), target)
        for inp, shape in zip(recipe.inputs, source_shapes)
    ]
    parts = [torch.empty(shapes[-1], device="meta") for shapes in inputs]
    fused = fuse(parts, recipe.fuse_dim, recipe.fuse_groups) if recipe.fuse_dim is not None else parts[0]
    return _Trace(inputs, _chain_shapes(recipe.post, fused, target))


def _meta_like(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _empty_step(op: OpCall, i: Shape, box: Box, target: torch.Tensor) -> Step:
    """Nothing to compute: read nothing of the input, keep the dtype the op gives."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.empty(_sizes(box), dtype=op.run(_meta_like(x, i), target).dtype, device=x.device)

    return tuple((0, 0) for _ in i), fn


def _whole_step(op: OpCall, i: Shape, box: Box, target: torch.Tensor) -> Step:
    """No region map: run the op on its whole input and keep the box."""
    part = box_slices(box)
    return _whole(i), lambda x: op.run(x, target)[part]


def _chain_back(ops: Sequence[OpCall], shapes: list[Shape], box: Box, target: torch.Tensor, whole: set[str]) -> Step:
    """The box of a chain's input that ``box`` of its output needs, and the function between them.
    Ops without a region map read their input whole (their labels go to ``whole``)."""
    steps: list[Fn] = []
    for op, i, o in reversed(list(zip(ops, shapes, shapes[1:]))):
        region = None if _empty(box) else _region_map(op, i, o)
        if region is not None:
            box, fn = region(box)
        elif _empty(box):
            box, fn = _empty_step(op, i, box, target)
        else:
            whole.add(op.label())
            box, fn = _whole_step(op, i, box, target)
        steps.append(fn)
    steps.reverse()

    def run(x: torch.Tensor) -> torch.Tensor:
        for fn in steps:
            x = fn(x)
        return x

    return box, run


def _fuse_back(
    parts: list[Shape], dim: int | None, groups: int, box: Box
) -> tuple[list[Box | None], Callable[[Sequence[torch.Tensor | None]], torch.Tensor]]:
    """The box of each fused part that ``box`` of the fused tensor needs (``None``: none of it),
    and how to fuse the parts' boxes into it; ``dim=None``: no fuse, the one part is the value."""
    if dim is None:
        return [box], lambda xs: xs[0]  # type: ignore[return-value]  # one input, always read
    dim = _dim(dim, len(parts[0]))
    if _empty(box):

        def nothing(xs: Sequence[torch.Tensor | None]) -> torch.Tensor:
            read = [x for x in xs if x is not None]
            dtype = fuse([_meta_like(x, (0,) * x.dim()) for x in read], dim).dtype
            return torch.empty(_sizes(box), dtype=dtype, device=read[0].device)

        return [tuple((0, 0) for _ in p) for p in parts], nothing
    # which part, and which of its rows, each fused row is: by fusing the indices themselves
    start, length = box[dim]
    owner = fuse([torch.full((p[dim],), k) for k, p in enumerate(parts)], 0, groups)[start : start + length]
    row = fuse([torch.arange(p[dim]) for p in parts], 0, groups)[start : start + length]
    boxes: list[Box | None] = []
    order = torch.empty(length, dtype=torch.long)  # each fused row's place in the parts' boxes, concatenated
    offset = 0
    for k in range(len(parts)):
        mine = owner == k
        if not bool(mine.any()):
            boxes.append(None)
            continue
        low, high = int(row[mine].min()), int(row[mine].max()) + 1
        boxes.append(_set(box, dim, (low, high - low)))
        order[mine] = row[mine] - low + offset
        offset += high - low
    in_order = bool((order == torch.arange(length)).all()) and offset == length

    def join(xs: Sequence[torch.Tensor | None]) -> torch.Tensor:
        out = torch.cat([x for x in xs if x is not None], dim)
        return out if in_order else out.index_select(dim, order.to(out.device))

    return boxes, join


def _check_box(recipe: Recipe, out: Shape, target: torch.Tensor, box: Box) -> None:
    if out != tuple(target.shape):
        raise PlanError(
            f"{recipe.target!r}: the ops produce shape {out} but the target is {tuple(target.shape)}; fix the rule's op"
        )
    if len(box) != len(out) or any(s < 0 or n < 0 or s + n > d for (s, n), d in zip(box, out)):
        raise PlanError(f"{recipe.target!r}: the box {box} lies outside the target's shape {out}")


def _check_values(recipe: Recipe) -> None:
    for op in recipe.ops:
        if _needs_values(op):
            raise PlanError(
                f"{recipe.target!r}: op {op.label()} needs the target's current values, which a sharded "
                "target spreads over its ranks; load into the model before sharding it, or change the "
                "rule to an op that needs no target values (e.g. pad with a value instead of keep_init)"
            )


def _whole_plan(recipe: Recipe, source_shapes: Sequence[Shape], target: torch.Tensor, box: Box) -> RegionPlan:
    """Read every input whole and evaluate the recipe: for recipes that cannot run on meta tensors."""

    def compute(values: Sequence[torch.Tensor | None]) -> torch.Tensor:
        it = iter([v for v in values if v is not None])  # all read: one per input, in order
        return evaluate(recipe, lambda _key: next(it), target)[box_slices(box)]

    return RegionPlan(tuple(_whole(s) for s in source_shapes), compute, whole_read_ops(recipe))


def region_plan(recipe: Recipe, source_shapes: Sequence[tuple[int, ...]], target: torch.Tensor, box: Box) -> RegionPlan:
    """What to read of each source tensor, and how to compute ``box`` of the target from it.

    Args:
        recipe: How the whole target is computed.
        source_shapes: The shape of each recipe input's source tensor, in order.
        target: The target (a meta tensor will do): its global shape and dtype.
        box: The part of the target wanted, ``(start, length)`` per dimension.

    Returns:
        A :class:`RegionPlan`: ``plan.compute`` of the source boxes ``plan.reads`` equals the
        whole recipe's value inside ``box``, bit for bit.

    Raises:
        PlanError: an op needs the target's values, or the box does not fit the target.
        OpError: an op cannot run on the inputs' shapes.
    """
    if len(source_shapes) != len(recipe.inputs):
        raise PlanError(
            f"{recipe.target!r}: {len(source_shapes)} source shapes for a recipe of {len(recipe.inputs)} inputs"
        )
    _check_values(recipe)
    meta = torch.empty(tuple(target.shape), dtype=target.dtype, device="meta")
    shapes = [tuple(int(n) for n in s) for s in source_shapes]
    try:  # lists, or offsets and sizes as torch.Size, will do
        box = tuple((int(s), int(n)) for s, n in box)
    except (TypeError, ValueError):
        raise PlanError(f"{recipe.target!r}: the box {box!r} is not a (start, length) per dimension") from None
    try:
        trace = _trace(recipe, shapes, meta)
    except OpError:  # registered ops run on meta tensors; a user callable may not: read all whole
        if all(op.fn is None for op in recipe.ops):
            raise
        return _whole_plan(recipe, shapes, meta, box)
    _check_box(recipe, trace.post[-1], target, box)
    whole: set[str] = set()
    fused_box, post = _chain_back(recipe.post, trace.post, box, meta, whole)
    parts = [s[-1] for s in trace.inputs]
    part_boxes, join = _fuse_back(parts, recipe.fuse_dim, recipe.fuse_groups, fused_box)
    reads: list[Box | None] = []
    chains: list[Fn | None] = []
    for inp, chain_shapes, part in zip(recipe.inputs, trace.inputs, part_boxes):
        read, chain = (None, None) if part is None else _chain_back(inp.ops, chain_shapes, part, meta, whole)
        reads.append(read)
        chains.append(chain)

    def compute(values: Sequence[torch.Tensor | None]) -> torch.Tensor:
        xs = [None if c is None or v is None else c(v) for c, v in zip(chains, values)]
        return post(join(xs))

    order = dict.fromkeys(op.label() for op in recipe.ops)
    return RegionPlan(tuple(reads), compute, tuple(label for label in order if label in whole))


def whole_read_ops(recipe: Recipe) -> tuple[str, ...]:
    """Labels of the recipe's ops without a region map, which read their input whole on every rank
    that needs part of their output (for the report); the same on every rank."""
    labels = (op.label() for op in recipe.ops if op.fn is not None or op.op not in _REGION_MAPS)
    return tuple(dict.fromkeys(labels))
