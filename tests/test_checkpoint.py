"""wp.checkpoint: save / resume, the file format, devices and dtypes, changed architectures, inspect."""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import weightport as wp
from weightport.checkpoint._tree import decode, encode
from weightport.errors import CheckpointError, StrictnessError, WeightportError


class Net(nn.Module):
    def __init__(self, classes: int = 3, in_channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.body = nn.Linear(16, 8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3))
        x = torch.cat([x, x, x, x], dim=1)
        return self.head(self.drop(torch.relu(self.body(x))))


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched=None, steps: int = 3, in_channels: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, in_channels, 4, 4)).square().mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def _setup(opt_cls=torch.optim.AdamW, seed: int = 0, **net):
    torch.manual_seed(seed)
    model = Net(**net)
    opt = (
        opt_cls(model.parameters(), lr=0.01)
        if opt_cls is not torch.optim.SGD
        else opt_cls(model.parameters(), lr=0.01, momentum=0.9)
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, state in sa["state"].items():
        assert state.keys() == sb["state"][i].keys()
        for k, v in state.items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


@pytest.fixture()
def trained(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched)
    path = wp.checkpoint.save(
        tmp_path / "ckpt.safetensors",
        model=model,
        optimizer=opt,
        scheduler=sched,
        epoch=2,
        step=3,
        metrics={"val_loss": 0.25},
        extra={"note": "hi"},
    )
    return model, opt, sched, path


# -- the file -------------------------------------------------------------------------------------------


def test_one_safetensors_file_with_namespaced_tensors_and_json_metadata(trained):
    model, _opt, _, path = trained
    with safe_open(str(path), "pt") as f:  # an independent reader: plain safetensors, no pickle
        keys = set(f.keys())
        meta = f.metadata()
        assert torch.equal(f.get_tensor("model/head.weight"), model.head.weight.detach())
    assert {f"model/{k}" for k in model.state_dict()} <= keys
    assert "optimizer/state/0/exp_avg" in keys and "rng/torch" in keys
    assert meta["weightport.format"] == "checkpoint"
    body = json.loads(meta["weightport.checkpoint"])
    assert body["epoch"] == 2 and body["step"] == 3 and body["optimizer"]["type"] == "torch.optim.adamw.AdamW"
    assert body["optimizer"]["param_names"][0] == ["conv.weight"]
    assert path.read_bytes()[8:9] == b"{"


def test_resume_restores_model_optimizer_scheduler_counters_and_extra(trained):
    model, opt, sched, path = trained
    model2, opt2, sched2 = _setup(seed=1)
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2, scheduler=sched2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    _assert_same_optimizer_state(opt, opt2)
    assert sched2.state_dict() == sched.state_dict()
    assert (state.epoch, state.step, state.extra, state.metrics) == (2, 3, {"note": "hi"}, {"val_loss": 0.25})
    assert state.report.applied and len(state.report.loaded) == len(model.state_dict())
    assert set(state.optimizer.carried) == {n for n, _ in model.named_parameters()} and not state.optimizer.fresh
    assert {"model", "optimizer", "scheduler", "rng:torch", "rng:python", "rng:numpy"} <= set(state.restored)
    assert "resumed from" in state.summary() and "epoch 2" in str(state)
    json.dumps(state.to_dict())


def test_resume_refuses_a_map_location_that_is_no_device(trained):
    _, _, _, path = trained
    model2, opt2, _ = _setup(seed=1)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(wp.errors.CheckpointError, match="map_location='nowhere' is not a torch device"):
        wp.checkpoint.resume(path, model=model2, optimizer=opt2, map_location="nowhere")
    assert all(torch.equal(v, before[k]) for k, v in model2.state_dict().items())


def test_resume_continues_training_identically(trained, tmp_path):
    model, opt, sched, path = trained
    model2, opt2, sched2 = _setup(seed=7)
    wp.checkpoint.resume(path, model=model2, optimizer=opt2, scheduler=sched2)
    torch.manual_seed(3)
    _train(model, opt, sched, steps=2)
    torch.manual_seed(3)
    _train(model2, opt2, sched2, steps=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_grad_scaler_state_round_trips(tmp_path):
    model, opt, _ = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(new_scale=256.0)
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, optimizer=opt, scaler=scaler)
    scaler2 = torch.amp.GradScaler("cpu")
    state = wp.checkpoint.resume(path, model=model, optimizer=opt, scaler=scaler2)
    assert scaler2.state_dict() == scaler.state_dict() and scaler2.get_scale() == 256.0
    assert "scaler" in state.restored


@pytest.mark.parametrize(
    "value",
    [
        {"a": (1, 2.5, None), "b": [True, "x", {"c": -0.0}]},
        {0: "int key", "1": "str key", (2, 3): "tuple key", "$odd": 1},
        {"inf": math.inf, "ninf": -math.inf, "big": 2**70, "tiny": 5e-324, "third": 1 / 3},
        {"dtype": torch.bfloat16, "device": torch.device("cpu"), "np": np.float32(0.5), "npint": np.int64(7)},
        {"t": torch.arange(6).reshape(2, 3), "half": torch.ones(2, dtype=torch.float16), "empty": torch.empty(0)},
    ],
)
def test_state_trees_round_trip_exactly(value):
    doc, tensors = encode(value, "extra")
    text = json.dumps(doc, allow_nan=False)  # strict JSON
    back = decode(json.loads(text), tensors.__getitem__)
    assert _same(back, value)


def _same(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(b, float):
        return isinstance(a, float) and (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b and type(a) is type(b.item() if isinstance(b, np.generic) else b)


def test_nan_and_numpy_arrays_round_trip():
    arr = np.arange(12, dtype=np.uint32).reshape(3, 4)
    doc, tensors = encode({"nan": math.nan, "arr": arr}, "extra")
    back = decode(json.loads(json.dumps(doc, allow_nan=False)), tensors.__getitem__)
    assert math.isnan(back["nan"]) and back["arr"].dtype == np.uint32 and (back["arr"] == arr).all()


def test_values_that_need_pickle_are_refused_with_their_path(tmp_path):
    model, _opt, _ = _setup()
    with pytest.raises(CheckpointError, match=r"extra\['hooks'\]\[1\].*function"):
        wp.checkpoint.save(tmp_path / "c.safetensors", model=model, extra={"hooks": [1, lambda: 0]})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epoch": 1.5}, "epoch must be an int"),
        ({"step": True}, "step must be an int"),
        ({"metrics": {"val_loss": "low"}}, r"metrics\['val_loss'\] must be a number"),
        ({"extra": [1, 2]}, "extra must be a dict"),
        ({"metrics": "low"}, "metrics must be a dict"),
        ({"optimizer": "adam"}, "not a torch optimizer"),
        ({"extra": {"a": [[[[[]]]]] * 2}}, None),
        ({"extra": {"deep": json.loads("[" * 150 + "]" * 150)}}, r"extra\['deep'\]\[0\]\[0\]… is nested deeper"),
    ],
)
def test_bad_arguments_raise_checkpoint_error(tmp_path, kwargs, match):
    model, _, _ = _setup()
    if match is None:  # the control: a shallow tree saves
        wp.checkpoint.save(tmp_path / "c.safetensors", model=model, **kwargs)
        return
    with pytest.raises(CheckpointError, match=match):
        wp.checkpoint.save(tmp_path / "c.safetensors", model=model, **kwargs)


def test_a_list_that_contains_itself_is_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    with pytest.raises(CheckpointError, match="contains itself"):
        wp.checkpoint.save(tmp_path / "c.safetensors", model=nn.Linear(2, 2), extra={"loop": loop})


@pytest.mark.parametrize("path", [None, 3, "folder"])
def test_paths_that_are_no_checkpoint_file_raise_checkpoint_error(tmp_path, path):
    path = tmp_path if path == "folder" else path
    model = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="must be a path|is a folder"):
        wp.checkpoint.save(path, model=model)
    if path is not tmp_path:
        for call in (lambda: wp.checkpoint.resume(path, model=model), lambda: wp.checkpoint.info(path)):
            with pytest.raises(CheckpointError, match="must be a path"):
                call()


