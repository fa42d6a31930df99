"""Streaming guarantees, proven by instrumenting every read of the file.

* each needed tensor is read once, straight into its destination (meta targets: ``preadv``
  into the new tensor; built targets: one copy from the mapped file);
* unused, dropped and shape-mismatched source tensors are never read;
* no whole-source dict is materialised; sharded sources open only the shards they need.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TinyNet, trained
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport.sources import _mapped
from weightport.sources.base import Source
from weightport.sources.safetensors import read_header


class ReadLog:
    """Records every byte range read from weight files: ``preadv`` reads and mapped views."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.preads: list[tuple[str, int, int]] = []
        self.views: list[tuple[str, int, int]] = []
        self.mapped: list[str] = []
        read_run, view, map_ = _mapped.MappedFile.read_run, _mapped.MappedFile.view, _mapped.MappedFile._map
        log = self

        def spy_run(self: _mapped.MappedFile, offset: int, outs: list[torch.Tensor]) -> None:
            at = offset
            for out in outs:  # one range per tensor, as if each were read on its own
                log.preads.append((self.path, at, out.nbytes))
                at += out.nbytes
            read_run(self, offset, outs)

        def spy_view(self: _mapped.MappedFile, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
            log.views.append((self.path, offset, nbytes))
            return view(self, offset, nbytes, dtype)

        def spy_map(self: _mapped.MappedFile):  # type: ignore[no-untyped-def]
            log.mapped.append(self.path)
            return map_(self)

        monkeypatch.setattr(_mapped.MappedFile, "read_run", spy_run)  # every read into a tensor
        monkeypatch.setattr(_mapped.MappedFile, "view", spy_view)
        monkeypatch.setattr(_mapped.MappedFile, "_map", spy_map)

    def ranges(self) -> list[tuple[str, int, int]]:
        return self.preads + self.views

    def bytes_read(self) -> int:
        return sum(n for _, _, n in self.ranges())


def spans(path: os.PathLike[str] | str) -> dict[str, tuple[int, int]]:
    """Byte range of every tensor in a safetensors file."""
    header, start = read_header(os.fspath(path))
    header.pop("__metadata__", None)
    return {k: (start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in header.items()}


def touched(log: ReadLog, path: str, table: dict[str, tuple[int, int]]) -> set[str]:
    """Names of the tensors whose bytes were (even partly) read."""
    out = set()
    for p, offset, nbytes in log.ranges():
        if os.path.samefile(p, path):
            for name, (b, e) in table.items():
                if offset < e and b < offset + nbytes and e > b:
                    out.add(name)
    return out


@pytest.fixture
def checkpoint(tmp_path):
    """A 1000-class TinyNet checkpoint plus extra tensors the target does not use."""
    state = trained(num_classes=1000).state_dict()
    state["aux_head.weight"] = torch.randn(7, 8)  # unused: no target of that name
    state["ema.fc.weight"] = torch.randn(1000, 8)  # dropped by a rule
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    return path


@pytest.mark.parametrize("meta", [True, False], ids=["meta-built", "built"])
def test_unused_dropped_and_mismatched_tensors_are_never_read(checkpoint, monkeypatch, meta):
    if meta:
        with wp.init_empty():
            model = TinyNet(num_classes=10)
    else:
        model = TinyNet(num_classes=10)
    log = ReadLog(monkeypatch)
    report = wp.transfer(checkpoint, model, rules=[wp.drop("ema.**")])
    table = spans(checkpoint)
    assert set(report.unused) >= {"aux_head.weight", "fc.weight", "fc.bias"}  # fc: shape mismatch
    assert report.dropped == ("ema.fc.weight",)
    read = touched(log, str(checkpoint), table)
    loaded = {k for e in report.loaded for k in e.sources}
    assert read == loaded
    assert not read & {"aux_head.weight", "ema.fc.weight", "fc.weight", "fc.bias"}


def test_meta_target_reads_each_tensor_once_straight_into_its_destination(checkpoint, monkeypatch):
    with wp.init_empty():
        model = TinyNet(num_classes=10)
    meta_params = {n for n, p in model.named_parameters() if p.is_meta}
    log = ReadLog(monkeypatch)
    report = wp.transfer(checkpoint, model)
    loaded = {e.target: e.sources[0] for e in report.loaded}
    table = spans(checkpoint)
    by_offset = {table[k][0]: k for k in loaded.values()}
    # parameters (on meta): preadv straight into the new tensor; real buffers: one copy from the map
    assert sorted(by_offset[o] for _, o, _ in log.preads) == sorted(loaded[n] for n in loaded if n in meta_params)
    assert sorted(by_offset[o] for _, o, _ in log.views) == sorted(loaded[n] for n in loaded if n not in meta_params)
    assert log.bytes_read() == report.stats["bytes_loaded"]  # each byte once


def test_built_target_copies_once_from_the_mapped_file_and_releases_pages(checkpoint, monkeypatch):
    model = TinyNet(num_classes=10)
    log = ReadLog(monkeypatch)
    released: list[tuple[int, int]] = []
    release = _mapped.MappedFile.release
    monkeypatch.setattr(
        _mapped.MappedFile, "release", lambda self, o, n: (released.append((o, n)), release(self, o, n))[1]
    )
    report = wp.transfer(checkpoint, model)
    loaded = [k for e in report.loaded for k in e.sources]
    assert log.preads == [] and len(log.views) == len(loaded)
    assert log.bytes_read() == report.stats["bytes_loaded"]
    assert sorted(o for o, _ in released) == sorted(o for _, o, _ in log.views)  # every page handed back


def test_no_owning_copy_of_the_source_is_ever_made(checkpoint, monkeypatch):
    def refuse(self, name):  # type: ignore[no-untyped-def]
        raise AssertionError(f"source[{name!r}] materialised an owning copy")

    monkeypatch.setattr(Source, "__getitem__", refuse)
    for meta in (True, False):
        if meta:
            with wp.init_empty():
                model = TinyNet(num_classes=10)
        else:
            model = TinyNet(num_classes=10)
        wp.transfer(checkpoint, model)
        assert torch.equal(model.conv1.weight, trained(num_classes=1000).conv1.weight)


def test_planning_reads_no_tensor_data(checkpoint, monkeypatch):
    log = ReadLog(monkeypatch)
    with wp.init_empty():
        model = TinyNet(num_classes=10)
    plan = wp.plan(checkpoint, model, on_mismatch="adapt")
    assert plan.report.entries and log.ranges() == [] and log.mapped == []


def _sharded(tmp_path):
    """Three shards; the third holds only tensors the target does not use or drops."""
    state = trained(num_classes=10).state_dict()
    names = list(state)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    extra = {"teacher.weight": torch.randn(64, 64), "ema.conv1.weight": torch.randn(8, 3, 3, 3)}
    weight_map = {}
    for i, (part, tensors) in enumerate(
        [(first, {k: state[k] for k in first}), (second, {k: state[k] for k in second}), (list(extra), extra)]
    ):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / fname)
        weight_map.update({k: fname for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state


@pytest.mark.parametrize("meta", [True, False], ids=["meta-built", "built"])
def test_sharded_source_opens_and_reads_only_the_needed_shards(tmp_path, monkeypatch, meta):
    state = _sharded(tmp_path)
    log = ReadLog(monkeypatch)
    source = wp.open_source(tmp_path)
    if meta:
        with wp.init_empty():
            model = TinyNet(num_classes=10)
    else:
        model = TinyNet(num_classes=10)
    report = wp.transfer(source, model, rules=[wp.drop("ema.**")])
    assert sorted(os.path.basename(p) for p in source.opened_shards) == [  # type: ignore[attr-defined]
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
    ]
    assert not any("model-00003" in p for p, _, _ in log.ranges() + [(p, 0, 0) for p in log.mapped])
    assert report.unused == ("teacher.weight",) and report.dropped == ("ema.conv1.weight",)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_torch_zip_checkpoint_streams_too(tmp_path, monkeypatch):
    state = trained(num_classes=1000).state_dict()
    state["teacher.weight"] = torch.randn(256, 256)
    torch.save(state, tmp_path / "w.pth")
    with wp.init_empty():
        model = TinyNet(num_classes=10)
    log = ReadLog(monkeypatch)
    report = wp.transfer(tmp_path / "w.pth", model)
    assert log.bytes_read() == report.stats["bytes_loaded"]
    assert report.stats["bytes_loaded"] < (256 * 256 + 1000 * 8) * 4  # neither the teacher nor the head was read
    assert torch.equal(model.blocks[0][0].weight, state["blocks.0.0.weight"])


def test_fresh_tensors_of_a_meta_target_are_initialised_loaded_ones_never(checkpoint, monkeypatch):
    """No wasted init: building under init_empty runs no real initialisation."""
    calls: list[tuple[int, ...]] = []
    original = nn.init.kaiming_uniform_

    def spy(tensor, *a, **k):  # type: ignore[no-untyped-def]
        if not tensor.is_meta:
            calls.append(tuple(tensor.shape))
        return original(tensor, *a, **k)

    monkeypatch.setattr(nn.init, "kaiming_uniform_", spy)
    with wp.init_empty():
        model = TinyNet(num_classes=10)
    assert calls == []  # building initialised nothing real
    import weightport._fresh as fresh

    replayed: list[tuple[int, ...]] = []
    real_replay = fresh.replay
    monkeypatch.setattr(
        fresh, "replay", lambda rec, like, *a: replayed.append(tuple(like.shape)) or real_replay(rec, like, *a)
    )
    wp.transfer(checkpoint, model)
    assert replayed == [(10, 8), (10,)]  # only the new head is initialised (by its recorded init)


def _many(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    tensors = {f"t{i:02d}": torch.randn(i % 5 + 1, 3) for i in range(12)}
    tensors["half"] = torch.randn(7, dtype=torch.float16)
    tensors["brain"] = torch.randn(2, 2).to(torch.bfloat16)  # no numpy dtype: the byte-view path
    tensors["scalar"] = torch.tensor(3.5)
    path = str(tmp_path / "many.safetensors")
    save_file(tensors, path)
    return path, tensors


def test_tensors_next_to_each_other_are_read_with_one_call_in_any_order(tmp_path, monkeypatch):
    path, tensors = _many(tmp_path)
    source = wp.open_source(path)
    runs: list[int] = []
    read_run = _mapped.MappedFile.read_run
    monkeypatch.setattr(
        _mapped.MappedFile, "read_run", lambda self, o, outs: (runs.append(len(outs)), read_run(self, o, outs))
    )
    names = list(reversed(tensors))  # not the file's order
    outs = [torch.empty(tensors[n].shape, dtype=tensors[n].dtype) for n in names]
    outs[0] = torch.empty(tensors[names[0]].shape, dtype=torch.float64)  # another dtype: read through a view
    source.read_into_many(names, outs)
    for name, out in zip(names, outs):
        assert torch.equal(out, tensors[name].to(out.dtype)), name
    assert sum(runs) == len(names) - 1 and len(runs) <= 2  # the cast one left a gap, at most


def test_a_run_survives_short_reads_and_many_buffers(tmp_path, monkeypatch):
    path, tensors = _many(tmp_path)
    source = wp.open_source(path)
    preadv = os.preadv

    def stingy(fd, buffers, offset):  # type: ignore[no-untyped-def]
        return preadv(fd, [memoryview(buffers[0]).cast("B")[:5]], offset)  # 5 bytes at most per call

    monkeypatch.setattr(_mapped, "IOV_MAX", 3)
    monkeypatch.setattr(_mapped.os, "preadv", stingy)
    outs = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in tensors.items()}
    source.read_into_many(list(outs), list(outs.values()))
    assert all(torch.equal(outs[n], t) for n, t in tensors.items())


def test_a_run_cut_short_by_the_end_of_the_file_is_a_corrupt_file(tmp_path):
    path, tensors = _many(tmp_path)
    source = wp.open_source(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    outs = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in tensors.items()}
    with pytest.raises(wp.errors.CorruptFileError, match="unexpected end of file"):
        source.read_into_many(list(outs), list(outs.values()))


def test_a_sharded_source_reads_each_shard_in_runs(tmp_path):
    tensors = {f"layer.{i}.w": torch.randn(3) for i in range(6)}
    wp.save(dict(list(tensors.items())[:3]), tmp_path / "a.safetensors")
    wp.save(dict(list(tensors.items())[3:]), tmp_path / "b.safetensors")
    index = {"weight_map": {n: "a.safetensors" if i < 3 else "b.safetensors" for i, n in enumerate(tensors)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    source = wp.open_source(tmp_path)
    outs = [torch.empty(3) for _ in tensors]
    source.read_into_many(list(tensors)[::-1], outs)
    assert all(torch.equal(o, t) for o, t in zip(outs, list(tensors.values())[::-1]))
