"""wp.checkpoint.Manager: file names, keep_last / keep_best, latest / best, and a save killed midway."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import weightport as wp
from weightport.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 2)


def _save_losses(mgr: wp.checkpoint.Manager, model: nn.Module, losses: list[float]) -> list[Path]:
    return [mgr.save(model=model, epoch=i, step=10 * i, metrics={"val_loss": v}) for i, v in enumerate(losses)]


def test_file_names_carry_epoch_step_and_a_timestamp(tmp_path):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=None)
    path = mgr.save(model=_model(), epoch=3, step=1200)
    assert re.fullmatch(r"ckpt-e0003-s00001200-\d{8}T\d{6}\.\d{6}Z\.safetensors", path.name)
    bare = mgr.save(model=_model())
    assert re.fullmatch(r"ckpt-\d{8}T\d{6}\.\d{6}Z\.safetensors", bare.name)
    assert mgr.list() == [path, bare] and mgr.latest() == bare


def test_keep_last_and_keep_best_min(tmp_path):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=2, keep_best=1, metric="val_loss", mode="min")
    paths = _save_losses(mgr, _model(), [0.9, 0.2, 0.5, 0.7, 0.6])
    assert mgr.list() == [paths[1], paths[3], paths[4]]
    assert sorted(tmp_path.iterdir()) == sorted(mgr.list())
    assert mgr.best() == paths[1] and mgr.latest() == paths[4]


def test_keep_best_max_and_several(tmp_path):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=1, keep_best=2, metric="acc", mode="max")
    model = _model()
    paths = [mgr.save(model=model, epoch=i, metrics={"acc": a}) for i, a in enumerate([0.5, 0.8, 0.6, 0.9, 0.1])]
    assert set(mgr.list()) == {paths[1], paths[3], paths[4]}
    assert mgr.best() == paths[3]


def test_checkpoints_without_the_metric_never_count_as_best(tmp_path, caplog):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=1, keep_best=1, metric="val_loss")
    model = _model()
    first = mgr.save(model=model, metrics={"val_loss": 0.3})
    mgr.save(model=model, metrics={"train_loss": 0.1})
    last = mgr.save(model=model, metrics={"val_loss": float("nan")})
    assert mgr.list() == [first, last] and mgr.best() == first
    assert "no 'val_loss'" in caplog.text


def test_equal_metrics_keep_the_latest_best(tmp_path):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=1, keep_best=1)
    paths = _save_losses(mgr, _model(), [0.5, 0.5, 0.9])
    assert mgr.best() == paths[1] and mgr.list() == [paths[1], paths[2]]


def test_latest_is_the_most_recent_save_not_the_highest_step(tmp_path):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=None)
    model = _model()
    mgr.save(model=model, step=100)
    rewound = mgr.save(model=model, step=40)  # a run restarted from an earlier checkpoint
    assert mgr.latest() == rewound


def test_other_files_in_the_folder_are_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    other = wp.checkpoint.Manager(tmp_path, keep_last=None, prefix="other").save(model=_model())
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=1, keep_best=0)
    for _ in range(3):
        kept = mgr.save(model=_model())
    assert mgr.list() == [kept]
    assert {p.name for p in tmp_path.iterdir()} == {"notes.txt", other.name, kept.name}


def test_resume_from_latest(tmp_path):
    mgr = wp.checkpoint.Manager(tmp_path)
    assert mgr.resume(model=_model()) is None and mgr.latest() is None and mgr.best() is None
    model = _model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    mgr.save(model=model, optimizer=opt, epoch=4, metrics={"val_loss": 1.0})
    model2 = _model(2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    state = mgr.resume(model=model2, optimizer=opt2)
    assert state.epoch == 4 and state.metrics == {"val_loss": 1.0}
    assert torch.equal(model2.weight, model.weight)


def test_damaged_files_are_never_listed(tmp_path, caplog):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=None)
    good = mgr.save(model=_model(), step=1)
    bad = tmp_path / "ckpt-s00000002-20991231T235959.999999Z.safetensors"
    bad.write_bytes(good.read_bytes()[:-8])  # cut short: the header promises more than the file has
    plain = tmp_path / "ckpt-20991231T235959.999998Z.safetensors"
    wp.save({"w": torch.ones(2)}, plain)  # a weights file under a checkpoint's name
    assert mgr.list() == [good] and mgr.latest() == good
    assert "incomplete checkpoint" in caplog.text and "not a weightport training checkpoint" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_best": -1}, "keep_best"),
        ({"mode": "lowest"}, "mode"),
        ({"metric": None}, "keep_best needs metric"),
        ({"prefix": ".hidden"}, "prefix"),
        ({"prefix": 5}, "prefix"),
        ({"metric": 5}, "metric must be"),
        ({"folder": 5}, "folder must be a path"),
    ],
)
def test_bad_options(tmp_path, kwargs, match):
    with pytest.raises(CheckpointError, match=match):
        wp.checkpoint.Manager(**{"folder": tmp_path, **kwargs})


_KILLED_SAVE = textwrap.dedent("""
    import sys, time, torch
    import weightport as wp
    saving = sys.modules["weightport.saving"]
    folder, flag = sys.argv[1], sys.argv[2]
    mgr = wp.checkpoint.Manager(folder, keep_last=2, keep_best=0)
    model = torch.nn.Linear(64, 64)
    mgr.save(model=model, epoch=0, step=1)
    write = saving._write_tensor

    def slow(f, t):
        write(f, t)
        f.flush()
        open(flag, "w").close()  # part of the file is on disk: the parent may kill us now
        time.sleep(60)

    saving._write_tensor = slow
    mgr.save(model=model, epoch=1, step=2)
