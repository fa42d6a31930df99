"""Region maps (weightport.distributed.regions): a box of a target from boxes of its sources.

The property: for random recipes (op chains, fuses with and without groups, post ops) and random
boxes, computing from the planned source boxes gives exactly the whole recipe's value in the box.
The examples pin the read boxes of the cases sharded loading relies on.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightport.distributed.regions import RegionPlan, region_plan, whole_read_ops
from weightport.errors import OpError, PlanError
from weightport.mapping.ops import OpCall
from weightport.planning.data import Input, Recipe, evaluate
from weightport.sources.base import Box, box_slices

Shape = tuple[int, ...]


def _op(name: str, **params: object) -> OpCall:
    return OpCall.make(name, params, "test")


def _flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(0)


def _recipe(
    inputs: Sequence[Input], post: Sequence[OpCall] = (), fuse_dim: int | None = None, groups: int = 1
) -> Recipe:
    return Recipe("t", tuple(inputs), fuse_dim, tuple(post), None, None, groups)


def _values(shapes: Sequence[Shape], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).mul(8).to(dtype) for s in shapes]


def _meta(shape: Shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _check(
    recipe: Recipe,
    shapes: Sequence[Shape],
    box: Box,
    target: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> RegionPlan:
    """The plan for ``box``, after checking it against the whole recipe, bit for bit."""
    values = _values(shapes, dtype)
    keys = {inp.key: v for inp, v in zip(recipe.inputs, values)}
    if target is None:
        target = _meta(tuple(evaluate(recipe, lambda k: _meta(tuple(keys[k].shape)), _meta(())).shape))
    plan = region_plan(recipe, shapes, target, box)
    assert len(plan.reads) == len(shapes)
    for read, shape in zip(plan.reads, shapes):
        assert read is None or len(read) == len(shape)
        assert read is None or all(0 <= s and s + n <= d for (s, n), d in zip(read, shape))
    got = plan.compute([None if r is None else v[box_slices(r)].clone() for r, v in zip(plan.reads, values)])
    want = evaluate(recipe, keys.__getitem__, target)[box_slices(box)]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    return plan


def _rows(start: int, length: int, shape: Shape) -> Box:
    """A Shard(0) box: rows, whole in every other dimension."""
    return ((start, length),) + tuple((0, n) for n in shape[1:])


# -- exact read boxes --------------------------------------------------------------------------------


def test_plain_rows_read_the_same_rows():
    plan = _check(_recipe([Input("w")]), [(10, 4)], _rows(3, 4, (10, 4)))
    assert plan.reads == (((3, 4), (0, 4)),) and plan.whole == ()


def test_plain_columns_read_the_same_columns():
    plan = _check(_recipe([Input("w")]), [(10, 4)], ((0, 10), (2, 2)))
    assert plan.reads == (((0, 10), (2, 2)),)


def test_cast_and_scale_read_the_same_box():
    recipe = _recipe([Input("w", (_op("cast", dtype="bfloat16"), _op("scale", factor=0.5)))])
    plan = _check(recipe, [(10, 4)], ((3, 4), (1, 2)))
    assert plan.reads == (((3, 4), (1, 2)),) and plan.whole == ()


def test_rows_of_a_transposed_target_read_columns_of_the_source():
    plan = _check(_recipe([Input("w", (_op("transpose"),))]), [(4, 10)], _rows(3, 4, (10, 4)))
    assert plan.reads == (((0, 4), (3, 4)),)


def test_permute_moves_the_box_with_the_dimensions():
    recipe = _recipe([Input("w", (_op("permute", dims=[2, 0, 1]),))])
    plan = _check(recipe, [(3, 4, 5)], ((1, 2), (0, 3), (1, 2)))
    assert plan.reads == (((0, 3), (1, 2), (1, 2)),)


def test_fused_qkv_rows_inside_q_read_only_q():
    recipe = _recipe([Input("q"), Input("k"), Input("v")], fuse_dim=0)
    shapes = [(8, 4), (4, 4), (4, 4)]
    assert _check(recipe, shapes, _rows(0, 8, (16, 4))).reads == (((0, 8), (0, 4)), None, None)
    assert _check(recipe, shapes, _rows(6, 4, (16, 4))).reads == (((6, 2), (0, 4)), ((0, 2), (0, 4)), None)
    assert _check(recipe, shapes, _rows(12, 4, (16, 4))).reads == (None, None, ((0, 4), (0, 4)))


def test_fuse_along_columns_reads_each_input_s_overlap():
    recipe = _recipe([Input("a"), Input("b")], fuse_dim=-1)
    plan = _check(recipe, [(3, 4), (3, 2)], ((1, 2), (3, 2)))
    assert plan.reads == (((1, 2), (3, 1)), ((1, 2), (0, 1)))


def test_grouped_fuse_reads_each_input_s_rows_in_the_box():
    # 2 groups of (4 q, 2 k, 2 v) rows: q0-3 k0-1 v0-1 | q4-7 k2-3 v2-3
    recipe = _recipe([Input("q"), Input("k"), Input("v")], fuse_dim=0, groups=2)
    shapes = [(8, 4), (4, 4), (4, 4)]
    group0 = (((0, 4), (0, 4)), ((0, 2), (0, 4)), ((0, 2), (0, 4)))
    assert _check(recipe, shapes, _rows(0, 8, (16, 4))).reads == group0
    assert _check(recipe, shapes, _rows(5, 2, (16, 4))).reads == (None, ((1, 1), (0, 4)), ((0, 1), (0, 4)))
    assert _check(recipe, shapes, _rows(6, 4, (16, 4))).reads == (((4, 2), (0, 4)), None, ((0, 2), (0, 4)))
    whole = (((0, 8), (0, 4)), ((0, 4), (0, 4)), ((0, 4), (0, 4)))
    assert _check(recipe, shapes, _rows(0, 16, (16, 4))).reads == whole


def test_a_grouped_wqkv_of_rotated_q_and_k_gives_each_rank_its_kv_groups():
    # torchtitan's fused wqkv from Hugging Face q, k, v: 4 q heads and 2 kv heads of 8 rows, per kv group
    inputs = [Input("q", (_op("rope_permute", heads=4),)), Input("k", (_op("rope_permute", heads=2),)), Input("v")]
    recipe = _recipe(inputs, fuse_dim=0, groups=2)
    shapes = [(32, 6), (16, 6), (16, 6)]
    rank0, rank1 = _rows(0, 32, (64, 6)), _rows(32, 32, (64, 6))
    assert _check(recipe, shapes, rank0).reads == (((0, 16), (0, 6)), ((0, 8), (0, 6)), ((0, 8), (0, 6)))
    assert _check(recipe, shapes, rank1).reads == (((16, 16), (0, 6)), ((8, 8), (0, 6)), ((8, 8), (0, 6)))
    assert _check(recipe, shapes, _rows(16, 8, (64, 6))).reads == (None, ((0, 8), (0, 6)), None)  # group 0's k


def test_rope_permute_reads_the_rows_of_the_heads_in_the_box():
    # interleaved, 4 rows a head: a head's rows 0, 1, 2, 3 are its rows 0, 2, 1, 3 in the source
    recipe = _recipe([Input("wq", (_op("rope_permute", heads=4),))])
    assert _check(recipe, [(16, 6)], _rows(5, 6, (16, 6))).reads == (((5, 6), (0, 6)),)
    assert _check(recipe, [(16, 6)], _rows(1, 1, (16, 6))).reads == (((2, 1), (0, 6)),)
    assert _check(recipe, [(16, 6)], ((8, 4), (2, 3))).reads == (((8, 4), (2, 3)),)
    half = _recipe([Input("wq", (_op("rope_permute", heads=2, to="half"),))])
    assert _check(half, [(8, 6)], _rows(0, 2, (8, 6))).reads == (((0, 3), (0, 6)),)  # rows 0 and 2


def test_split_reads_the_part_s_rows():
    recipe = _recipe([Input("w", (_op("split", index=1, count=3, dim=0),))])
    assert _check(recipe, [(12, 2)], _rows(1, 2, (4, 2))).reads == (((5, 2), (0, 2)),)


def test_grouped_split_reads_from_the_first_to_the_last_row_it_takes():
    # 2 groups of (4 q, 2 k, 2 v) rows; k is rows 4..6 and 12..14
    recipe = _recipe([Input("wqkv", (_op("split", index=1, count=3, dim=0, sizes=[8, 4, 4], groups=2),))])
    assert _check(recipe, [(16, 3)], _rows(0, 2, (4, 3))).reads == (((4, 2), (0, 3)),)
    assert _check(recipe, [(16, 3)], _rows(3, 1, (4, 3))).reads == (((13, 1), (0, 3)),)
    assert _check(recipe, [(16, 3)], _rows(1, 2, (4, 3))).reads == (((5, 8), (0, 3)),)


def test_gqa_split_reads_from_the_first_to_the_last_row_it_takes():
    # 2 kv groups of (2 q, 1 k, 1 v) heads of 2 rows: q0-3 k0-1 v0-1 | q4-7 k2-3 v2-3
    q = _recipe([Input("qkv", (_op("gqa_split", heads=4, kv_heads=2, head_dim=2, part="q"),))])
    assert _check(q, [(16, 3)], _rows(4, 3, (8, 3))).reads == (((8, 3), (0, 3)),)
    k = _recipe([Input("qkv", (_op("gqa_split", heads=4, kv_heads=2, head_dim=2, part="k"),))])
    assert _check(k, [(16, 3)], _rows(2, 2, (4, 3))).reads == (((12, 2), (0, 3)),)
    assert _check(k, [(16, 3)], _rows(1, 2, (4, 3))).reads == (((5, 8), (0, 3)),)


def test_take_narrow_select_and_squeezes_shift_the_box():
    take = _recipe([Input("experts", (_op("take", index=-1, dim=0),))])
    assert _check(take, [(3, 6, 2)], _rows(2, 3, (6, 2))).reads == (((2, 1), (2, 3), (0, 2)),)
    narrow = _recipe([Input("w", (_op("narrow", dim=1, start=2, length=3),))])
    assert _check(narrow, [(4, 6)], ((1, 2), (1, 2))).reads == (((1, 2), (3, 2)),)
    select = _recipe([Input("w", (_op("select", index=[5, 1, 3, 0]),))])
    assert _check(select, [(6, 2)], _rows(1, 2, (4, 2))).reads == (((1, 3), (0, 2)),)
    squeezes = _recipe([Input("b", (_op("unsqueeze", dim=-1), _op("squeeze", dim=1)))])
    assert _check(squeezes, [(7,)], ((2, 3),)).reads == (((2, 3),),)


def test_negative_dims_count_from_the_end():
    recipe = _recipe([Input("w", (_op("transpose", dim0=-1, dim1=-2), _op("narrow", dim=-1, start=-3, length=2)))])
    assert _check(recipe, [(2, 5, 4)], ((1, 1), (1, 2), (0, 2))).reads == (((1, 1), (2, 2), (1, 2)),)
    take = _recipe([Input("w", (_op("take", index=-2, dim=-1),))])
    assert _check(take, [(3, 4)], ((1, 2),)).reads == (((1, 2), (2, 1)),)


def test_a_scalar_target_reads_one_element():
    recipe = _recipe([Input("scales", (_op("take", index=2),))])
    plan = _check(recipe, [(4,)], ())
    assert plan.reads == (((2, 1),),)
    assert _check(_recipe([Input("s")]), [()], ()).reads == ((),)


def test_reshape_keeping_the_rows_reads_only_the_rows():
    recipe = _recipe([Input("fc", (_op("reshape", shape=[4, 2, 3, 3]),))])  # a Linear into a 3x3 conv
    plan = _check(recipe, [(4, 18)], _rows(1, 2, (4, 2, 3, 3)))
    assert plan.reads == (((1, 2), (0, 18)),) and plan.whole == ()


def test_pad_reads_only_the_overlap():
    recipe = _recipe([Input("w")], post=[_op("pad", value=-1.0)])
    target = _meta((6, 4))
    assert _check(recipe, [(4, 3)], ((2, 3), (1, 3)), target).reads == (((2, 2), (1, 2)),)
    assert _check(recipe, [(4, 3)], _rows(4, 2, (6, 4)), target).reads == (((4, 0), (0, 3)),)


def test_an_op_without_a_region_map_reads_its_input_whole():
    recipe = _recipe([Input("w", (_op("transpose"), OpCall.make(_flip, {}, "test")))])
    plan = _check(recipe, [(4, 10)], _rows(3, 4, (10, 4)))
    assert plan.reads == (((0, 4), (0, 10)),) and plan.whole == ("_flip",)
    assert whole_read_ops(recipe) == ("_flip",)


@pytest.mark.parametrize(
    ("adapter", "source", "target", "box"),
    [
        ("pos_embed", (1, 17, 8), (1, 26, 8), ((0, 1), (0, 26), (4, 4))),
        ("patch_embed", (4, 3, 4, 4), (4, 3, 6, 6), ((2, 2), (0, 3), (0, 6), (0, 6))),
    ],
)
def test_an_adapter_needing_the_target_s_shape_runs_on_its_whole_input(adapter, source, target, box):
    recipe = _recipe([Input("w", (_op(adapter),))])
    plan = _check(recipe, [source], box, _meta(target))
    assert plan.reads == (tuple((0, n) for n in source),) and plan.whole == (_op(adapter).label(),)


def test_a_reshape_of_the_leading_dimension_reads_whole_runs_of_rows():
    recipe = _recipe([Input("w", (_op("reshape", shape=[6, 4]),))])  # a row of the source is two of the target
    assert _check(recipe, [(3, 8)], _rows(2, 2, (6, 4))).reads == (((1, 1), (0, 8)),)
    plan = _check(recipe, [(3, 8)], ((1, 2), (1, 2)))
    assert plan.reads == (((0, 2), (0, 8)),) and plan.whole == ()
    experts = _recipe([Input("w", (_op("reshape", shape=[4, 6, 2]),))])  # (experts * rows, ...) unflattened
    assert _check(experts, [(24, 2)], ((1, 2), (0, 6), (0, 2))).reads == (((6, 12), (0, 2)),)


def test_a_fused_input_not_needed_is_not_read_even_through_an_op_without_a_map():
    recipe = _recipe([Input("q"), Input("k", (OpCall.make(_flip, {}, "test"),))], fuse_dim=0)
    plan = _check(recipe, [(4, 2), (4, 2)], _rows(0, 4, (8, 2)))
    assert plan.reads == (((0, 4), (0, 2)), None) and plan.whole == ()
    assert whole_read_ops(recipe) == ("_flip",)


def test_a_callable_that_cannot_run_on_meta_reads_everything_whole():
    def numpy_only(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2)

    recipe = _recipe([Input("w", (OpCall.make(numpy_only, {}, "test"),))])
    plan = _check(recipe, [(6, 2)], _rows(1, 2, (6, 2)), _meta((6, 2)))
    assert plan.reads == (((0, 6), (0, 2)),) and plan.whole == ("numpy_only",)


@pytest.mark.parametrize(
    "op",
    [
        _op("pad", keep_init=True),
        _op("head"),
        _op("vocab"),
        _op("in_channels", map=[0, -1], fill="init"),
    ],
)
def test_an_op_needing_the_target_s_values_cannot_be_planned(op):
    with pytest.raises(PlanError, match=re.escape(op.label()) + r".*needs the target's current values.*sharded"):
        region_plan(_recipe([Input("w")], post=[op]), [(4, 3)], _meta((6, 3)), _rows(0, 3, (6, 3)))


def test_in_channels_without_init_reads_whole():
    recipe = _recipe([Input("conv", (_op("in_channels", channels=1),))])
    plan = _check(recipe, [(4, 3, 2, 2)], _rows(1, 2, (4, 1, 2, 2)), _meta((4, 1, 2, 2)))
    assert plan.reads == (_rows(0, 4, (4, 3, 2, 2)),) and plan.whole == ("in_channels",)


def test_a_box_covering_everything_reads_every_input_whole():
    recipe = _recipe(
        [Input("q", (_op("rope_permute", heads=2),)), Input("k", (_op("rope_permute", heads=1),))], fuse_dim=0
    )
    plan = _check(recipe, [(8, 4), (4, 4)], _rows(0, 12, (12, 4)))
    assert plan.reads == (((0, 8), (0, 4)), ((0, 4), (0, 4)))


def test_an_empty_box_reads_nothing_and_keeps_the_dtype():
    recipe = _recipe([Input("q", (_op("rope_permute", heads=2), _op("cast", dtype="float16"))), Input("k")], fuse_dim=0)
    plan = _check(recipe, [(8, 4), (4, 4)], _rows(12, 0, (12, 4)))
    assert all(math.prod(n for _, n in r) == 0 for r in plan.reads if r is not None)


def test_a_box_outside_the_target_or_a_wrong_shape_is_a_plan_error():
    recipe = _recipe([Input("w")])
    with pytest.raises(PlanError, match="outside the target's shape"):
        region_plan(recipe, [(4, 3)], _meta((4, 3)), ((2, 3), (0, 3)))
    with pytest.raises(PlanError, match=r"produce shape \(4, 3\) but the target is \(3, 4\)"):
        region_plan(recipe, [(4, 3)], _meta((3, 4)), ((0, 3), (0, 4)))
    with pytest.raises(PlanError, match="2 source shapes for a recipe of 1 inputs"):
        region_plan(recipe, [(4, 3), (4, 3)], _meta((4, 3)), ((0, 4), (0, 3)))


# -- the property: random recipes, random boxes ------------------------------------------------------

_SIZES = st.sampled_from([1, 2, 3, 4, 6, 8, 12])
_MAX_NUMEL = 2000


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _draw_op(data: st.DataObject, shape: Shape) -> OpCall | None:
    """An op that runs on ``shape`` (None when the drawn kind does not fit it)."""
    n = len(shape)
    draw = data.draw
    kind = draw(
        st.sampled_from(
            [
                "cast",
                "scale",
                "transpose",
                "permute",
                "narrow",
                "take",
                "unsqueeze",
                "squeeze",
                "split",
                "rope_permute",
                "gqa_split",
                "select",
                "reshape",
                "callable",
            ]
        )
    )
    dim = draw(st.integers(-n, n - 1)) if n else 0
    size = shape[dim] if n else 0
    if kind == "cast":
        return _op("cast", dtype=draw(st.sampled_from(["float64", "bfloat16", "float16"])))
    if kind == "scale":
        return _op("scale", factor=draw(st.sampled_from([0.5, -3.0, 1.7])))
    if kind == "callable":
        return OpCall.make(_flip, {}, "test") if n else None
    if kind == "transpose" and n >= 2:
        return _op("transpose", dim0=dim, dim1=draw(st.integers(-n, n - 1)))
    if kind == "permute" and n >= 2:
        return _op("permute", dims=list(draw(st.permutations(range(n)))))
    if kind == "narrow" and n and size:
        start = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, size - start))
        return _op("narrow", dim=dim, start=start - draw(st.sampled_from([0, size])), length=length)
    if kind == "take" and n >= 2:
        return _op("take", dim=dim, index=draw(st.integers(-size, size - 1)))
    if kind == "unsqueeze" and n <= 3:
        return _op("unsqueeze", dim=draw(st.integers(-n - 1, n)))
    if kind == "squeeze" and n and size == 1:
        return _op("squeeze", dim=dim)
    if kind == "select" and n and size:
        return _op("select", dim=dim, index=draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=5)))
    if kind == "split" and n and size:
        groups = draw(st.sampled_from(_divisors(size)))
        block = size // groups
        count = draw(st.integers(1, min(block, 3)))
        cuts = sorted(
            draw(st.lists(st.integers(1, max(block - 1, 1)), min_size=count - 1, max_size=count - 1, unique=True))
        )
        sizes = [(b - a) * groups for a, b in zip([0, *cuts], [*cuts, block])]
        params = {"sizes": sizes} if draw(st.booleans()) or block % count else {}
        dim = dim % n if groups > 1 else dim  # ops.split with groups misreads a negative dim
        return _op("split", dim=dim, index=draw(st.integers(0, count - 1)), count=count, groups=groups, **params)
    if kind == "rope_permute" and n:
        heads = [h for h in _divisors(shape[0]) if shape[0] // h % 2 == 0]
        if heads:
            to = draw(st.sampled_from(["interleaved", "half"]))
            return _op("rope_permute", heads=draw(st.sampled_from(heads)), to=to)
    if kind == "gqa_split" and n:
        rows = shape[0]
        splits = [(kv, hd) for kv in _divisors(rows) for hd in _divisors(rows // kv) if rows // kv // hd >= 3]
        if splits:
            kv, hd = draw(st.sampled_from(splits))
            heads = kv * (shape[0] // kv // hd - 2)
            return _op("gqa_split", heads=heads, kv_heads=kv, head_dim=hd, part=draw(st.sampled_from(["q", "k", "v"])))
    if kind == "reshape" and n:
        keep = draw(st.integers(0, n - 1))
        rest = math.prod(shape[keep:])
        split = draw(st.sampled_from(_divisors(rest)))
        return _op("reshape", shape=[*shape[:keep], split, rest // split])
    return None


def _draw_chain(data: st.DataObject, shape: Shape, length: int) -> tuple[list[OpCall], Shape]:
    ops: list[OpCall] = []
    x = _meta(shape)
    for _ in range(length):
        op = _draw_op(data, tuple(x.shape))
        if op is None:
            continue
        y = op.run(x, x)
        if 0 < y.numel() <= _MAX_NUMEL:
            ops.append(op)
            x = y
    return ops, tuple(x.shape)


def _draw_fused_inputs(data: st.DataObject) -> tuple[list[Input], list[Shape], int, int]:
    """Inputs whose chains end in shapes that fuse along a drawn dim, and their source shapes."""
    draw = data.draw
    part = list(draw(st.lists(_SIZES, min_size=1, max_size=3)))
    dim = draw(st.integers(-len(part), len(part) - 1))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    inputs, shapes = [], []
    for k in range(draw(st.integers(1, 3))):
        part[dim] = groups * draw(st.sampled_from([1, 2, 4]))
        shape, ops = tuple(part), []
        how = draw(st.sampled_from(["plain", "transpose", "take", "narrow", "split", "rope"]))
        if how == "transpose" and len(shape) >= 2:
            shape, ops = (shape[1], shape[0], *shape[2:]), [_op("transpose")]
        elif how == "take":
            shape, ops = (3, *shape), [_op("take", index=draw(st.integers(-3, 2)))]
        elif how == "narrow":
            shape, ops = (shape[0] + 2, *shape[1:]), [_op("narrow", start=draw(st.integers(0, 2)), length=shape[0])]
        elif how == "split":
            shape, ops = (shape[0] * 2, *shape[1:]), [_op("split", index=draw(st.integers(0, 1)), count=2)]
        elif how == "rope" and shape[0] % 2 == 0:
            heads = [h for h in _divisors(shape[0]) if shape[0] // h % 2 == 0]
            ops = [_op("rope_permute", heads=draw(st.sampled_from(heads)))]
        inputs.append(Input(f"in{k}", tuple(ops)))
        shapes.append(shape)
    return inputs, shapes, dim, groups


@st.composite
def _recipes(draw: st.DrawFn) -> tuple[Recipe, list[Shape], torch.Tensor]:
    data = draw(st.data())
    if draw(st.booleans()):
        shape = tuple(draw(st.lists(_SIZES, min_size=1, max_size=3)))
        ops, out = _draw_chain(data, shape, draw(st.integers(0, 4)))
        inputs, shapes, fuse_dim, groups = [Input("in0", tuple(ops))], [shape], None, 1
    else:
        inputs, shapes, fuse_dim, groups = _draw_fused_inputs(data)
        parts = [evaluate(_recipe([i]), lambda k, s=s: _meta(s), _meta(())) for i, s in zip(inputs, shapes)]
        out = tuple(torch.cat(parts, fuse_dim).shape)
    post, out = _draw_chain(data, out, draw(st.integers(0, 2)))
    if draw(st.integers(0, 4)) == 0:  # pad to a larger target
        out = tuple(d + draw(st.integers(0, 2)) for d in out)
        post.append(_op("pad", value=draw(st.sampled_from([-1.0, 2.5]))))  # never an id
    return _recipe(inputs, post, fuse_dim, groups), shapes, _meta(out)


@st.composite
def _boxes(draw: st.DrawFn, shape: Shape) -> Box:
    """Mostly non-empty boxes; a rank's rows (whole in the other dimensions) a third of the time."""
    rows = draw(st.integers(0, 2)) == 0
    box = []
    for k, d in enumerate(shape):
        if rows and k:
            box.append((0, d))
            continue
        start = draw(st.integers(0, d) if draw(st.integers(0, 9)) == 0 else st.integers(0, d - 1))
        box.append((start, draw(st.integers(min(1, d - start), d - start))))
    return tuple(box)


