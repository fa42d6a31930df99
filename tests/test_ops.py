"""The op registry: every built-in op, its label, its inverse, and meta-tensor shape inference."""

from __future__ import annotations

import pytest
import torch

import weightport as wp
from weightport.errors import MappingError, OpError
from weightport.mapping.ops import OpCall, fuse, get_op, list_ops


def _op(name: str, **params) -> OpCall:
    return OpCall.make(name, params, "test")


X = torch.arange(24.0).reshape(6, 4)

# (op, params, input, target, expected)
CASES = [
    ("split", {"index": 1, "count": 3}, X, None, X[2:4]),
    ("split", {"index": 2, "count": 3, "sizes": [4, 1, 1]}, X, None, X[5:6]),
    ("split", {"index": 0, "count": 2, "dim": 1}, X, None, X[:, :2]),
    # groups: rows (a a b | a a b), parts a (4 rows) and b (2 rows): b is rows 2 and 5
    ("split", {"index": 1, "count": 2, "sizes": [4, 2], "groups": 2}, X, None, X[[2, 5]]),
    ("unsqueeze", {"dim": 1}, X, None, X[:, None]),
    ("squeeze", {"dim": 0}, X[None], None, X),
    ("take", {"index": 4}, X, None, X[4]),
    ("take", {"index": 1, "dim": 1}, X, None, X[:, 1]),
    ("transpose", {}, X, None, X.t()),
    ("permute", {"dims": [1, 0]}, X, None, X.t()),
    ("reshape", {"shape": [4, 6]}, X, None, X.reshape(4, 6)),
    ("reshape", {}, X, torch.empty(2, 12), X.reshape(2, 12)),
    ("select", {"index": [5, 0, 2]}, X, None, X[[5, 0, 2]]),
    ("select", {"index": [3], "dim": 1}, X, None, X[:, [3]]),
    ("narrow", {"start": 1, "length": 2}, X, None, X[1:3]),
    ("pad", {}, X, torch.ones(7, 5), torch.cat([torch.cat([X, torch.zeros(6, 1)], 1), torch.zeros(1, 5)])),
    ("pad", {"keep_init": True}, X[:1], torch.ones(2, 4), torch.cat([X[:1], torch.ones(1, 4)])),
    ("cast", {"dtype": "float16"}, X, None, X.half()),
    ("scale", {"factor": 0.5}, X, None, X * 0.5),
    # 2 heads of 3 pairs: half layout rows (a0 a1 a2 b0 b1 b2) per head -> interleaved (a0 b0 a1 b1 a2 b2)
    ("rope_permute", {"heads": 2}, torch.arange(12.0), None, torch.tensor([0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11.0])),
    ("rope_permute", {"heads": 1, "to": "half"}, X, None, X[[0, 2, 4, 1, 3, 5]]),
    # 2 kv groups of (2 q heads, k, v), head_dim 1: rows q0 q1 k0 v0 | q2 q3 k1 v1
    (
        "gqa_split",
        {"heads": 4, "kv_heads": 2, "head_dim": 1, "part": "q"},
        X.reshape(8, 3),
        None,
        X.reshape(8, 3)[[0, 1, 4, 5]],
    ),
    (
        "gqa_split",
        {"heads": 4, "kv_heads": 2, "head_dim": 1, "part": "v"},
        X.reshape(8, 3),
        None,
        X.reshape(8, 3)[[3, 7]],
    ),
]


