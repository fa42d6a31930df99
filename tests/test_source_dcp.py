"""DCP checkpoint folders as sources: opened from .metadata alone (safely), read chunk by chunk."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import TinyNet, trained
from dist_harness import run_ranks, shard_rows

import weightport as wp
from weightport.errors import CorruptFileError, SourceError, SourceNotFoundError, TensorNotFoundError


def dcp_save(state: dict, path, **kwargs) -> None:
    """``dcp.save`` in this one process (no process group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True, **kwargs)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_a_dcp_folder_opens_as_a_source_by_path_and_by_dcp_scheme(tmp_path):
    model = trained()
    dcp_save(model.state_dict(), tmp_path / "ck")
    for spec in (tmp_path / "ck", f"dcp:{tmp_path / 'ck'}", str(tmp_path / "ck" / ".metadata")):
        src = wp.open_source(spec)
        assert src.info.kind == "dcp" and set(src) == set(model.state_dict())
        assert src.meta("fc.weight") == ((10, 8), torch.float32)
        assert src.meta("bn1.num_batches_tracked").dtype == torch.int64
        target = TinyNet()
        report = wp.transfer(src, target, strict=True)
        assert report.coverage == 1.0 and same_weights(model, target)


def test_opening_reads_only_the_metadata_and_a_tensor_opens_only_its_files(tmp_path):
    model = trained()
    path = tmp_path / "ck"
    writer = dcp.FileSystemWriter(str(path), single_file_per_rank=False)  # one data file per tensor
    dcp_save(model.state_dict(), path, storage_writer=writer)
    data = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))
    assert len(data) == len(model.state_dict())
    aside = tmp_path / "aside"
    aside.mkdir()
    for f in data:
        shutil.move(path / f, aside / f)
    src = wp.open_source(path)  # no data file there at all
    assert src.meta("fc.weight").shape == (10, 8)
    with pytest.raises(CorruptFileError, match=r"cannot read 'fc\.weight' from __0_\d+\.distcp.*save it again"):
        src["fc.weight"]
    needed = []
    for f in data:  # put back one file at a time: only fc.weight's own makes fc.weight readable
        shutil.move(aside / f, path / f)
        try:
            assert torch.equal(src["fc.weight"], model.fc.weight)
            needed.append(f)
        except CorruptFileError:
            pass
        shutil.move(path / f, aside / f)
    assert len(needed) == 1


def test_read_region_reads_the_box_from_the_chunk_it_lies_in(tmp_path):
    t = torch.arange(48.0).reshape(8, 6)
    dcp_save({"w": t}, tmp_path / "ck")
    src = wp.open_source(tmp_path / "ck")
    part, nbytes = src.read_region("w", ((2, 3), (1, 4)))
    assert torch.equal(part, t[2:5, 1:5]) and part.is_contiguous()
    stored = dcp.FileSystemReader(str(tmp_path / "ck")).read_metadata().storage_data
    assert nbytes == sum(s.length for s in stored.values())  # the one saved chunk, whole
    assert nbytes >= t.numel() * t.element_size()
    empty, n = src.read_region("w", ((3, 0), (0, 6)))
    assert empty.shape == (0, 6) and n == 0