def _any_box_of_any_recipe(data: st.DataObject) -> None:
    recipe, shapes, target = data.draw(_recipes())
    box = data.draw(_boxes(tuple(target.shape)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.int32]))
    plan = _check(recipe, shapes, box, target, dtype)
    assert set(plan.whole) <= set(whole_read_ops(recipe))
    if _tight(recipe) and math.prod(n for _, n in box):
        _assert_tight(recipe, shapes, target, box, plan)


#: Ops that only move, pick or pad values (a source element's id survives them), and those of
#: them whose rows in a box come from rows with gaps between them.
_MOVES = {"transpose", "permute", "narrow", "take", "unsqueeze", "squeeze", "split", "select", "pad"}
_GAPS = {"select", "rope_permute", "gqa_split"}


def _tight(recipe: Recipe) -> bool:
    """Whether the read boxes are the bounding boxes of what the box needs: a box is all an op
    learns of what the next needs, so behind an op that leaves gaps, a fuse or another such op
    reads rows of the gaps (e.g. a fuse before a ``rope_permute``)."""
    ops = list(recipe.ops)
    if not all(op.op in _MOVES | _GAPS for op in ops):
        return False
    gaps = [op for op in ops if op.op in _GAPS or op.params.get("groups", 1) > 1]
    return len(gaps) == 0 or (len(gaps) == 1 and not (recipe.fuse_dim is not None and gaps[0] in recipe.post))


