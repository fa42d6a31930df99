"""zero_copy=True: parameters that are mapped views of the file where that is safe, owning copies elsewhere."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, meta_tiny, trained
from safetensors.torch import save_file
from torch import nn

import weightport as wp


def test_zero_copy_assigns_mapped_views_that_never_write_the_file(trained_file):
    before = trained_file.read_bytes()
    model = meta_tiny()
    report = wp.transfer(trained_file, model, zero_copy=True)
    params = [n for n, p in model.named_parameters() if not n.startswith("fc.")]
    assert report.stats["zero_copy_tensors"] == len(params)
    expected = trained(num_classes=1000)
    assert torch.equal(model.conv1.weight, expected.conv1.weight)
    assert isinstance(model.conv1.weight, nn.Parameter) and model.conv1.weight.requires_grad
    with torch.no_grad():
        model.conv1.weight.add_(1.0)  # training writes: private copy-on-write pages
    assert trained_file.read_bytes() == before
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert model.conv1.weight.grad is not None


def test_default_is_owning_copies(trained_file):
    model = meta_tiny()
    report = wp.transfer(trained_file, model)
    assert report.stats["zero_copy_tensors"] == 0
    trained_file.write_bytes(b"\0" * trained_file.stat().st_size)  # the file changes afterwards
    assert torch.equal(model.conv1.weight, trained(num_classes=1000).conv1.weight)


@pytest.mark.parametrize("case", ["dtype", "built", "check_finite"], ids=["dtype-cast", "built-target", "check-finite"])
def test_zero_copy_falls_back_to_copies_where_it_is_not_safe(trained_file, case):
    model = TinyNet(num_classes=10) if case == "built" else meta_tiny()
    kwargs = {"dtype": torch.float16} if case == "dtype" else {"check_finite": True} if case == "check_finite" else {}
    report = wp.transfer(trained_file, model, zero_copy=True, **kwargs)
    assert report.stats["zero_copy_tensors"] == 0
    trained_file.write_bytes(b"\0" * trained_file.stat().st_size)
    want = trained(num_classes=1000).conv1.weight.to(model.conv1.weight.dtype)
    assert torch.equal(model.conv1.weight, want)


def test_zero_copy_through_a_sharded_folder(tmp_path):
    import json

    state = trained(num_classes=10).state_dict()
    names = list(state)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = meta_tiny()
    report = wp.transfer(str(tmp_path), model, zero_copy=True)
    params = dict(model.named_parameters())
    assert report.stats["zero_copy_tensors"] == len(params)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_zero_copy_from_an_in_memory_source_copies(trained_file):
    state = trained(num_classes=1000).state_dict()
    model = meta_tiny()
    report = wp.transfer(state, model, zero_copy=True)
    assert report.stats["zero_copy_tensors"] == 0
    assert model.conv1.weight.data_ptr() != state["conv1.weight"].data_ptr()


def test_the_documented_zero_copy_semantics_are_the_tested_ones():
    """Writes to zero-copy tensors give private copy-on-write pages (tested above); the docs say so."""
    doc = " ".join((wp.transfer.__doc__ or "").split())
    assert "private copy-on-write pages" in doc and "writing to those tensors raises" not in doc