def test_a_nested_state_dict_yields_the_model_part_by_key_or_by_the_usual_search(tmp_path):
    model = trained()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    dcp_save({"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3}, tmp_path / "ck")
    for kwargs in ({}, {"checkpoint_key": "model"}):
        src = wp.open_source(tmp_path / "ck", **kwargs)
        assert src.info.wrapper == "model" and set(src) == set(model.state_dict())
        target = TinyNet()
        wp.transfer(src, target, strict=True)
        assert same_weights(model, target)
    src = wp.open_source(tmp_path / "ck")
    assert {"optim", "epoch"} <= set(src.info.ignored)
    optim = wp.open_source(tmp_path / "ck", checkpoint_key="optim")
    assert "state.0.exp_avg" in optim and "param_groups" in optim.info.ignored  # pickles: never read
    assert torch.equal(optim["state.0.exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(SourceError, match="checkpoint_key='nope' not found"):
        wp.open_source(tmp_path / "ck", checkpoint_key="nope")
    with pytest.raises(TensorNotFoundError):
        src["fc.wieght"]


def test_a_damaged_or_missing_metadata_file_is_named_with_the_fix(tmp_path):
    dcp_save(trained().state_dict(), tmp_path / "ck")
    meta = tmp_path / "ck" / ".metadata"
    good = meta.read_bytes()
    meta.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptFileError, match=r"ck/\.metadata: .*save it again"):
        wp.open_source(tmp_path / "ck")
    meta.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty"):
        wp.open_source(f"dcp:{tmp_path / 'ck'}")
    meta.unlink()
    with pytest.raises(
        CorruptFileError, match=r"ck: holds DCP data files .* but no \.metadata.*save the checkpoint again"
    ):
        wp.open_source(tmp_path / "ck")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="no .metadata file"):
        wp.open_source(f"dcp:{tmp_path / 'empty'}")
    with pytest.raises(SourceNotFoundError, match="no such folder"):
        wp.open_source(f"dcp:{tmp_path / 'missing'}")


class _Runs:
    """Pickles as a call of ``os.system``: what a hostile ``.metadata`` would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _rewrite_metadata(folder, change) -> None:
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)  # the test's own file
    change(md)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_metadata_is_read_without_running_code_from_it(tmp_path):
    model = trained()
    dcp_save(model.state_dict(), tmp_path / "ck")
    marker = tmp_path / "ran"
    _rewrite_metadata(tmp_path / "ck", lambda md: setattr(md, "storage_meta", _Runs(f"touch {marker}")))
    src = wp.open_source(tmp_path / "ck")
    assert not marker.exists() and "posix.system" in src.info.placeholders
    target = TinyNet()
    wp.transfer(src, target, strict=True)
    assert same_weights(model, target) and not marker.exists()
    with pytest.raises(CorruptFileError, match="DCP cannot read it"):  # DCP's own reader: a full unpickle
        wp.open_source(tmp_path / "ck", trust_pickle=True)
    assert marker.exists()  # which ran the command

    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(_Runs(f"touch {tmp_path / 'ran2'}")))
    with pytest.raises(CorruptFileError, match="not a Metadata"):
        wp.open_source(tmp_path / "ck")
    assert not (tmp_path / "ran2").exists()


def test_metadata_pointing_outside_the_folder_is_refused(tmp_path):
    dcp_save({"w": torch.ones(3)}, tmp_path / "ck")

    def escape(md):
        for info in md.storage_data.values():
            info.relative_path = "../secret.distcp"

    _rewrite_metadata(tmp_path / "ck", escape)
    with pytest.raises(CorruptFileError, match="'../secret.distcp', which is not a file name inside the folder"):
        wp.open_source(tmp_path / "ck")


# -- a folder written by 2 ranks of an FSDP2 model ---------------------------------------------------


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(3))
        self.head = torch.nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def sharded_stack(seed: int) -> Stack:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Stack()
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _save_sharded_then_read_each_rank(rank: int, world_size: int, folder: str) -> dict:
    model = sharded_stack(seed=7)
    state = model.state_dict()
    dcp.save(state, checkpoint_id=folder)
    src = wp.open_source(folder)  # inside the process group: read by this rank alone, no collective
    start, rows = shard_rows(rank, world_size, 64)
    part, nbytes = src.read_region("layers.0.weight", ((start, rows), (0, 64)))
    assert torch.equal(part, state["layers.0.weight"].to_local())
    fresh = sharded_stack(seed=8)  # and into a sharded model: each rank reads the chunks of its rows
    report = wp.transfer(folder, fresh, strict=True)
    assert all(torch.equal(v.to_local(), state[k].to_local()) for k, v in fresh.state_dict().items())
    return {
        "full": {k: v.full_tensor() for k, v in state.items()},
        "bytes": nbytes,
        "per_rank": report.bytes_read_per_rank,
    }


@pytest.mark.slow
def test_a_folder_saved_by_two_fsdp2_ranks_loads_into_a_plain_model(tmp_path):
    folder = str(tmp_path / "ck")
    results = run_ranks(_save_sharded_then_read_each_rank, folder)
    full = results[0]["full"]
    src = wp.open_source(folder)
    assert len([f for f in src.info.files if f.endswith(".distcp")]) == 2
    target = Stack()
    wp.transfer(folder, target, strict=True)
    assert all(torch.equal(v, full[k]) for k, v in target.state_dict().items())

    whole = src.meta("layers.0.weight").nbytes
    part, nbytes = src.read_region("layers.0.weight", ((0, 2), (1, 3)))  # inside rank 0's rows
    assert torch.equal(part, full["layers.0.weight"][0:2, 1:4])
    assert nbytes == results[0]["bytes"] and whole / 2 <= nbytes < whole / 2 + 2048  # rank 0's chunk, whole
    assert results[1]["bytes"] == nbytes
    stored = sum(os.path.getsize(f) for f in src.info.files if f.endswith(".distcp"))
    per_rank = results[0]["per_rank"]
    assert len(per_rank) == 2 and sum(per_rank) <= stored and all(n < 0.6 * stored for n in per_rank)
    _, both = src.read_region("layers.0.weight", ((31, 2), (0, 64)))  # rows of both ranks
    assert both == 2 * nbytes

    os.remove(os.path.join(folder, "__1_0.distcp"))  # rank 1's file gone: rank 0's rows still read
    part, _ = src.read_region("layers.0.weight", ((0, 32), (0, 64)))
    assert torch.equal(part, full["layers.0.weight"][0:32])
    with pytest.raises(CorruptFileError, match="__1_0.distcp"):
        src["layers.0.weight"]


def test_a_mutated_metadata_file_opens_or_fails_as_a_weightport_error(tmp_path):
    import random

    from weightport.errors import WeightportError

    dcp_save({"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2)}, "step": 3}, tmp_path / "ck")
    meta = tmp_path / "ck" / ".metadata"
    good = meta.read_bytes()
    rng = random.Random(0)
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        meta.write_bytes(bytes(data))
        try:
            src = wp.open_source(tmp_path / "ck")
            for name in src:
                src[name]
                src.read_region(name, tuple((0, 1) for _ in src.meta(name).shape))
        except WeightportError:
            pass