def _assert_tight(recipe: Recipe, shapes: Sequence[Shape], target: torch.Tensor, box: Box, plan: RegionPlan) -> None:
    """Each read box is the bounding box of the source elements the target box holds: evaluated on
    sources whose values are their elements' ids, the box's values say which elements it needs."""
    starts = [0, *itertools.accumulate(math.prod(s) for s in shapes)]
    ids = [torch.arange(a, a + math.prod(s), dtype=torch.float64).reshape(s) for a, s in zip(starts, shapes)]
    keys = {inp.key: v for inp, v in zip(recipe.inputs, ids)}
    used = evaluate(recipe, keys.__getitem__, target)[box_slices(box)].flatten()
    used = used[(used >= 0) & (used == used.round())].long()  # not pad's fill
    for k, (read, shape) in enumerate(zip(plan.reads, shapes)):
        mine = used[(used >= starts[k]) & (used < starts[k + 1])] - starts[k]
        if not len(mine):
            assert read is None or not math.prod(n for _, n in read)
            continue
        assert read is not None
        coords = torch.stack(torch.unravel_index(mine, shape)) if shape else torch.zeros(0, 1, dtype=torch.long)
        bounds = tuple((int(c.min()), int(c.max()) + 1 - int(c.min())) for c in coords)
        assert read == bounds


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