def test_meta_model_cannot_be_saved(tmp_path):
    with wp.init_empty():
        model = Net()
    with pytest.raises(CheckpointError, match="meta device"):
        wp.checkpoint.save(tmp_path / "c.safetensors", model=model)


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model, opt, _ = _setup()
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, optimizer=opt, step=1)
    before = path.read_bytes()
    saving = sys.modules["weightport.saving"]

    def fail(f, t):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "_write_tensor", fail)
    with pytest.raises(OSError, match="disk full"):
        wp.checkpoint.save(path, model=model, optimizer=opt, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


# -- RNG ------------------------------------------------------------------------------------------------


def _draw() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_rng_states_are_restored(tmp_path):
    model, _, _ = _setup()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model)
    expected = _draw()
    wp.checkpoint.resume(path, model=model)
    assert _draw() == expected
    wp.checkpoint.resume(path, model=model, rng=False)  # control: without it the streams move on
    assert _draw() != expected


def test_checkpoint_without_rng_says_so(tmp_path):
    model, _, _ = _setup()
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, rng=False)
    state = wp.checkpoint.resume(path, model=model)
    assert not any(r.startswith("rng:") for r in state.restored)
    assert any("no RNG states" in n for n in state.notes)


# -- wrappers -------------------------------------------------------------------------------------------


