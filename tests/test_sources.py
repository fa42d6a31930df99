"""Local sources: formats, laziness, nested checkpoints, prefixes."""

from __future__ import annotations

import gc
import json
import os
import pickle
import sys

import pytest
import torch
import torchvision
from conftest import TinyNet, save_legacy, trained
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport.errors import SourceError, SourceNotFoundError, TensorNotFoundError
from weightport.sources import _mapped
from weightport.sources._mapped import MappedFile


def _same(src: wp.Source, state: dict[str, torch.Tensor]) -> None:
    assert sorted(src) == sorted(state)
    for k, v in state.items():
        assert src.meta(k).shape == tuple(v.shape)
        assert src.meta(k).dtype == v.dtype
        assert torch.equal(src[k], v), k


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    sd = trained().state_dict()
    sd["half"] = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    sd["strided"] = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    return sd


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy", "pickle"])
def test_every_file_format_round_trips(tmp_path, state, fmt):
    path = tmp_path / f"w.{ {'safetensors': 'safetensors', 'pickle': 'pkl'}.get(fmt, 'pth') }"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif fmt == "zip":
        torch.save(state, path)
    elif fmt == "legacy":
        save_legacy(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    src = wp.open_source(path)
    _same(src, state)
    assert (
        src.info.kind
        == {"safetensors": "safetensors", "zip": "torch-zip", "legacy": "torch-legacy", "pickle": "pickle"}[fmt]
    )


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".tar"])
def test_torch_extensions(tmp_path, state, suffix):
    torch.save(state, tmp_path / f"w{suffix}")
    _same(wp.open_source(tmp_path / f"w{suffix}"), state)


def test_shared_storage_views_are_read_correctly(tmp_path):
    base = torch.arange(10.0)
    state = {"a": base, "b": base[2:5], "c": base.view(2, 5)[:, 1]}
    torch.save(state, tmp_path / "v.pt")
    save_legacy(state, tmp_path / "v_legacy.pt")
    for name in ("v.pt", "v_legacy.pt"):
        src = wp.open_source(tmp_path / name)
        for k, v in state.items():
            assert torch.equal(src[k], v), (name, k)


def test_listing_reads_no_tensor_data(tmp_path, state, monkeypatch):
    torch.save(state, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    touched = []
    monkeypatch.setattr(_mapped.MappedFile, "_map", lambda self: touched.append("map"))
    monkeypatch.setattr(_mapped.MappedFile, "read_run", lambda *a: touched.append("read"))
    for name in ("w.pt", "w.safetensors"):
        src = wp.open_source(tmp_path / name)
        for k in src:
            src.meta(k)
    assert touched == []


def test_source_tensors_are_owning_copies(tmp_path, state):
    torch.save(state, tmp_path / "w.pt")
    src = wp.open_source(tmp_path / "w.pt")
    t = src["fc.weight"]
    t.add_(100)
    assert torch.equal(src["fc.weight"], state["fc.weight"])


@pytest.mark.parametrize("key", ["state_dict", "model", "net", "model_state_dict", "module"])
def test_nested_checkpoints_are_unwrapped(tmp_path, state, key):
    torch.save({key: state, "optimizer": {"state": {}}, "epoch": 7, "args": {"lr": 0.1}}, tmp_path / "c.pth")
    src = wp.open_source(tmp_path / "c.pth")
    _same(src, state)
    assert src.info.wrapper == key
    assert "optimizer" in src.info.ignored and "epoch" in src.info.ignored


def test_ema_variant_used_when_alone_and_mentioned_when_not(tmp_path, state):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"state_dict_ema": ema, "epoch": 1}, tmp_path / "ema.pth")
    src = wp.open_source(tmp_path / "ema.pth")
    assert src.info.wrapper == "state_dict_ema"
    torch.save({"state_dict": state, "state_dict_ema": ema}, tmp_path / "both.pth")
    both = wp.open_source(tmp_path / "both.pth")
    assert both.info.wrapper == "state_dict"
    assert any("state_dict_ema" in n for n in both.info.notes)
    chosen = wp.open_source(tmp_path / "both.pth", checkpoint_key="state_dict_ema")
    assert torch.equal(chosen["fc.weight"], ema["fc.weight"])


def test_checkpoint_key_path_and_errors(tmp_path, state):
    torch.save({"outer": {"inner": state}}, tmp_path / "deep.pth")
    src = wp.open_source(tmp_path / "deep.pth", checkpoint_key="outer/inner")
    _same(src, state)
    with pytest.raises(SourceError, match="checkpoint_key='nope' not found.*'outer'"):
        wp.open_source(tmp_path / "deep.pth", checkpoint_key="nope")


def test_ambiguous_nesting_asks_for_checkpoint_key(tmp_path, state):
    torch.save({"student": state, "teacher": state}, tmp_path / "two.pth")
    with pytest.raises(SourceError, match="several keys.*checkpoint_key"):
        wp.open_source(tmp_path / "two.pth")


def test_non_tensor_entries_are_ignored(tmp_path, state):
    torch.save({**state, "version": 3, "note": "hello"}, tmp_path / "mixed.pt")
    src = wp.open_source(tmp_path / "mixed.pt")
    assert "version" not in src and "note" not in src
    assert set(src.info.ignored) >= {"version", "note"}


@pytest.mark.parametrize("prefixes", [["module."], ["_orig_mod."], ["_orig_mod.", "module."]])
def test_wrapper_prefixes_stripped_when_every_key_has_them(tmp_path, state, prefixes):
    p = "".join(prefixes)
    torch.save({p + k: v for k, v in state.items()}, tmp_path / "w.pt")
    src = wp.open_source(tmp_path / "w.pt")
    _same(src, state)
    assert list(src.info.prefixes) == prefixes


