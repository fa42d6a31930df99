"""wp.save: safetensors that other readers agree with, tied tensors stored once, atomic."""

from __future__ import annotations

import pytest
import torch
from conftest import TiedLM, TinyNet, trained
from safetensors.torch import load_file

import weightport as wp
from weightport.errors import WeightportError


def test_save_round_trips_through_safetensors_and_weightport(tmp_path):
    state = trained().state_dict()
    state["bf16"] = torch.arange(5, dtype=torch.bfloat16)
    state["strided"] = torch.arange(6.0).reshape(2, 3).t()
    wp.save(state, tmp_path / "w.safetensors", metadata={"origin": "test"})
    theirs = load_file(tmp_path / "w.safetensors")
    ours = wp.open_source(tmp_path / "w.safetensors")
    for k, v in state.items():
        assert torch.equal(theirs[k], v) and torch.equal(ours[k], v), k
    assert ours.info.metadata["origin"] == "test"


def test_tied_tensors_are_stored_once_and_come_back_under_both_names(tmp_path):
    m = TiedLM()
    wp.save(m, tmp_path / "tied.safetensors")
    theirs = load_file(tmp_path / "tied.safetensors")
    assert "head.weight" not in theirs  # stored once
    ours = wp.open_source(tmp_path / "tied.safetensors")
    assert torch.equal(ours["head.weight"], m.embed.weight)
    target = TiedLM()
    assert wp.transfer(tmp_path / "tied.safetensors", target, strict=True).coverage == 1.0


def test_save_refuses_bad_input_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "w.safetensors"
    wp.save({"a": torch.ones(2)}, path)
    with pytest.raises(WeightportError, match="'b' is on the meta device"):
        wp.save({"a": torch.zeros(2), "b": torch.empty(2, device="meta")}, path)
    with pytest.raises(WeightportError, match="'c' is a str"):
        wp.save({"c": "text"}, path)  # type: ignore[dict-item]
    with pytest.raises(WeightportError, match="metadata must map str to str"):
        wp.save({"a": torch.zeros(2)}, path, metadata={"x": 1})  # type: ignore[dict-item]
    assert torch.equal(load_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary files left behind


@pytest.mark.parametrize("ext", [".pt", ".pth", ".bin"])
def test_torch_extensions_write_a_file_torch_load_reads_safely(tmp_path, ext):
    model = trained()
    path = tmp_path / f"model{ext}"
    wp.save(model, path)
    back = torch.load(path, weights_only=True)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    report = wp.transfer(path, TinyNet(), strict=True)  # and weightport reads it back
    assert len(report.loaded) == len(back)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("folder", "is a folder"),
        ("missing/model.safetensors", "does not exist"),
        ("model.npz", "unknown extension '.npz'"),
        ("model", r"unknown extension '\(none\)'"),
    ],
)
def test_a_path_that_cannot_be_saved_to_is_a_save_error(tmp_path, where, message):
    (tmp_path / "folder").mkdir()
    with pytest.raises(wp.errors.SaveError, match=message) as info:
        wp.save(trained(), tmp_path / where)
    assert isinstance(info.value, OSError) and str(tmp_path) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # nothing written


def test_an_unwritable_folder_is_a_save_error(tmp_path):
    import os

    if os.geteuid() == 0:
        target = "/proc/weightport-test.safetensors"  # not writable even as root
    else:
        tmp_path.chmod(0o500)
        target = str(tmp_path / "model.safetensors")
    with pytest.raises(wp.errors.SaveError, match="cannot write"):
        wp.save(trained(), target)