""")


@pytest.mark.slow
def test_a_save_killed_midway_is_never_picked_and_is_cleaned_up(tmp_path):
    folder, flag = tmp_path / "run", tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(folder), str(flag)], env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never started its second save"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written temporary file
    mgr = wp.checkpoint.Manager(folder, keep_last=2, keep_best=0)
    (first,) = mgr.list()
    assert mgr.latest() == first and "-e0000-s00000001-" in first.name
    assert wp.checkpoint.resume(first, model=nn.Linear(64, 64)).step == 1
    second = mgr.save(model=nn.Linear(64, 64), epoch=1, step=2)  # the next save clears the leftover
    assert sorted(folder.iterdir()) == sorted([first, second]) and mgr.latest() == second


@pytest.mark.parametrize(("epoch", "step"), [(-1, 5), (2, -7), (-3, -40)])
def test_negative_epoch_or_step_checkpoints_are_listed_resumed_and_rotated(tmp_path, epoch, step):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=2, keep_best=0)
    first = mgr.save(model=_model(), epoch=epoch, step=step)
    assert mgr.list() == [first] and mgr.latest() == first
    state = mgr.resume(model=_model(1))
    assert (state.epoch, state.step) == (epoch, step)
    later = [mgr.save(model=_model(), epoch=epoch, step=step) for _ in range(2)]
    assert mgr.list() == later and not first.exists()  # rotated like any other


def test_files_pruned_between_listing_and_reading_are_skipped(tmp_path, monkeypatch, caplog):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=None)
    paths = _save_losses(mgr, _model(), [0.3, 0.2, 0.1])
    reader = wp.checkpoint.Manager(tmp_path, keep_last=None)
    real_scandir = os.scandir

    def scandir_then_prune(folder):  # the writer prunes right after the reader listed the folder
        entries = list(real_scandir(folder))
        for p in paths[1:]:
            p.unlink(missing_ok=True)
        return iter(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_prune)
    assert reader.latest() == paths[0] and reader.best() == paths[0] and reader.list() == [paths[0]]
    assert "ignoring" not in caplog.text  # a pruned file is not a damaged one


def test_a_file_vanishing_while_its_header_is_read_is_skipped(tmp_path, monkeypatch, caplog):
    from weightport.checkpoint import _manager

    mgr = wp.checkpoint.Manager(tmp_path, keep_last=None)
    paths = _save_losses(mgr, _model(), [0.3, 0.2])
    reader = wp.checkpoint.Manager(tmp_path, keep_last=None)
    real = _manager.read_complete_body

    def pruned_midway(path):
        if path == str(paths[1]):
            paths[1].unlink()  # listed and stat()ed, then pruned before its header is read
        return real(path)

    monkeypatch.setattr(_manager, "read_complete_body", pruned_midway)
    assert reader.latest() == paths[0] and reader.list() == [paths[0]]
    assert "ignoring" not in caplog.text


def test_resume_follows_the_latest_when_the_writer_pruned_it_meanwhile(tmp_path, monkeypatch):
    mgr = wp.checkpoint.Manager(tmp_path, keep_last=None)
    paths = _save_losses(mgr, _model(), [0.3, 0.2])
    reader = wp.checkpoint.Manager(tmp_path, keep_last=None)
    real_latest = reader.latest
    calls = []

    def latest_then_pruned():
        found = real_latest()
        if not calls:
            calls.append(found)
            found.unlink()  # pruned after latest() chose it, before resume opened it
        return found

    monkeypatch.setattr(reader, "latest", latest_then_pruned)
    state = reader.resume(model=_model(1))
    assert state is not None and state.path == str(paths[0])


def test_a_checkpoint_with_a_damaged_body_is_skipped_with_a_warning(tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import save_file

    mgr = wp.checkpoint.Manager(tmp_path, keep_last=None)
    good = mgr.save(model=_model(), step=1, metrics={"val_loss": 0.5})
    with safe_open(good, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad_bodies = [
        '{"version": 1, "metrics": {"$dict": 7}}',
        '{"version": 1, "metrics": {"$float": []}}',
        '{"version": 1, "metrics": [1, 2]}',
        '{"version": 1, "metrics": {"$ndarray": "x", "dtype": "O", "shape": [1]}}',
        '{"version": 1, "metrics": ' + "[" * 50000 + "]" * 50000 + "}",
    ]
    for i, body in enumerate(bad_bodies):
        save_file(
            tensors,
            tmp_path / f"ckpt-s0000000{i + 2}-20991231T23595{i}.000000Z.safetensors",
            metadata={**meta, "weightport.checkpoint": body},
        )
    assert mgr.list() == [good] and mgr.latest() == good and mgr.best() == good
    assert caplog.text.count("ignoring") == len(bad_bodies)


_ROTATING_WRITER = textwrap.dedent(
    """
    import sys, pathlib, torch, weightport as wp
    folder, started, stop = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    mgr = wp.checkpoint.Manager(folder, keep_last=1, keep_best=0)
    model = torch.nn.Linear(64, 64)
    for step in range(100000):
        mgr.save(model=model, step=step, metrics={"val_loss": 1.0 / (step + 1)}, rng=False)
        started.touch()
        if stop.exists():
            break
    """
)


@pytest.mark.slow
def test_readers_beside_a_rotating_writer_never_fail(tmp_path):
    folder, started, stop = tmp_path / "run", tmp_path / "started", tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _ROTATING_WRITER, str(folder), str(started), str(stop)], env=env, stderr=subprocess.PIPE
    )
    reads = resumes = 0
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer never saved"
            time.sleep(0.02)
        reader = wp.checkpoint.Manager(folder, keep_last=1, keep_best=1, metric="val_loss")
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            assert reader.latest() is not None and reader.best() is not None
            reader.list()
            reads += 1
            if reads % 4 == 0:
                assert reader.resume(model=nn.Linear(64, 64), rng=False) is not None
                resumes += 1
        assert proc.poll() is None, proc.stderr.read().decode()  # still rotating all along
    finally:
        stop.touch()
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    assert reads > 20 and resumes > 5