def test_data_parallel_is_unwrapped_on_save_and_resume(tmp_path):
    model, opt, _ = _setup()
    _train(model, opt)
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=nn.DataParallel(model), optimizer=opt)
    with safe_open(str(path), "pt") as f:
        assert "model/head.weight" in f.keys()
    assert wp.checkpoint.info(path).unwrapped == ("DataParallel",)
    model2, opt2, _ = _setup(seed=3)
    wp.checkpoint.resume(path, model=nn.DataParallel(model2), optimizer=opt2)  # wrapped target: unwrapped too
    assert torch.equal(model2.head.weight, model.head.weight)
    _assert_same_optimizer_state(opt, opt2)


def test_torch_compile_wrapper_is_unwrapped(tmp_path):
    model, _, _ = _setup()
    compiled = torch.compile(model)  # not run: only the wrapper matters
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=compiled)
    with safe_open(str(path), "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())
    assert wp.checkpoint.unwrap(compiled) == (model, ("OptimizedModule",))


# -- failures leave everything unchanged ------------------------------------------------------------------


def _snapshot(model, opt):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        json.dumps(opt.state_dict()["param_groups"]),
        torch.get_rng_state().clone(),
    )


def _unchanged(model, opt, snap) -> bool:
    now = _snapshot(model, opt)
    return (
        all(torch.equal(a, now[0][k]) for k, a in snap[0].items())
        and snap[1] == now[1]
        and torch.equal(snap[2], now[2])
        and not opt.state
    )


def test_plain_weights_file_is_refused(tmp_path):
    model, _opt, _ = _setup()
    wp.save(model, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="not a weightport training checkpoint"):
        wp.checkpoint.resume(tmp_path / "w.safetensors", model=model)


def test_truncated_checkpoint_is_refused_and_nothing_changes(trained, tmp_path):
    _, _, _, path = trained
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    model, opt, _ = _setup(seed=9)
    snap = _snapshot(model, opt)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        wp.checkpoint.resume(cut, model=model, optimizer=opt)
    assert _unchanged(model, opt, snap)


def test_strict_architecture_mismatch_changes_nothing(trained):
    _, _, _, path = trained
    model, opt, _ = _setup(seed=9, classes=5)
    snap = _snapshot(model, opt)
    with pytest.raises(StrictnessError, match="head"):
        wp.checkpoint.resume(path, model=model, optimizer=opt)
    assert _unchanged(model, opt, snap)