def test_prefix_kept_when_not_every_key_has_it(tmp_path, state):
    mixed = {"module." + k: v for k, v in state.items()}
    mixed["other"] = torch.zeros(1)
    src = wp.open_source(mixed)
    assert "module.fc.weight" in src and src.info.prefixes == ()


def test_real_data_parallel_and_compile_state_dicts():
    m = trained()
    dp = nn.DataParallel(m)
    src = wp.open_source({"net": dp.state_dict()})
    assert set(src) == set(m.state_dict()) and src.info.prefixes == ("module.",)


def test_dict_and_module_sources(state):
    m = trained()
    src = wp.open_source(m)
    _same(src, m.state_dict())
    assert src.info.kind == "module"
    assert wp.open_source(state).info.kind == "dict"


def test_hf_folder_prefers_safetensors(tmp_path, state):
    contiguous = {k: v.contiguous() for k, v in state.items()}
    save_file(contiguous, tmp_path / "model.safetensors")
    torch.save({k: v + 1 for k, v in contiguous.items() if v.is_floating_point()}, tmp_path / "pytorch_model.bin")
    src = wp.open_source(tmp_path)
    assert src.info.kind == "safetensors"
    _same(src, contiguous)


def test_hf_folder_with_only_bin(tmp_path, state):
    torch.save(state, tmp_path / "pytorch_model.bin")
    _same(wp.open_source(tmp_path), state)


def _shard(tmp_path, state, writer, ext):
    names = sorted(state)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-0000{i + 1}-of-00002.{ext}"
        writer({k: state[k].contiguous() for k in part}, tmp_path / fname)
        weight_map.update({k: fname for k in part})
    index = tmp_path / f"model.{ext}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return parts


@pytest.mark.parametrize("ext", ["safetensors", "bin"])
def test_sharded_checkpoint_opens_only_needed_shards(tmp_path, state, ext):
    writer = save_file if ext == "safetensors" else torch.save
    parts = _shard(tmp_path, state, writer, ext)
    src = wp.open_source(tmp_path)
    assert src.info.kind == "sharded"
    assert sorted(src) == sorted(state)
    assert src.opened_shards == []
    key = parts[1][0]
    assert torch.equal(src[key], state[key])
    assert len(src.opened_shards) == 1 and src.opened_shards[0].endswith(f"model-00002-of-00002.{ext}")


def test_sharded_index_with_missing_shard(tmp_path, state):
    _shard(tmp_path, state, save_file, "safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SourceNotFoundError, match="model-00002-of-00002.safetensors"):
        wp.open_source(tmp_path)


def test_missing_tensor_names_close_matches(state):
    src = wp.open_source(state)
    with pytest.raises(TensorNotFoundError, match="did you mean 'fc.weight'"):
        src["fc.wieght"]
    with pytest.raises(KeyError):
        src["nothing"]


def test_whole_pickled_module_is_extracted_safely(tmp_path):
    m = TinyNet()
    m.register_buffer("scratch", torch.ones(2), persistent=False)
    torch.save(m, tmp_path / "whole.pth")
    src = wp.open_source(tmp_path / "whole.pth")
    assert set(src) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(src[k], v)
    assert "conftest.TinyNet" in src.info.placeholders


def test_resnet18_checkpoint_from_data_parallel_into_a_10_class_model(tmp_path):
    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"net": nn.DataParallel(pretrained).state_dict(), "optimizer": {"state": {}}, "epoch": 90}, path)
    model = torchvision.models.resnet18(num_classes=10)
    report = wp.transfer(path, model)
    fresh = {e.target: e for e in report.fresh}
    assert set(fresh) == {"fc.weight", "fc.bias"}
    assert fresh["fc.weight"].reason == "shape mismatch"
    assert (fresh["fc.weight"].source_shape, fresh["fc.weight"].target_shape) == ((1000, 512), (10, 512))
    assert (fresh["fc.bias"].source_shape, fresh["fc.bias"].target_shape) == ((1000,), (10,))
    assert len(report.loaded) == len(report.entries) - 2
    assert report.coverage > 0.999
    assert report.source.wrapper == "net" and report.source.prefixes == ("module.",)
    text = str(report)
    assert "(1000, 512) -> (10, 512)" in text
    model.eval()
    pretrained.eval()
    x = torch.randn(1, 3, 64, 64)
    feats = nn.Sequential(*list(model.children())[:-1])
    ref = nn.Sequential(*list(pretrained.children())[:-1])
    torch.testing.assert_close(feats(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("ext", [".safetensors", ".pth", ".bin"])
@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_file_deleted_or_replaced_between_plan_and_apply_is_read_as_planned(tmp_path, ext, change):
    torch.manual_seed(0)
    good = nn.Linear(3, 2)
    path = tmp_path / f"w{ext}"
    wp.save(good.state_dict(), path)
    target = nn.Linear(3, 2)
    plan = wp.plan(str(path), target)
    if change == "deleted":
        path.unlink()
    else:
        other = tmp_path / f"other{ext}"
        wp.save(nn.Linear(3, 2).state_dict(), other)
        os.replace(other, path)
    plan.apply()
    assert torch.equal(target.weight, good.weight) and torch.equal(target.bias, good.bias)


def test_mapped_file_that_cannot_be_opened_is_a_clear_error_and_silent(tmp_path, monkeypatch):
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(SourceNotFoundError, match="gone"):
        MappedFile(tmp_path / "missing.safetensors")
    gc.collect()
    assert unraisable == []
