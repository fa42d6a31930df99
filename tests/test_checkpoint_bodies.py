"""Crafted checkpoint bodies: whatever the JSON document in a checkpoint's metadata holds, save,
resume, info and the Manager raise only WeightportError (a CheckpointError naming the file), a
failed resume changes nothing, and a Manager skips the file with a warning.

The fuzz run is derandomized with a small fixed example count, so CI is reproducible and quick;
set ``WEIGHTPORT_FUZZ_EXAMPLES`` to fuzz longer, with fresh random inputs, locally.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport.errors import CheckpointError, WeightportError

BODY_KEY = "weightport.checkpoint"
EXAMPLES = int(os.environ.get("WEIGHTPORT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="WEIGHTPORT_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def _parts(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    return model, opt, sched, scaler


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    model, opt, sched, scaler = _parts()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        sched.step()
    path = wp.checkpoint.save(
        tmp_path_factory.mktemp("base") / "c.safetensors",
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        epoch=1,
        step=2,
        metrics={"val_loss": 0.5},
        extra={"t": (1, 2.5), "nan": float("nan"), "arr": np.arange(3), "by_int": {3: "x"}, "w": torch.ones(2)},
    )
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta, json.loads(meta[BODY_KEY])


def _write(folder: Path, base, body_text: str) -> Path:
    tensors, meta, _ = base
    path = folder / "ckpt-e0001-s00000002-20260101T000000.000000Z.safetensors"
    save_file(tensors, path, metadata={**meta, BODY_KEY: body_text})
    return path


def _state(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: Any) -> Any:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        repr(opt.state_dict()),
        repr(sched.state_dict()),
        repr(scaler.state_dict()),
        torch.get_rng_state().clone(),
        random.getstate(),
        repr(np.random.get_state()),
    )


def _same(a: Any, b: Any) -> bool:
    return (
        all(torch.equal(v, b[0][k]) for k, v in a[0].items())
        and a[1:4] == b[1:4]
        and torch.equal(a[4], b[4])
        and (a[5:] == b[5:])
    )


def _exercise(path: Path) -> None:
    """Every public checkpoint entry point on ``path``: only WeightportError may escape, and a failed
    resume leaves every part as it was."""
    try:
        wp.checkpoint.info(path).lines()
    except WeightportError:
        pass
    model, opt, sched, scaler = _parts(seed=3)
    before = _state(model, opt, sched, scaler)
    try:
        wp.checkpoint.resume(path, model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    except WeightportError:
        assert _same(before, _state(model, opt, sched, scaler)), "a failed resume changed something"
    mgr = wp.checkpoint.Manager(path.parent, keep_last=None, keep_best=1)
    mgr.list(), mgr.latest(), mgr.best()
    mgr.save(model=model, epoch=2, metrics={"val_loss": 0.1}, rng=False)


FOLDERS = itertools.count()
MARKERS = ["$tensor", "$tuple", "$dict", "$float", "$ndarray", "$dtype", "$device", "dtype", "shape"]
FIELDS = ["version", "epoch", "step", "state", "param_groups", "params", "state_dict", "type", "param_names"]
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["model/0.weight", "rng/torch", "inf", "nan", "cpu", "meta", "float32", "O", "<f8", "x", ""]),
    st.text(max_size=8),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(MARKERS + FIELDS) | st.text(max_size=4), inner, max_size=3),
    ),
    max_leaves=12,
)


def _mutate(doc: Any, draw: Any) -> Any:
    """Replace one node of the body (chosen by walking down from the root) with a crafted value."""
    if isinstance(doc, (dict, list)) and doc and draw(st.integers(0, 3)) > 0:
        keys = list(doc.keys()) if isinstance(doc, dict) else list(range(len(doc)))
        key = draw(st.sampled_from(keys))
        doc[key] = _mutate(doc[key], draw)
        return doc
    return draw(values)


@pytest.fixture(autouse=True)
def _global_rng_kept():
    """Resumes that succeed restore the saved RNG states; the tests after these see their own."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_crafted_bodies_raise_only_weightport_errors_and_change_nothing(base, tmp_path, data):
    body = _mutate(copy.deepcopy(base[2]), data.draw)
    folder = tmp_path / f"f{next(FOLDERS)}"
    folder.mkdir()
    _exercise(_write(folder, base, json.dumps(body)))


DAMAGED = {
    "tensor key that is a number": lambda b: b["extra"].update(w={"$tensor": 5}),
    "unhashable dict key": lambda b: b["extra"].update(w={"$dict": [[{"a": 1}, 1]]}),
    "dict pairs that are no pairs": lambda b: b["extra"].update(w={"$dict": 7}),
    "device that does not exist": lambda b: b["extra"].update(w={"$device": "nowhere:7"}),
    "float that is no number": lambda b: b["extra"].update(w={"$float": "abc"}),
    "numpy array of objects": lambda b: b["extra"].update(w={"$ndarray": "extra/arr", "dtype": "O", "shape": [3]}),
    "numpy array of another shape": lambda b: b["extra"].update(
        w={"$ndarray": "extra/arr", "dtype": "<i8", "shape": [7]}
    ),
    "nesting past the stack": lambda b: b["extra"].update(w="NESTED"),
    "optimizer that is a list": lambda b: b.update(optimizer=[1]),
    "optimizer groups that are numbers": lambda b: b["optimizer"]["state_dict"].update(param_groups=[1, 2]),
    "optimizer state that is a number": lambda b: b["optimizer"]["state_dict"].update(state=3),
    "step count that is a string": lambda b: b["optimizer"]["state_dict"]["state"]["$dict"][0][1].update(step="x"),
    "scheduler state that is a list": lambda b: b["scheduler"].update(state_dict=[1]),
    "rng that is a list": lambda b: b.update(rng=[1]),
    "python rng of the wrong shape": lambda b: b["rng"].update(python={"$tuple": [3]}),
    "epoch that is a string": lambda b: b.update(epoch="3"),
    "extra that is a tuple": lambda b: b.update(extra={"$tuple": [1]}),
    "param names that are numbers": lambda b: b["optimizer"].update(param_names=[1]),
}


@pytest.mark.parametrize("damage", list(DAMAGED), ids=list(DAMAGED))
def test_a_damaged_body_is_a_checkpoint_error_and_changes_nothing(base, tmp_path, damage, caplog):
    body = copy.deepcopy(base[2])
    DAMAGED[damage](body)
    path = _write(tmp_path, base, json.dumps(body).replace('"NESTED"', "[" * 5000 + "]" * 5000))
    model, opt, sched, scaler = _parts(seed=3)
    before = _state(model, opt, sched, scaler)
    with pytest.raises(CheckpointError, match=str(path.name)):
        wp.checkpoint.resume(path, model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    assert _same(before, _state(model, opt, sched, scaler))
    try:
        wp.checkpoint.info(path).lines()
    except CheckpointError:
        pass
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=None)
    mgr.save(model=model, epoch=5, rng=False)
    assert len(mgr.list()) in (1, 2) and mgr.latest() is not None


def test_a_number_too_long_to_parse_is_a_checkpoint_error(base, tmp_path):
    text = (
        json.dumps(base[2])
        .replace('"epoch":1', '"epoch":' + "9" * 5000)
        .replace('"epoch": 1', '"epoch": ' + "9" * 5000)
    )
    path = _write(tmp_path, base, text)
    model = _parts(seed=3)[0]
    for call in (lambda: wp.checkpoint.info(path), lambda: wp.checkpoint.resume(path, model=model)):
        with pytest.raises(CheckpointError, match="not valid JSON"):
            call()
    assert wp.checkpoint.Manager(tmp_path).list() == []