def test_missing_part_is_an_error_when_strict_and_a_note_otherwise(tmp_path):
    model, _opt, _sched = _setup()
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model)
    model2, opt2, sched2 = _setup(seed=2)
    snap = _snapshot(model2, opt2)
    with pytest.raises(CheckpointError, match=r"no optimizer state.*strict=False"):
        wp.checkpoint.resume(path, model=model2, optimizer=opt2)
    assert _unchanged(model2, opt2, snap)
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2, scheduler=sched2, strict=False)
    assert state.optimizer is None and "optimizer" not in state.restored
    assert any("no optimizer state" in n for n in state.notes) and any("no scheduler" in n for n in state.notes)


def test_optimizer_type_mismatch(trained):
    _, _, _, path = trained  # saved with AdamW
    model, opt, _ = _setup(opt_cls=torch.optim.SGD, seed=4)
    with pytest.raises(CheckpointError, match=r"AdamW.*SGD"):
        wp.checkpoint.resume(path, model=model, optimizer=opt)
    state = wp.checkpoint.resume(path, model=model, optimizer=opt, strict=False)
    assert not opt.state and "optimizer" not in state.restored and any("SGD" in n for n in state.notes)


def test_parts_saved_but_not_passed_are_noted(trained):
    _, _, _, path = trained
    model, _, _ = _setup(seed=4)
    state = wp.checkpoint.resume(path, model=model)
    assert any("optimizer state; no optimizer was passed" in n for n in state.notes)


def test_bad_map_location(trained):
    model, _, _, path = trained
    with pytest.raises(CheckpointError, match="map_location"):
        wp.checkpoint.resume(path, model=model, map_location="warp-drive")


# -- devices and dtypes ----------------------------------------------------------------------------------


def test_resume_into_a_meta_built_model(trained):
    model, opt, _sched, path = trained
    with wp.init_empty():
        model2 = Net()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    params = list(model2.parameters())
    wp.checkpoint.resume(path, model=model2, optimizer=opt2)
    assert all(p.device.type == "cpu" for p in model2.parameters())
    assert all(a is b for a, b in zip(params, model2.parameters()))  # the optimizer still holds the model's
    assert all(v.device.type == "cpu" for s in opt2.state.values() for v in s.values())
    _assert_same_optimizer_state(opt, opt2)
    torch.manual_seed(0)
    _train(model, opt)
    torch.manual_seed(0)
    _train(model2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_optimizer_follows_parameters_the_transfer_had_to_replace(trained):
    import weakref

    model, opt, _, path = trained
    with wp.init_empty():
        model2 = Net()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    watcher = weakref.ref(model2.head.weight)  # a weak reference prevents an identity-keeping swap
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2)
    assert watcher() is not model2.head.weight
    held = [p for g in opt2.param_groups for p in g["params"]]
    assert len(held) == 8 and all(a is b for a, b in zip(held, model2.parameters()))
    assert torch.equal(opt2.state[model2.head.weight]["exp_avg"], opt.state[model.head.weight]["exp_avg"])
    assert any("re-pointed" in n for n in state.notes)


def test_resume_into_another_dtype(trained):
    model, opt, _, path = trained
    model2, _, _ = _setup(seed=5)
    model2.double()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    wp.checkpoint.resume(path, model=model2, optimizer=opt2)
    assert model2.head.weight.dtype == torch.float64
    assert torch.equal(model2.head.weight, model.head.weight.double())
    state = opt2.state[model2.head.weight]
    assert state["exp_avg"].dtype == torch.float64 and state["step"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], opt.state[model.head.weight]["exp_avg"].double())


def test_map_location_places_model_and_optimizer_state(trained):
    _, _, _, path = trained
    with wp.init_empty():
        model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    state = wp.checkpoint.resume(path, model=model, optimizer=opt, map_location="cpu")
    assert model.head.weight.device.type == "cpu" and opt.state[model.head.weight]["exp_avg"].device.type == "cpu"
    assert state.extra == {"note": "hi"}


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("ext", ["safetensors", "pt"])
def test_saved_on_gpu_resumes_on_cpu(tmp_path, ext):
    model, opt, _ = _setup()
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 2, 4, 4, device="cuda")).square().mean().backward()
        opt.step()
    path = wp.checkpoint.save(tmp_path / f"c.{ext}", model=model, optimizer=opt)
    cpu_model, cpu_opt, _ = _setup(seed=3)
    state = wp.checkpoint.resume(path, model=cpu_model, optimizer=cpu_opt)
    assert torch.equal(cpu_model.head.weight, model.head.weight.cpu())
    assert opt.state[model.head.weight]["exp_avg"].cpu().equal(cpu_opt.state[cpu_model.head.weight]["exp_avg"])
    assert "rng:cuda" in state.restored  # CUDA was used when saving, and is here