@pytest.mark.parametrize(("op", "params", "x", "target", "want"), CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_ops_compute_and_infer_shapes_on_meta(op, params, x, target, want):
    call = _op(op, **params)
    got = call.run(x, target)
    assert torch.equal(got, want) and got.dtype == want.dtype
    meta_target = None if target is None else target.to("meta")
    assert call.run(x.to("meta"), meta_target).shape == want.shape  # the planner's shape inference
    assert isinstance(call.label(), str) and call.label()


def test_every_registered_op_is_covered():
    assert set(list_ops()) == {c[0] for c in CASES}
    assert set(wp.list_adapters()) == {"in_channels", "pos_embed", "patch_embed", "head", "vocab"}


@pytest.mark.parametrize(
    ("op", "params"),
    [
        ("transpose", {}),
        ("transpose", {"dim0": 1, "dim1": 2}),
        ("permute", {"dims": [2, 0, 1]}),
        ("scale", {"factor": 4.0}),
        ("rope_permute", {"heads": 1}),
        ("rope_permute", {"heads": 1, "to": "half", "head_dim": 2}),
    ],
)
def test_inverse_ops_undo_their_op(op, params):
    x = torch.randn(2, 3, 4)
    call = _op(op, **params)
    inv = call.inverse()
    assert inv is not None
    torch.testing.assert_close(inv.run(call.run(x)), x, rtol=0, atol=0)


def test_ops_without_inverse_say_so():
    assert _op("select", index=[0]).inverse() is None
    assert _op("scale", factor=0.0).inverse() is None
    assert _op("gqa_split", heads=4, kv_heads=2, head_dim=8, part="q").inverse() is None  # fusing needs all parts


def test_labels_name_the_op_and_its_parameters():
    assert _op("split", index=0, count=3).label() == "split[1/3]"
    assert _op("permute", dims=[1, 0]).label() == "permute(1, 0)"
    assert _op("select", index=[1, 2]).label() == "select[2 along 0]"
    assert _op("in_channels", source_channels=3, channels=1).label() == "in_channels 3->1"
    assert _op("rope_permute", heads=4).label() == "rope_permute(heads=4, ->interleaved)"
    assert _op("rope_permute", heads=2, to="half").inverse().label() == "rope_permute(heads=2, ->interleaved)"
    assert _op("gqa_split", heads=4, kv_heads=2, head_dim=8, part="k").label() == "gqa_split(k, heads=4, kv_heads=2)"


@pytest.mark.parametrize(
    ("op", "params", "x", "message"),
    [
        ("split", {"index": 0, "count": 4}, X, "cannot split a dimension of 6 into 4"),
        ("split", {"index": 0, "count": 2, "sizes": [1, 2]}, X, "do not add up"),
        ("permute", {"dims": [0, 0]}, X, "not a permutation"),
        ("select", {"index": [6]}, X, "out of range"),
        ("reshape", {"shape": [5, 5]}, X, "cannot turn"),
        ("cast", {"dtype": "float99"}, X, "unknown dtype"),
        ("narrow", {"start": 5, "length": 3}, X, "narrow"),
        ("rope_permute", {"heads": 4}, X, "rope_permute: .* not a multiple of heads=4"),
        ("rope_permute", {"heads": 2}, X, "rope_permute: 3 rows per head is odd"),
        ("rope_permute", {"heads": 3, "head_dim": 4}, X, "rope_permute: .* not head_dim=4"),
        ("rope_permute", {"heads": 3, "to": "meta"}, X, "rope_permute: to='meta'"),
        ("gqa_split", {"heads": 4, "kv_heads": 2, "head_dim": 2, "part": "q"}, X, "gqa_split: .* check heads"),
        ("gqa_split", {"heads": 3, "kv_heads": 2, "head_dim": 1, "part": "q"}, X, "gqa_split: heads=3 is not a"),
        ("gqa_split", {"heads": 1, "kv_heads": 1, "head_dim": 2, "part": "o"}, X, "gqa_split: part='o'"),
    ],
)
def test_bad_op_input_raises_op_error_naming_the_op(op, params, x, message):
    with pytest.raises(OpError, match=message):
        _op(op, **params).run(x)


def test_pad_refuses_a_larger_source_and_reshape_needs_a_shape():
    with pytest.raises(OpError, match="cannot fit"):
        _op("pad").run(X, torch.empty(2, 2))
    with pytest.raises(OpError, match="needs shape"):
        _op("reshape").run(X, None)


def test_fuse_concatenates_and_names_shapes_on_failure():
    assert torch.equal(fuse([X[:2], X[2:]], 0), X)
    with pytest.raises(OpError, match=r"\(2, 4\), \(3, 3\)"):
        fuse([X[:2], torch.zeros(3, 3)], 0)


def test_user_callables_and_registered_ops_work_in_rules():
    def double(t: torch.Tensor) -> torch.Tensor:
        return t * 2

    call = OpCall.make(double, {}, "test")
    assert call.label() == "double" and torch.equal(call.run(X), X * 2)
    with pytest.raises(MappingError, match="no parameters"):
        OpCall.make(double, {"k": 1}, "test")
    with pytest.raises(OpError, match="returned a str"):
        OpCall.make(lambda t: "no", {}, "test").run(X)

    @wp.register_op("negate_for_test", inverse=lambda p: ("negate_for_test", {}))
    def _negate(x: torch.Tensor) -> torch.Tensor:
        return -x

    try:
        rule = wp.transform("a", "b", "negate_for_test")
        assert torch.equal(rule.ops[0].run(X), -X)
        assert wp.Mapping([rule]).inverse().rules[0].ops[0].op == "negate_for_test"
        assert "negate_for_test" in wp.list_ops()
    finally:
        from weightport.mapping import ops

        del ops._OPS["negate_for_test"]
    with pytest.raises(MappingError, match="unknown op"):
        get_op("negate_for_test")


def test_register_op_rejects_a_bad_target_kind():
    with pytest.raises(ValueError, match="target must be"):
        wp.register_op("x", target="everything")


def test_exact_layout_ops_report_loaded_and_value_changing_ops_adapted(monkeypatch):
    """``loaded`` means the source's values (re-laid out by exact ops, ops listed); ``adapted``
    means values changed to fit: pad, scale, adapters, and any op weightport cannot vouch for."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in ("t", "r", "c", "p", "s", "f", "u"):
                self.register_parameter(name, torch.nn.Parameter(torch.zeros(2, 3)))

    import weightport.mapping.ops as ops

    monkeypatch.setattr(ops, "_OPS", dict(ops._OPS))  # the registration below ends with the test

    @wp.register_op("wp_test_identity")
    def identity(x: torch.Tensor) -> torch.Tensor:
        return x

    state = {k: torch.arange(6.0).reshape(s) for k, s in [("t", (3, 2)), ("r", (6,)), ("c", (2, 3))]}
    state |= {"p": torch.ones(2, 2), "s": torch.ones(2, 3), "f": torch.ones(2, 3), "u": torch.ones(2, 3)}
    rules = [
        wp.transform("t", "t", "transpose"),
        wp.transform("r", "r", "reshape", shape=[2, 3]),
        wp.transform("c", "c", "cast", dtype="float64"),
        wp.transform("p", "p", "pad"),
        wp.transform("s", "s", "scale", factor=2.0),
        wp.transform("f", "f", lambda x: x + 1),
        wp.transform("u", "u", "wp_test_identity"),
    ]
    report = wp.transfer(state, Net(), rules=rules, strict=True)
    status = {e.target: e.status for e in report.entries}
    assert status == dict(t="loaded", r="loaded", c="loaded", p="adapted", s="adapted", f="adapted", u="adapted")
    assert report.coverage == 1.0 and report.exact_coverage == pytest.approx(3 / 7)
    assert "(42.86% exact)" in report.summary() and report.to_dict()["exact_coverage"] == report.exact_coverage
    assert get_op("split").exact and not get_op("pad").exact and not get_op("in_channels").exact


def test_split_with_groups_along_a_negative_dim_equals_the_positive_one():
    from weightport.mapping.ops import OpCall

    x = torch.arange(2 * 12).reshape(2, 12)
    for index in range(3):
        neg = OpCall("split", {"index": index, "count": 3, "dim": -1, "groups": 2}).run(x)
        pos = OpCall("split", {"index": index, "count": 3, "dim": 1, "groups": 2}).run(x)
        assert torch.equal(neg, pos)


def test_select_takes_negative_indices_from_the_end():
    from weightport.mapping.ops import OpCall

    x = torch.arange(5)
    assert OpCall("select", {"index": [-1, 0, -2]}).run(x).tolist() == [4, 0, 3]
