"""Reading (weightport/_reading.py): how many threads read, parallel reads equal sequential ones and fail
cleanly, and CUDA targets are filled through bounded pinned staging. No test asserts a time."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TinyNet, meta_tiny, trained
from safetensors.torch import save_file

import weightport as wp
from weightport import _reading
from weightport.errors import CorruptFileError

# -- parallel reads ------------------------------------------------------------------------------


def test_read_workers_policy(monkeypatch):
    monkeypatch.delenv("WEIGHTPORT_READ_THREADS", raising=False)
    assert _reading.read_workers(_reading.PARALLEL_MIN_BYTES - 1, 100) == 1
    assert _reading.read_workers(10 * _reading.PARALLEL_MIN_BYTES, 1) == 1
    assert 1 <= _reading.read_workers(10 * _reading.PARALLEL_MIN_BYTES, 100) <= 4
    monkeypatch.setenv("WEIGHTPORT_READ_THREADS", "3")
    assert _reading.read_workers(1, 100) == 3
    assert _reading.read_workers(1, 2) == 2


def test_parallel_reads_give_identical_results(trained_file, monkeypatch):
    sequential = meta_tiny()
    wp.transfer(trained_file, sequential)
    monkeypatch.setenv("WEIGHTPORT_READ_THREADS", "4")
    threads: set[str] = set()
    original = wp.sources.base.Source.read_into_many

    def spy(self, names, outs):  # type: ignore[no-untyped-def]
        import threading

        threads.add(threading.current_thread().name)
        return original(self, names, outs)

    monkeypatch.setattr(wp.sources.base.Source, "read_into_many", spy)
    monkeypatch.setattr(wp._reading, "BATCH_BYTES", 64)  # a batch per tensor or so: many batches to share
    parallel = meta_tiny()
    wp.transfer(trained_file, parallel)
    assert any(t.startswith("weightport-read") for t in threads)
    for (n, a), (_, b) in zip(sequential.state_dict().items(), parallel.state_dict().items()):
        assert n.startswith("fc.") or torch.equal(a, b), n  # fc: fresh (random) in both


def test_a_failed_parallel_read_leaves_the_model_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file(trained(num_classes=10).state_dict(), path)
    model = TinyNet(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = wp.plan(path, model, device="cpu", dtype=torch.float64)  # new tensors: the read-job path
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 16)  # the last tensor is now cut short
    monkeypatch.setenv("WEIGHTPORT_READ_THREADS", "4")
    with pytest.raises(CorruptFileError):
        plan.apply()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k


# -- GPU -----------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("meta", [True, False])
def test_cuda_targets_load_through_pinned_staging(trained_file, monkeypatch, meta):
    fills: list[bool] = []
    original = _reading.Stager.fill

    def spy(self, out, read):  # type: ignore[no-untyped-def]
        fills.append(out.is_cuda)
        return original(self, out, read)

    monkeypatch.setattr(_reading.Stager, "fill", spy)
    model = meta_tiny() if meta else TinyNet(num_classes=10)
    wp.transfer(trained_file, model, device="cuda")
    assert fills and all(fills)
    assert all(t.is_cuda for t in model.state_dict().values())
    assert torch.equal(model.conv1.weight.cpu(), trained(num_classes=1000).conv1.weight)


@cuda
@pytest.mark.cuda
def test_stager_bounds_pinned_memory_in_flight():
    stager = _reading.Stager(limit=1024)
    outs = [torch.empty(1000, device="cuda") for _ in range(4)]
    for i, out in enumerate(outs):
        stager.fill(out, lambda buf, i=i: buf.fill_(i))
        assert stager._bytes <= 1024 or len(stager._in_flight) == 1
    stager.copy(outs[0], torch.full((1000,), 7.0))
    stager.finish()
    assert [float(o[0]) for o in outs] == [7.0, 1.0, 2.0, 3.0]