@pytest.mark.cuda
@needs_cuda
def test_saved_on_cpu_resumes_on_gpu(trained):
    model, _opt, _, path = trained
    model2, opt2, _ = _setup(seed=3)
    wp.checkpoint.resume(path, model=model2, optimizer=opt2, map_location="cuda")
    assert model2.head.weight.is_cuda and torch.equal(model2.head.weight.cpu(), model.head.weight)
    assert opt2.state[model2.head.weight]["exp_avg"].is_cuda
    assert opt2.param_groups[0]["params"][0] is model2.conv.weight


# -- changed architectures -------------------------------------------------------------------------------


def test_new_head_carries_optimizer_state_for_every_unchanged_parameter(trained):
    model, opt, _, path = trained
    model2, _, _ = _setup(seed=6, classes=5)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2, strict=False)
    assert {e.target for e in state.report.skipped} == {"head.weight", "head.bias"}
    unchanged = [n for n, _ in model.named_parameters() if not n.startswith("head.")]
    assert state.optimizer.carried == {n: n for n in unchanged}
    assert set(state.optimizer.fresh) == {"head.weight", "head.bias"}
    assert state.optimizer.fresh["head.weight"] == "its source tensor has another shape"
    old = dict(model.named_parameters())
    for name, p in model2.named_parameters():
        if name in unchanged:
            for k, v in opt.state[old[name]].items():
                assert torch.equal(opt2.state[p][k], v), (name, k)
        else:
            assert p not in opt2.state
    _train(model2, opt2)  # the fresh head initialises its state on the next step
    assert opt2.state[model2.head.weight]["step"].item() == 3
    assert opt2.state[model2.body.weight]["step"].item() == 6
    assert "fresh (its source tensor has another shape): head.weight, head.bias" in state.optimizer.summary()


