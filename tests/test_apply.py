"""Applying: dict.update semantics, casting, placement, meta targets, all-or-nothing."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import TinyNet, digest, trained
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport.errors import NonFiniteError, OpError, PlanError


def test_loaded_tensors_overwrite_and_the_rest_keeps_its_values(tmp_path):
    src = trained(num_classes=1000)
    torch.save({"net": nn.DataParallel(src).state_dict()}, tmp_path / "c.pth")
    model = TinyNet(num_classes=10)
    fc_before = model.fc.weight.detach().clone()
    wp.transfer(tmp_path / "c.pth", model)
    for k, v in model.state_dict().items():
        if k.startswith("fc."):
            continue
        assert torch.equal(v, src.state_dict()[k]), k
    assert torch.equal(model.fc.weight, fc_before)


def test_values_cast_to_the_targets_dtype(tiny):
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in trained().state_dict().items()}
    wp.transfer(state, tiny)
    assert tiny.conv1.weight.dtype == torch.float32
    assert torch.equal(tiny.conv1.weight, state["conv1.weight"].float())


def test_dtype_and_device_options_keep_parameter_identity(tiny):
    params = list(tiny.parameters())
    tiny.fc.weight.my_flag = "keep me"  # type: ignore[attr-defined]
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    wp.transfer(trained().state_dict(), tiny, dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in tiny.parameters())
    assert tiny.bn1.num_batches_tracked.dtype == torch.int64  # integer buffers keep their dtype
    assert list(tiny.parameters()) == params  # same objects: optimizers keep working
    assert opt.param_groups[0]["params"][0] is tiny.conv1.weight
    assert tiny.fc.weight.my_flag == "keep me"
    assert isinstance(tiny.fc.weight, nn.Parameter) and tiny.fc.weight.requires_grad


def test_meta_target_materialises_everything_and_inits_only_fresh(tmp_path, monkeypatch):
    src = trained(num_classes=1000)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    with wp.init_empty():
        model = TinyNet(num_classes=10)
    assert model.fc.weight.is_meta and not model.bn1.running_mean.is_meta
    calls = []
    original = nn.Linear.reset_parameters

    def spy(self):
        calls.append(type(self).__name__)
        original(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    monkeypatch.setattr(nn.Conv2d, "reset_parameters", lambda self: calls.append("Conv2d"))
    r = wp.transfer(tmp_path / "w.safetensors", model)
    assert calls == []  # the fresh head replays the constructor's recorded init; nothing loaded is initialised
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.fc.weight.std() > 0
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.state_dict()[k], v), k
    assert [e.target for e in r.fresh] == ["fc.weight", "fc.bias"]


def test_meta_target_with_non_persistent_meta_buffer_is_refused():
    with torch.device("meta"):
        model = TinyNet()
    model.register_buffer("positions", torch.arange(4, device="meta"), persistent=False)
    with pytest.raises(PlanError, match="positions.*init_empty"):
        wp.plan(trained().state_dict(), model)


def test_meta_target_without_reset_parameters_is_zeroed_with_a_note():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))  # a constructed value: kept, as an eager build has it
            self.big = nn.Parameter(torch.empty(1 << 21))  # too large to keep, and no init call follows
            self.fc = nn.Linear(3, 3)

    with wp.init_empty():
        model = Custom()
    r = wp.transfer({"fc.weight": torch.ones(3, 3), "fc.bias": torch.ones(3)}, model)
    assert torch.equal(model.scale, torch.ones(3))
    assert torch.equal(model.big, torch.zeros(1 << 21))
    assert any("no reset_parameters" in w and "big" in w for w in r.warnings)


def _failing(tensor: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("boom")


def _interrupting(tensor: torch.Tensor) -> torch.Tensor:
    raise KeyboardInterrupt


@pytest.mark.parametrize("meta", [False, True])
@pytest.mark.parametrize("fault", ["op", "interrupt", "nan"])
def test_failures_leave_the_model_unchanged(tiny, fault, meta):
    if meta:
        with wp.init_empty():
            tiny = TinyNet()
    state = trained().state_dict()
    rules = []
    if fault == "op":
        rules = [wp.transform("blocks.1.0.weight", "blocks.1.0.weight", _failing)]
    elif fault == "interrupt":
        rules = [wp.transform("blocks.1.0.weight", "blocks.1.0.weight", _interrupting)]
    else:
        state["blocks.1.0.weight"][0, 0, 0, 0] = float("nan")
    before = digest(tiny)
    expected = {"op": OpError, "interrupt": KeyboardInterrupt, "nan": NonFiniteError}[fault]
    with pytest.raises(expected):
        wp.transfer(state, tiny, rules=rules, check_finite=True)
    assert digest(tiny) == before


def test_interrupt_during_commit_is_deferred_until_the_commit_ends(tiny):
    state = trained().state_dict()
    fired = []

    def interrupt_once(t: torch.Tensor) -> torch.Tensor:
        return t

    plan = wp.plan(state, tiny, rules=[wp.transform("fc.bias", "fc.bias", interrupt_once)])
    real_copy = torch.Tensor.copy_

    def copy_and_signal(self, src, *a, **k):
        if not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return real_copy(self, src, *a, **k)

    torch.Tensor.copy_ = copy_and_signal  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            plan.apply()
    finally:
        torch.Tensor.copy_ = real_copy  # type: ignore[method-assign]
    assert fired
    for k, v in state.items():  # the commit completed before the interrupt was raised
        assert torch.equal(tiny.state_dict()[k], v), k


def test_a_plan_applies_once_and_refuses_a_changed_model(tiny):
    state = trained().state_dict()
    p = wp.plan(state, tiny)
    p.apply()
    with pytest.raises(PlanError, match="applied already"):
        p.apply()
    p2 = wp.plan(state, tiny)
    tiny.fc = nn.Linear(8, 10)
    with pytest.raises(PlanError, match="changed since it was planned"):
        p2.apply()


def test_bad_dtype_and_device_options(tiny):
    with pytest.raises(PlanError, match="dtype='float99'"):
        wp.transfer(trained().state_dict(), tiny, dtype="float99")
    with pytest.raises(PlanError, match="device='nowhere'"):
        wp.transfer(trained().state_dict(), tiny, device="nowhere")


def test_ops_and_fuse_values_are_exact():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)
            self.proj = nn.Linear(4, 6, bias=False)

    q, k, v = (torch.randn(4, 4) for _ in range(3))
    qb, kb, vb = (torch.randn(4) for _ in range(3))
    w = torch.randn(4, 6)
    state = {"q.weight": q, "k.weight": k, "v.weight": v, "q.bias": qb, "k.bias": kb, "v.bias": vb, "p.w": w}
    model = Net()
    r = wp.transfer(
        state,
        model,
        strict=True,
        rules=[
            wp.fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}"),
            wp.transform("p.w", "proj.weight", "transpose"),
        ],
    )
    assert torch.equal(model.qkv.weight, torch.cat([q, k, v])) and torch.equal(model.qkv.bias, torch.cat([qb, kb, vb]))
    assert torch.equal(model.proj.weight, w.t())
    e = r["qkv.weight"]
    assert (e.status, e.sources, e.ops, e.source_shape) == (
        "loaded",  # an exact re-layout: the source's values, listed ops
        ("q.weight", "k.weight", "v.weight"),
        ("fuse[3]",),
        (12, 4),
    )


@pytest.mark.parametrize("fast", [True, False])
def test_a_swap_keeps_identity_class_attributes_and_takes_the_new_values(monkeypatch, fast):
    from weightport import _torch_fast
    from weightport import apply as apply_module

    if not fast:  # the public path: torch.utils.swap_tensors and nn.Parameter
        monkeypatch.setattr(_torch_fast, "FAST", False)
    old = nn.Parameter(torch.empty(2, 3, device="meta"), requires_grad=False)
    old.tag = "kept"  # an attribute a library put on the parameter
    held = old
    write = apply_module._swap(old, torch.arange(6.0).reshape(2, 3), {})
    apply_module._replace(write)
    assert held is old and type(old) is nn.Parameter and not old.is_meta
    assert torch.equal(old, torch.arange(6.0).reshape(2, 3)) and old.requires_grad is False
    assert old.tag == "kept"


def test_a_swap_replaces_the_object_where_torch_cannot_swap(monkeypatch):
    import weakref

    from weightport import apply as apply_module

    module = nn.Linear(2, 2, device="meta")
    old = module.weight
    ref = weakref.ref(old)  # a weak reference forbids swapping the tensor's contents
    write = apply_module._swap(old, torch.ones(2, 2), {id(old): [(module, "_parameters", "weight")]})
    apply_module._replace(write)
    assert module.weight is not old and torch.equal(module.weight, torch.ones(2, 2)) and ref() is old
    assert old.is_meta  # the old object is left as it was


def _odd_targets() -> nn.Module:
    """Targets whose storage cannot take an in-place copy: an inference tensor, an expanded buffer."""
    with torch.inference_mode():
        frozen = nn.Linear(3, 2)
    model = nn.Sequential(nn.Linear(3, 3), frozen)
    model.register_buffer("table", torch.zeros(1, 3).expand(4, 3))
    model.register_buffer("transposed", torch.zeros(3, 4).t())  # strided, but each element its own
    return model


def test_targets_that_cannot_be_written_in_place_get_new_tensors_and_the_commit_completes():
    source = {k: torch.randn(v.shape) for k, v in _odd_targets().state_dict().items()}
    model = _odd_targets()
    report = wp.transfer(source, model, strict=True)
    assert report.applied and len(report.loaded) == len(source)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), k
    assert not model[1].weight.is_inference()  # a normal tensor now, trainable


def test_writable_in_place_tells_overlapping_and_inference_tensors_apart():
    from weightport.apply import writable_in_place

    assert writable_in_place(torch.zeros(3, 4)) and writable_in_place(torch.zeros(3, 4).t())
    assert writable_in_place(torch.zeros(4, 6)[:, ::2]) and writable_in_place(torch.zeros(1, 5).expand(1, 5))
    assert not writable_in_place(torch.zeros(1, 3).expand(4, 3))
    assert not writable_in_place(torch.zeros(10).as_strided((4, 3), (1, 1)))  # rows overlap
    with torch.inference_mode():
        inference = torch.zeros(2)
    assert not writable_in_place(inference)


def test_a_source_sharing_memory_with_its_target_is_loaded_without_a_partial_overlap():
    buffer = torch.arange(20.0)
    model = nn.Linear(4, 4, bias=False)
    model.weight = nn.Parameter(buffer[:16].view(4, 4))
    source = {"weight": buffer[2:18].view(4, 4)}  # half of it is the target's own memory
    expected = source["weight"].clone()
    wp.transfer(source, model)
    assert torch.equal(model.weight.detach(), expected)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=3).flatmap(
        lambda shape: st.tuples(st.just(shape), st.lists(st.integers(0, 5), min_size=len(shape), max_size=len(shape)))
    ),
    st.booleans(),
)
def test_any_strided_target_is_loaded_and_the_commit_never_fails(layout, inference):
    """Whatever memory layout a target tensor has (overlapping, strided, inference), the values land."""
    shape, strides = layout
    need = 1 + sum((n - 1) * s for n, s in zip(shape, strides))

    def model() -> nn.Module:
        m = nn.Module()
        if inference:
            with torch.inference_mode():
                m.register_buffer("t", torch.zeros(need).as_strided(shape, strides))
        else:
            m.register_buffer("t", torch.zeros(need).as_strided(shape, strides))
        return m

    source = {"t": torch.randn(shape)}
    target = model()
    wp.transfer(source, target, strict=True)
    assert torch.equal(target.t, source["t"])
