"""wp.save(..., format="dcp"): a torch.distributed.checkpoint folder, atomic, from one process or every rank."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import TinyNet, trained
from dist_harness import run_ranks

import weightport as wp
from weightport.errors import SaveError, WeightportError


def dcp_load(state: dict, path) -> None:
    """``dcp.load`` in this one process (no process group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


def leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".")]


def test_a_saved_dcp_folder_is_read_back_by_dcp_load_and_by_weightport(tmp_path):
    model = trained()
    path = tmp_path / "ck"
    wp.save(model, path, format="dcp", metadata={"origin": "test"})
    assert os.path.isfile(path / ".metadata") and leftovers(tmp_path) == []
    fresh = TinyNet()
    state = fresh.state_dict()
    dcp_load(state, path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    src = wp.open_source(path)
    assert src.info.kind == "dcp" and src.info.metadata == {"origin": "test"} and "__metadata__" not in src.info.ignored
    assert set(src) == set(model.state_dict())
    assert all(torch.equal(src[k], v) for k, v in model.state_dict().items())
    stored = {"__metadata__": ""}
    dcp_load(stored, path)  # torch reads the metadata back as the JSON string it is
    assert stored["__metadata__"] == '{"origin": "test"}'


def test_saving_over_a_dcp_folder_replaces_it_whole(tmp_path):
    path = tmp_path / "ck"
    wp.save({"a": torch.ones(3), "b": torch.zeros(2)}, path, format="dcp", metadata={"v": "1"})
    wp.save({"a": torch.full((3,), 2.0)}, path, format="dcp")
    src = wp.open_source(path)
    assert list(src) == ["a"] and torch.equal(src["a"], torch.full((3,), 2.0)) and src.info.metadata == {}
    assert leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    wp.save({"a": torch.ones(1)}, tmp_path / "empty", format="dcp")
    assert list(wp.open_source(tmp_path / "empty")) == ["a"]


def test_a_failed_dcp_save_leaves_the_previous_folder_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    wp.save({"a": torch.ones(3)}, path, format="dcp")
    before = sorted(os.listdir(path))

    def fail(*args, **kwargs):
        raise dcp.CheckpointException("write failed", {0: (RuntimeError("disk full"), None)})  # a BaseException

    monkeypatch.setattr(dcp, "save", fail)
    with pytest.raises(SaveError, match=r"cannot write .*ck: rank 0: RuntimeError: disk full"):
        wp.save({"a": torch.zeros(3)}, path, format="dcp")
    assert sorted(os.listdir(path)) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert torch.equal(wp.open_source(path)["a"], torch.ones(3))


def test_a_dcp_save_refuses_paths_and_values_it_cannot_hold(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(SaveError, match="file is a file; a DCP checkpoint is a folder"):
        wp.save({"a": torch.ones(1)}, tmp_path / "file", format="dcp")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SaveError, match="mine is a folder holding other files"):
        wp.save({"a": torch.ones(1)}, tmp_path / "mine", format="dcp")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(SaveError, match="does not exist; create it first"):
        wp.save({"a": torch.ones(1)}, tmp_path / "no" / "ck", format="dcp")
    with pytest.raises(WeightportError, match="'b' is on the meta device"):
        wp.save({"a": torch.ones(1), "b": torch.empty(2, device="meta")}, tmp_path / "ck", format="dcp")
    with pytest.raises(WeightportError, match="'__metadata__' is where a DCP folder keeps metadata="):
        wp.save({"__metadata__": torch.ones(1)}, tmp_path / "ck", format="dcp")
    with pytest.raises(WeightportError, match="metadata must map str to str"):
        wp.save({"a": torch.ones(1)}, tmp_path / "ck", format="dcp", metadata={"n": 1})
    assert not (tmp_path / "ck").exists() and leftovers(tmp_path) == []


def test_an_unknown_format_names_the_choices_and_a_named_format_overrides_the_extension(tmp_path):
    with pytest.raises(SaveError, match="format='onnx' is none of 'safetensors', 'torch', 'dcp'"):
        wp.save({"a": torch.ones(1)}, tmp_path / "w.onnx", format="onnx")
    wp.save({"a": torch.ones(2)}, tmp_path / "w.weights", format="safetensors")
    assert wp.open_source(tmp_path / "w.weights").info.kind == "safetensors"
    wp.save({"a": torch.ones(2)}, tmp_path / "w.ckpt", format="torch")
    assert torch.equal(torch.load(tmp_path / "w.ckpt", weights_only=True)["a"], torch.ones(2))
    with pytest.raises(SaveError, match="is a folder"):
        wp.save({"a": torch.ones(1)}, tmp_path, format="safetensors")


# -- from 2 ranks of an FSDP2 model --------------------------------------------------------------------


def _save_sharded_then_load_into_a_fresh_one(rank: int, world_size: int, folder: str) -> dict:
    from test_source_dcp import sharded_stack

    model = sharded_stack(seed=3)
    wp.save(model.state_dict(), folder, format="dcp", metadata={"step": "10"})  # every rank, collectively
    assert os.path.isfile(os.path.join(folder, ".metadata"))  # every rank sees the finished folder
    fresh = sharded_stack(seed=4)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=folder)
    saved = model.state_dict()
    assert all(torch.equal(v.to_local(), saved[k].to_local()) for k, v in state.items())

    bad = dict(model.state_dict())  # a problem on one rank: every rank raises, nothing written
    if rank == 1:
        bad["layers.0.weight"] = "not a tensor"
    try:
        wp.save(bad, folder + "-bad", format="dcp")
        problem = None
    except SaveError as e:
        problem = str(e)
    return {"full": {k: v.full_tensor() for k, v in saved.items()}, "problem": problem}


@pytest.mark.slow
def test_two_fsdp2_ranks_save_one_folder_that_dcp_and_weightport_read(tmp_path):
    from test_source_dcp import Stack

    folder = str(tmp_path / "ck")
    results = run_ranks(_save_sharded_then_load_into_a_fresh_one, folder)
    for r in results:
        assert r["problem"] and "rank 1: save(): 'layers.0.weight' is a str, not a tensor" in r["problem"]
    assert not os.path.exists(folder + "-bad") and leftovers(tmp_path) == []
    src = wp.open_source(folder)
    assert src.info.metadata == {"step": "10"}
    assert sorted(os.path.basename(f) for f in src.info.files) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    target = Stack()
    wp.transfer(src, target, strict=True)
    full = results[0]["full"]
    assert all(torch.equal(v, full[k]) for k, v in target.state_dict().items())