@settings(max_examples=80, deadline=None, suppress_health_check=_HEALTH)
@given(st.data())
def test_any_box_of_any_recipe_equals_the_whole_recipe_there(data):
    _any_box_of_any_recipe(data)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=_HEALTH)
@given(st.data())
def test_any_box_of_any_recipe_equals_the_whole_recipe_there_many(data):
    _any_box_of_any_recipe(data)


def test_an_op_that_cannot_run_on_the_shapes_is_an_op_error():
    recipe = _recipe([Input("wq", (_op("rope_permute", heads=3),))])
    with pytest.raises(OpError, match=r"rope_permute.*not a multiple of heads=3"):
        region_plan(recipe, [(8, 2)], _meta((8, 2)), _rows(0, 4, (8, 2)))


def test_a_box_given_as_lists_is_read_as_a_box():
    plan = region_plan(_recipe([Input("w")]), [[4, 3]], _meta((4, 3)), [[1, 2], torch.Size([0, 3])])
    assert plan.reads == (((1, 2), (0, 3)),)
    with pytest.raises(PlanError, match="not a \\(start, length\\) per dimension"):
        region_plan(_recipe([Input("w")]), [(4, 3)], _meta((4, 3)), ((1, 2, 3), (0, 3)))


def test_biases_fuse_and_permute_by_rows():
    recipe = _recipe([Input("bq", (_op("rope_permute", heads=2),)), Input("bk"), Input("bv")], fuse_dim=-1)
    assert _check(recipe, [(8,), (4,), (4,)], ((6, 4),)).reads == (((5, 3),), ((0, 2),), None)  # rows 5, 7
    grouped = _recipe([Input("bq"), Input("bk"), Input("bv")], fuse_dim=0, groups=2)
    assert _check(grouped, [(8,), (4,), (4,)], ((2, 4),)).reads == (((2, 2),), ((0, 2),), None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.float8_e4m3fn])