class Renamed(nn.Module):
    """Net with ``body`` renamed ``trunk`` and declared first (so the optimizer's order differs)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(16, 8)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(8, 3)


def test_state_follows_a_renamed_block(trained):
    model, opt, _, path = trained
    model2 = Renamed()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2, rules=[wp.rename("body.{p}", "trunk.{p}")])
    assert state.optimizer.carried["trunk.weight"] == "body.weight" and not state.optimizer.fresh
    assert torch.equal(opt2.state[model2.trunk.weight]["exp_avg"], opt.state[model.body.weight]["exp_avg"])
    assert torch.equal(opt2.state[model2.conv.bias]["exp_avg_sq"], opt.state[model.conv.bias]["exp_avg_sq"])
    assert "renamed: trunk.weight <- body.weight" in state.optimizer.summary()


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)


def test_state_is_split_like_the_weight(tmp_path):
    torch.manual_seed(0)
    model = Fused()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model.qkv(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, optimizer=opt)
    model2 = Split()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    rule = wp.split("qkv.{p}", ["q.{p}", "k.{p}", "v.{p}"])
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2, rules=[rule])
    buf = opt.state[model.qkv.weight]["momentum_buffer"]
    for i, name in enumerate("qkv"):
        got = opt2.state[getattr(model2, name).weight]["momentum_buffer"]
        assert torch.equal(got, buf[4 * i : 4 * i + 4])
    assert state.optimizer.carried["k.weight"] == "qkv.weight"
    # and back: three momentum buffers fuse into one
    path2 = wp.checkpoint.save(tmp_path / "d.safetensors", model=model2, optimizer=opt2)
    model3 = Fused()
    opt3 = torch.optim.SGD(model3.parameters(), lr=0.1, momentum=0.9)
    wp.checkpoint.resume(path2, model=model3, optimizer=opt3, rules=[wp.fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}")])
    assert torch.equal(opt3.state[model3.qkv.weight]["momentum_buffer"], buf)


@pytest.mark.parametrize("op", ["scale", "callable"])
def test_parameters_changed_in_value_start_with_fresh_state(trained, op):
    _, _opt, _, path = trained
    model2, _, _ = _setup(seed=6)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    rule = (
        wp.transform("conv.weight", "conv.weight", "scale", factor=2.0)
        if op == "scale"
        else wp.transform("conv.weight", "conv.weight", lambda t: t * 2)
    )
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2, rules=[rule])
    assert state.report["conv.weight"].status == "adapted"
    assert "optimizer state does not follow a change of values" in state.optimizer.fresh["conv.weight"]
    assert model2.conv.weight not in opt2.state and model2.conv.bias in opt2.state


def test_rearranged_parameters_carry_rearranged_state(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _step(model, opt, 3)
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, optimizer=opt)
    model2 = nn.Linear(5, 3)  # weight (3, 5): the saved one transposed; bias narrowed to 3
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    rules = [wp.transform("weight", "weight", "transpose"), wp.transform("bias", "bias", "narrow", start=1, length=3)]
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2, rules=rules, strict=False)
    assert not state.optimizer.fresh
    saved = opt.state[model.weight]
    assert torch.equal(opt2.state[model2.weight]["exp_avg"], saved["exp_avg"].t())
    assert torch.equal(opt2.state[model2.bias]["exp_avg_sq"], opt.state[model.bias]["exp_avg_sq"][1:4])
    assert torch.equal(opt2.state[model2.weight]["step"], saved["step"])


def _step(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(2, 3)).square().sum().backward()
        opt.step()


def test_parameter_groups_take_the_hyper_parameters_of_their_source_group(tmp_path):
    torch.manual_seed(0)
    model = Net()
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.startswith("head.")], "lr": 0.01},
        {"params": list(model.head.parameters()), "lr": 0.1},
    ]
    opt = torch.optim.SGD(groups, lr=0.5, momentum=0.9)
    _train(model, opt)
    opt.param_groups[0]["lr"] = 0.003  # as a scheduler would
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, optimizer=opt)
    model2 = Net()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)  # one group now
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2)
    assert state.optimizer.groups == (0,) and opt2.param_groups[0]["lr"] == 0.003
    opt3 = torch.optim.SGD(
        [
            {"params": model2.head.parameters()},
            {"params": [p for n, p in model2.named_parameters() if not n.startswith("head.")]},
        ],
        lr=0.5,
        momentum=0.9,
    )
    wp.checkpoint.resume(path, model=model2, optimizer=opt3)  # same count: by position, as torch does
    assert [g["lr"] for g in opt3.param_groups] == [0.003, 0.1]


def test_checkpoint_spec_and_weights_load_the_model_alone(trained):
    model, _, _, path = trained
    model2, _, _ = _setup(seed=8)
    report = wp.transfer(f"checkpoint:{path}", model2, strict=True)
    assert report.coverage == 1.0 and torch.equal(model2.head.weight, model.head.weight)
    assert set(wp.checkpoint.weights(path)) == set(model.state_dict())
    plain = path.with_name("plain.safetensors")
    wp.save({"w": torch.ones(2)}, plain)
    with pytest.raises(WeightportError, match="not a weightport training checkpoint"):
        wp.checkpoint.weights(plain)


# -- inspect ---------------------------------------------------------------------------------------------


def test_info_describes_the_checkpoint(trained):
    _, _, _, path = trained
    info = wp.checkpoint.info(path)
    assert (info.epoch, info.step, info.metrics) == (2, 3, {"val_loss": 0.25})
    assert info.optimizer_type == "torch.optim.adamw.AdamW" and info.params_with_state == 8
    assert info.param_groups[0]["params"] == 8 and info.param_groups[0]["betas"] == (0.9, 0.999)
    assert info.param_groups[0]["lr"] == pytest.approx(0.005)  # StepLR halved it after 2 of 3 steps
    assert info.scheduler["last_epoch"] == 3 and info.rng == ("torch", "numpy", "python")
    assert info.parts["model"][0] == len(Net().state_dict()) and info.parts["optimizer"][0] == 24
    json.dumps(info.to_dict())


def test_cli_inspect_shows_the_checkpoint(trained, capsys):
    from weightport.cli import main

    _, _, _, path = trained
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "epoch 2, step 3" in out and "optimizer: torch.optim.adamw.AdamW, state for 8 of 8" in out
    assert "group 0 (8 parameters): lr=0.005, betas=(0.9, 0.999)" in out
    assert "scheduler: torch.optim.lr_scheduler.StepLR (last_epoch=3" in out
    assert "size: model 11 tensors" in out and "optimizer 24 tensors" in out
    assert "\nhead.weight " in out and "optimizer/state" not in out
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checkpoint"]["param_groups"][0]["weight_decay"] == 0.01
    # JSON lists every tensor of the file (each part under its prefix); the text view shows the model part
    names = {t["name"] for t in data["tensors"]}
    assert {n for n in names if n.startswith("model/")} == {f"model/{k}" for k in trained[0].state_dict()}
    assert data["checkpoint"]["parts"]["optimizer"]["tensors"] == 24
    assert data["source"]["kind"] == "weightport-checkpoint"


def test_cli_inspect_plain_file_has_no_checkpoint_section(tmp_path, capsys):
    from weightport.cli import main

    wp.save({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert main(["inspect", str(tmp_path / "w.safetensors"), "--json"]) == 0
    assert "checkpoint" not in json.loads(capsys.readouterr().out)


class Tied(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        if tie:
            self.out.weight = self.emb.weight


@pytest.mark.parametrize("tie", [True, False])
def test_tied_weights_resume_strictly_tied_or_untied(tmp_path, tie):
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.out(model.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, optimizer=opt)
    model2 = Tied(tie)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2)  # strict: the alias is no unused tensor
    assert torch.equal(model2.out.weight, model.emb.weight) and (model2.out.weight is model2.emb.weight) == tie
    assert len(state.optimizer.carried) == (1 if tie else 2) and not state.optimizer.fresh
    saved = opt.state[model.emb.weight]["exp_avg"]
    assert all(torch.equal(s["exp_avg"], saved) for s in opt2.state.values())


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


def test_registered_wrappers_are_unwrapped(tmp_path):
    model = Net()
    wrapped = Wrapper(model)
    assert wp.checkpoint.unwrap(wrapped) == (wrapped, ())  # not a wrapper until registered
    wp.checkpoint.register_wrapper(Wrapper.__module__, "Wrapper", "inner")
    assert wp.checkpoint.unwrap(nn.DataParallel(Wrapper(model))) == (model, ("DataParallel", "Wrapper"))
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=Wrapper(model))
    assert set(wp.checkpoint.weights(path)) == set(model.state_dict())


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        wp.checkpoint.resume(tmp_path / "nothing.safetensors", model=Net())


def _sequential(opt: torch.optim.Optimizer, phases: int) -> torch.optim.lr_scheduler.SequentialLR:
    schedules = [torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2) for _ in range(phases)]
    return torch.optim.lr_scheduler.SequentialLR(opt, schedules, milestones=[2 * (i + 1) for i in range(phases - 1)])


def test_a_scheduler_that_cannot_take_the_saved_state_changes_nothing(tmp_path):
    model, opt, _ = _setup()
    sched = _sequential(opt, 3)
    _train(model, opt, sched, steps=3)
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, optimizer=opt, scheduler=sched)
    model2, opt2, _ = _setup(seed=9)
    sched2 = _sequential(opt2, 2)  # the schedule lost a phase since the checkpoint was written
    snap, sched_before = _snapshot(model2, opt2), sched2.state_dict()
    random.seed(5)
    py_before = random.getstate()
    with pytest.raises(CheckpointError, match="scheduler") as failure:
        wp.checkpoint.resume(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert "SequentialLR" in str(failure.value) and "nothing was restored" in str(failure.value)
    assert _unchanged(model2, opt2, snap) and random.getstate() == py_before
    assert sched2.state_dict()["last_epoch"] == sched_before["last_epoch"]


def test_a_scaler_that_cannot_take_the_saved_state_changes_nothing(tmp_path):
    model, opt, _ = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, optimizer=opt, scaler=scaler)
    body_key = "weightport.checkpoint"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    body = json.loads(meta[body_key])
    body["scaler"]["state_dict"] = {"scale": "not a number"}
    meta[body_key] = json.dumps(body)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    model2, opt2, _ = _setup(seed=9)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler2.scale(torch.ones(()))  # creates the scale tensor, so load_state_dict fills it
    snap = _snapshot(model2, opt2)
    with pytest.raises(CheckpointError, match="scaler"):
        wp.checkpoint.resume(tmp_path / "bad.safetensors", model=model2, optimizer=opt2, scaler=scaler2)
    assert _unchanged(model2, opt2, snap) and scaler2.get_scale() == 4.0


def test_a_checkpoint_removed_while_resuming_fails_cleanly_or_resumes(trained, monkeypatch):
    from weightport.checkpoint import _resume

    _, _, _, path = trained
    real_plan = _resume.plan_transfer

    def plan_then_removed(*args, **kwargs):  # another process prunes the file once it is open
        planned = real_plan(*args, **kwargs)
        path.unlink()
        return planned

    monkeypatch.setattr(_resume, "plan_transfer", plan_then_removed)
    model, opt, _ = _setup(seed=9)
    snap = _snapshot(model, opt)
    try:
        wp.checkpoint.resume(path, model=model, optimizer=opt)
    except CheckpointError as e:  # the file's reads open it by path: a clean refusal, nothing changed
        assert "removed" in str(e) and _unchanged(model, opt, snap)


class _Phases:
    """A scheduler-like object that cannot be deep-copied (it holds a lock) and fails halfway."""

    def __init__(self, phases: int) -> None:
        self.lock = threading.Lock()
        self.n, self.phases = 0, [0] * phases

    def state_dict(self) -> dict:
        return {"n": self.n, "phases": list(self.phases)}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]
        for i, v in enumerate(state["phases"]):
            self.phases[i] = v


def test_a_scheduler_that_cannot_be_copied_is_checked_on_itself_and_put_back(tmp_path):
    model, opt, _ = _setup()
    saved = _Phases(3)
    saved.n, saved.phases = 7, [1, 2, 3]
    path = wp.checkpoint.save(tmp_path / "c.safetensors", model=model, optimizer=opt, scheduler=saved)
    model2, opt2, _ = _setup(seed=9)
    sched = _Phases(2)
    snap = _snapshot(model2, opt2)
    with pytest.raises(CheckpointError, match="scheduler"):
        wp.checkpoint.resume(path, model=model2, optimizer=opt2, scheduler=sched)
    assert (sched.n, sched.phases) == (0, [0, 0]) and _unchanged(model2, opt2, snap)
    state = wp.checkpoint.resume(path, model=model2, optimizer=opt2, scheduler=_Phases(3))
    assert "scheduler" in state.restored


class _InterruptedLoad:
    """A scheduler-like object whose real load (the second; the first is the check on a copy) is hit by Ctrl-C."""

    loads = 0

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        type(self).loads += 1
        if type(self).loads == 2:
            signal.raise_signal(signal.SIGINT)
        self.n = state["n"]


def test_ctrl_c_during_a_resume_is_held_until_every_part_is_restored(trained):
    model, opt, _, path = trained
    saved = _InterruptedLoad()
    saved.n = 5
    wp.checkpoint.save(path, model=model, optimizer=opt, scheduler=saved)
    expected_rng = torch.get_rng_state().clone()  # saved in the file, restored last
    torch.manual_seed(1)
    model2, opt2, _ = _setup(seed=9)
    _InterruptedLoad.loads = 0
    sched = _InterruptedLoad()
    with pytest.raises(KeyboardInterrupt):
        wp.checkpoint.resume(path, model=model2, optimizer=opt2, scheduler=sched)
    assert sched.n == 5 and opt2.state  # the interrupted part and the parts after it were restored too
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
