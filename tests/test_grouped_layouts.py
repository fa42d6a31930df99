"""Grouped split and fuse (``groups=``): fused attention laid out per kv group, and its inverse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightport as wp
from weightport.errors import OpError
from weightport.mapping import OpCall

HEADS, KV, HD, DIM = 8, 2, 4, 24


def _per_group(q, k, v):
    """The layout torchtitan's FusedQKVLinear and GPT-NeoX use: per kv group its q heads, its k, its v."""
    hpk, tail = HEADS // KV, q.shape[1:]
    parts = [q.reshape(KV, hpk, HD, *tail), k.reshape(KV, 1, HD, *tail), v.reshape(KV, 1, HD, *tail)]
    return torch.cat(parts, 1).reshape(-1, *tail)


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wqkv = nn.Linear(DIM, (HEADS + 2 * KV) * HD)


def _separate():
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, rows in (("q", HEADS * HD), ("k", KV * HD), ("v", KV * HD)):
        sd[f"{name}.weight"] = torch.randn(rows, DIM, generator=g)
        sd[f"{name}.bias"] = torch.randn(rows, generator=g)
    return sd


FUSE = wp.fuse(["q.{p}", "k.{p}", "v.{p}"], "wqkv.{p}", groups="$kv_heads")


def test_a_grouped_fuse_lays_out_q_k_v_per_kv_group():
    sd, model = _separate(), Fused()
    report = wp.transfer(sd, model, rules=[FUSE], facts={"kv_heads": KV}, strict=True)
    for p in ("weight", "bias"):
        want = _per_group(sd[f"q.{p}"], sd[f"k.{p}"], sd[f"v.{p}"])
        assert torch.equal(getattr(model.wqkv, p).detach(), want)
    assert report.entries[0].status == "loaded"
    assert report.entries[0].ops == ("fuse[3, groups=2]",)


def test_the_inverse_of_a_grouped_fuse_splits_it_back_bit_for_bit():
    sd, model = _separate(), Fused()
    wp.transfer(sd, model, rules=[FUSE], facts={"kv_heads": KV})
    back = wp.Mapping([FUSE]).inverse()
    (rule,) = back.rules
    assert isinstance(rule, wp.mapping.Split) and rule.groups == "$kv_heads"

    class Separate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(DIM, HEADS * HD), nn.Linear(DIM, KV * HD), nn.Linear(DIM, KV * HD)

    target = Separate()
    wp.transfer(model, target, mapping=back, facts={"kv_heads": KV}, strict=True)
    for name, t in target.state_dict().items():
        assert torch.equal(t, sd[name]), name


def test_a_grouped_split_equals_gqa_split():
    fused = _per_group(*(_separate()[f"{n}.weight"] for n in "qkv"))
    sizes = [HEADS * HD, KV * HD, KV * HD]
    for i, part in enumerate("qkv"):
        split = OpCall("split", {"index": i, "count": 3, "sizes": sizes, "groups": KV}).run(fused)
        ref = OpCall("gqa_split", {"heads": HEADS, "kv_heads": KV, "head_dim": HD, "part": part}).run(fused)
        assert torch.equal(split, ref)


def test_groups_that_do_not_divide_the_parts_are_an_op_error():
    with pytest.raises(OpError, match="groups=3"):
        OpCall("split", {"index": 0, "count": 2, "groups": 3}).run(torch.zeros(8, 2))
    with pytest.raises(OpError, match="groups=3"):
        wp.mapping.ops.fuse([torch.zeros(6, 2), torch.zeros(4, 2)], 0, groups=3)


def test_a_grouped_fuse_of_the_wrong_group_count_is_a_shape_error_not_wrong_values():
    sd, model = _separate(), Fused()
    before = model.wqkv.weight.detach().clone()
    with pytest.raises(wp.errors.WeightportError):
        wp.transfer(sd, model, rules=[FUSE], facts={"kv_heads": 3}, on_mismatch="error")
    assert torch.equal(model.wqkv.weight, before)


@pytest.mark.parametrize("groups", [0, -1, 1.5, True, "kv_heads"])
def test_a_bad_groups_value_is_refused_where_the_rule_is_written(groups):
    with pytest.raises(wp.errors.MappingError, match="groups"):
        wp.fuse(["a", "b"], "c", groups=groups)