def test_sources_of_any_dtype_compute_bit_for_bit(dtype):
    recipe = _recipe(
        [Input("q", (_op("rope_permute", heads=2),)), Input("k", (_op("transpose"),))], fuse_dim=0, groups=2
    )
    values = [torch.randn(s).mul(8).to(dtype) for s in [(8, 6), (6, 4)]]
    target = _meta((12, 6), dtype)
    plan = region_plan(recipe, [(8, 6), (6, 4)], target, ((3, 7), (1, 4)))
    got = plan.compute([None if r is None else v[box_slices(r)] for r, v in zip(plan.reads, values)])
    want = evaluate(recipe, dict(zip("qk", values)).__getitem__, target)[3:10, 1:5]
    assert got.dtype == dtype and torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))


# -- the shipped mappings, read from a file ------------------------------------------------------------


def _tiny_model(mapping: str) -> torch.nn.Module:
    from weightport.models import GPT2, Bert, BertConfig
    from weightport.models.llama import Llama, LlamaParams

    if mapping.endswith("gpt2"):
        return GPT2(layers=1, hidden=16, heads=2, vocab_size=24, max_positions=8)
    if mapping.endswith("bert"):
        return Bert(BertConfig(vocab_size=24, hidden=16, layers=1, heads=2, mlp=20, max_positions=8))
    sizes = {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 24, "multiple_of": 16}
    return Llama(LlamaParams.from_dict({**sizes, "norm_eps": 1e-5, "rope_theta": 1e4}))


