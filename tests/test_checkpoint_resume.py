"""Exact resume, proven: N steps straight == k steps + save + resume in a FRESH process + N-k steps.

Parameters, optimizer state, LR and every loss are compared bitwise, for SGD with momentum
and AdamW, each with an LR scheduler, dropout on, and data drawn from the torch, numpy and
Python random streams (so every RNG state must come back). The same file runs the training
in child processes (``python test_checkpoint_resume.py MODE OUT``); the test compares.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TOTAL, FIRST = 12, 5
OPTIMIZERS = ("sgd", "adamw")


def _build(kind: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1)
    )
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        sched: object = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=TOTAL)
    return model, opt, sched


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(8, 6)
    noise = torch.from_numpy(np.random.normal(size=(8, 1)).astype(np.float32))
    y = x[:, :1] * random.uniform(0.5, 1.5) + 0.1 * noise
    return x, y


def _steps(model: nn.Module, opt: torch.optim.Optimizer, sched: object, start: int, stop: int) -> list[float]:
    losses = []
    for _ in range(start, stop):
        x, y = _batch()
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        losses.append(loss.item())
    return losses


def _dump(out: Path, name: str, model: nn.Module, opt: torch.optim.Optimizer, losses: list[float]) -> None:
    state = opt.state_dict()
    tensors = {f"param/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    tensors.update({f"opt/{i}/{k}": v.clone() for i, s in state["state"].items() for k, v in s.items()})
    torch.save(tensors, out / f"{name}.pt")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    (out / f"{name}.json").write_text(json.dumps({"losses": losses, "groups": groups}))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def child(mode: str, out: Path) -> None:
    """One training process. ``before``: N steps straight, then (reseeded) k steps and a save.
    ``after``: resume the saved run and train the remaining N-k steps; this process has seen nothing else."""
    import weightport as wp

    torch.set_num_threads(1)
    for kind in OPTIMIZERS:
        ckpt = out / f"{kind}.safetensors"
        if mode == "before":
            _seed_everything(0)
            model, opt, sched = _build(kind, 0)
            _dump(out, f"straight-{kind}", model, opt, _steps(model, opt, sched, 0, TOTAL))
            _seed_everything(0)
            model, opt, sched = _build(kind, 0)
            losses = _steps(model, opt, sched, 0, FIRST)
            wp.checkpoint.save(ckpt, model=model, optimizer=opt, scheduler=sched, step=FIRST, extra={"losses": losses})
        else:
            for variant, rng in (("resumed", True), ("control", False)):
                _seed_everything(123)  # different seeds and init: everything must come from the checkpoint
                model, opt, sched = _build(kind, 123)
                state = wp.checkpoint.resume(ckpt, model=model, optimizer=opt, scheduler=sched, rng=rng)
                losses = state.extra["losses"] + _steps(model, opt, sched, state.step, TOTAL)
                _dump(out, f"{variant}-{kind}", model, opt, losses)


def _run(mode: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, __file__, mode, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


def _load(out: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    return torch.load(out / f"{name}.pt", weights_only=True), json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bitwise_exact(tmp_path):
    for mode in ("before", "after"):
        _run(mode, tmp_path)
    for kind in OPTIMIZERS:
        straight, s_meta = _load(tmp_path, f"straight-{kind}")
        resumed, r_meta = _load(tmp_path, f"resumed-{kind}")
        assert len(s_meta["losses"]) == TOTAL
        assert r_meta["losses"] == s_meta["losses"], kind  # floats compared exactly
        assert r_meta["groups"] == s_meta["groups"], kind  # lr from the scheduler, betas, momentum …
        assert straight.keys() == resumed.keys() and any(k.startswith("opt/") for k in straight)
        for key, value in straight.items():
            assert value.dtype == resumed[key].dtype and torch.equal(value, resumed[key]), (kind, key)
        # Control: the same resume without the RNG states drifts (dropout masks and data differ),
        # so the comparison above is sensitive to everything the checkpoint must carry.
        _, c_meta = _load(tmp_path, f"control-{kind}")
        assert c_meta["losses"][:FIRST] == s_meta["losses"][:FIRST]
        assert c_meta["losses"][FIRST:] != s_meta["losses"][FIRST:]


if __name__ == "__main__":
    child(sys.argv[1], Path(sys.argv[2]))
