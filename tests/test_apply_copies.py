"""Applying copies each value once: a tensor the ops just made becomes the target itself."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import weightport as wp


class _Copies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12, bias=False)


SOURCE = {name: torch.randn(4, 4) for name in ("q", "k", "v")}
FUSE = wp.fuse(["q", "k", "v"], "qkv.weight")


def test_a_fused_target_is_the_fuse_result_not_a_copy_of_it():
    with wp.init_empty():
        model = Fused()
    plan = wp.plan(SOURCE, model, rules=[FUSE])
    with _Copies() as copies:
        plan.apply()
    assert copies.count == 0
    assert torch.equal(model.qkv.weight.detach(), torch.cat([SOURCE["q"], SOURCE["k"], SOURCE["v"]]))


def test_a_view_of_the_source_is_still_copied():
    source = {"w": torch.randn(4, 12)}
    with wp.init_empty():
        model = Fused()
    wp.transfer(source, model, rules=[wp.transform("w", "qkv.weight", "transpose")])
    assert torch.equal(model.qkv.weight.detach(), source["w"].t())
    assert model.qkv.weight.untyped_storage().data_ptr() != source["w"].untyped_storage().data_ptr()


def test_a_callables_result_is_copied_it_may_be_shared():
    constant = torch.ones(12, 4)
    with wp.init_empty():
        model = Fused()
    wp.transfer({"w": torch.zeros(12, 4)}, model, rules=[wp.transform("w", "qkv.weight", lambda x: constant)])
    assert torch.equal(model.qkv.weight.detach(), constant)
    assert model.qkv.weight.untyped_storage().data_ptr() != constant.untyped_storage().data_ptr()