def _chunks(shape: Shape, dim: int, ranks: int) -> list[Box]:
    """Each rank's box of a ``Shard(dim)`` placement (torch.chunk's rows, as DTensor gives them)."""
    return [
        tuple((int(c[0]), len(c)) if k == dim else (0, n) for k, n in enumerate(shape))
        for c in torch.arange(shape[dim]).chunk(ranks)
    ]


@pytest.mark.parametrize("mapping", ["hf.gpt2->weightport.gpt2", "hf.bert->weightport.bert", "hf.llama->meta.llama"])
def test_shipped_mappings_read_from_a_file_give_each_shard_its_part_of_the_whole_transfer(tmp_path, mapping):
    """Every recipe of a real plan (split then transpose, fused q/k/v, rope_permute), Shard(0) and
    Shard(1) on 2 and 3 ranks, read through ``Source.read_region``: the same values as the whole
    transfer, and on 2 ranks along the rows the ranks' bytes add up to what one rank reads for all."""
    from safetensors.torch import save_file

    import weightport as wp
    from weightport.mapping.verify import map_state_dict

    facts = {"heads": 4, "kv_heads": 2, "head_dim": 8, "hidden": 32}
    model = _tiny_model(mapping)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    state = map_state_dict(model.state_dict(), wp.load_mapping(mapping).bind(facts).inverse())
    stored = {}
    for key, value in state.items():  # one tensor per storage (tied embeddings)
        if all(value.data_ptr() != v.data_ptr() for v in stored.values()):
            stored[key] = value.contiguous()
    save_file(stored, str(tmp_path / "model.safetensors"))
    plan = wp.plan(str(tmp_path / "model.safetensors"), _tiny_model(mapping), mapping=mapping)
    source = plan.source
    assert any(r.fuse_dim is not None or r.ops for r in plan.recipes.values())
    for recipe in plan.recipes.values():
        target = plan.targets[recipe.target].tensor
        keys = [i.key for i in recipe.inputs]
        shapes = source.shapes(keys)
        want = evaluate(recipe, source.__getitem__, target)

        def read(box: Box) -> int:
            planned = region_plan(recipe, shapes, target, box)
            values, total = [], 0
            for key, r in zip(keys, planned.reads):
                value, nbytes = (None, 0) if r is None else source.read_region(key, r)
                values.append(value)
                total += nbytes
            assert torch.equal(planned.compute(values), want[box_slices(box)]), (recipe.target, box)
            return total

        everything = read(tuple((0, n) for n in target.shape))
        for dim, ranks in itertools.product(range(target.dim()), (2, 3)):
            spent = [read(box) for box in _chunks(tuple(target.shape), dim, ranks)]
            if dim == 0 and ranks == 2:
                assert sum(spent) == everything, recipe.target
