"""``Source.read_region``: the part of a tensor inside a box, reading only its byte ranges where the
format allows (what each rank of a sharded target reads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import weightport as wp

TENSORS = {
    "w": torch.randn(6, 5, 4),
    "b": torch.arange(10.0),
    "h": torch.randn(3, 7).to(torch.bfloat16),
}


def _boxes(shape: tuple[int, ...]) -> st.SearchStrategy:
    def dim(n: int) -> st.SearchStrategy:
        return st.integers(0, n).flatmap(lambda a: st.tuples(st.just(a), st.integers(0, n - a)))

    return st.tuples(*(dim(n) for n in shape))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("regions")
    save_file(TENSORS, str(folder / "m.safetensors"))
    torch.save(TENSORS, folder / "m.pt")
    sharded = folder / "sharded"
    sharded.mkdir()
    save_file({"w": TENSORS["w"]}, str(sharded / "a.safetensors"))
    save_file({"b": TENSORS["b"], "h": TENSORS["h"]}, str(sharded / "b.safetensors"))
    index = {"metadata": {}, "weight_map": {"w": "a.safetensors", "b": "b.safetensors", "h": "b.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"safetensors": str(folder / "m.safetensors"), "torch": str(folder / "m.pt"), "sharded": str(sharded)}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("kind", ["safetensors", "torch", "sharded"])
def test_read_region_equals_the_slice_and_counts_only_its_bytes(files: dict[str, str], kind: str, data) -> None:
    name = data.draw(st.sampled_from(sorted(TENSORS)))
    full = TENSORS[name]
    box = data.draw(_boxes(tuple(full.shape)))
    with wp.open_source(files[kind]) as source:
        out, nbytes = source.read_region(name, box)
    want = full[tuple(slice(a, a + n) for a, n in box)]
    assert torch.equal(out, want) and out.is_contiguous()
    assert nbytes == want.numel() * full.element_size()


def test_read_region_of_rows_is_one_read_of_those_bytes(files: dict[str, str]) -> None:
    """Rows 2..4 of a row-major tensor are one byte range: the process reads exactly those bytes."""
    with wp.open_source(files["safetensors"]) as source:
        before = _rchar()
        _, nbytes = source.read_region("w", ((2, 3), (0, 5), (0, 4)))
        read = _rchar() - before
    assert nbytes == 3 * 5 * 4 * 4
    assert nbytes <= read < nbytes + 4096  # the read itself, plus what Python's own bookkeeping reads


def test_read_region_of_tensors_in_memory_copies_the_box() -> None:
    source = wp.open_source({"w": TENSORS["w"]})
    out, nbytes = source.read_region("w", ((1, 2), (0, 5), (0, 4)))
    assert torch.equal(out, TENSORS["w"][1:3]) and nbytes == out.nbytes == TENSORS["w"].nbytes // 3
    out.zero_()
    assert TENSORS["w"][1:3].abs().sum() > 0  # a copy, not a view of the caller's tensor


def test_read_region_without_ranged_reads_reads_whole_and_says_so() -> None:
    """A source that cannot read part of a tensor reads it whole, and counts it so."""
    from weightport.sources.base import Source, SourceInfo, TensorMeta

    class Whole(Source):
        def _meta_of(self, handle: torch.Tensor) -> TensorMeta:
            return TensorMeta(tuple(handle.shape), handle.dtype)

        def _view_of(self, handle: torch.Tensor) -> torch.Tensor:
            return handle

    source = Whole({"w": TENSORS["w"]}, SourceInfo(kind="test", location="test"))
    out, nbytes = source.read_region("w", ((1, 2), (0, 5), (0, 4)))
    assert torch.equal(out, TENSORS["w"][1:3]) and nbytes == TENSORS["w"].nbytes


def test_read_region_of_a_box_outside_the_tensor_names_it(files: dict[str, str]) -> None:
    with wp.open_source(files["safetensors"]) as source, pytest.raises(wp.errors.ShapeMismatchError, match="'w'"):
        source.read_region("w", ((5, 3), (0, 5), (0, 4)))


def test_read_region_of_a_sharded_folder_opens_only_the_shard_that_holds_it(files: dict[str, str]) -> None:
    with wp.open_source(Path(files["sharded"]) / "model.safetensors.index.json") as source:
        source.read_region("b", ((0, 3),))
        assert [os.path.basename(p) for p in source.opened_shards] == ["b.safetensors"]


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.mark.parametrize("kind", ["safetensors", "torch", "sharded"])
def test_read_region_fills_the_tensor_it_is_given(files: dict[str, str], kind: str) -> None:
    out = torch.full((2, 5, 4), -1.0)
    with wp.open_source(files[kind]) as source:
        got, nbytes = source.read_region("w", ((3, 2), (0, 5), (0, 4)), out=out)
    assert got is out and torch.equal(out, TENSORS["w"][3:5]) and nbytes == out.nbytes


def test_read_region_refuses_a_tensor_of_another_shape_or_dtype(files: dict[str, str]) -> None:
    with wp.open_source(files["safetensors"]) as source:
        for out in (
            torch.empty(3, 5, 4),
            torch.empty(2, 5, 4, dtype=torch.float64),
            torch.empty(5, 2, 4).transpose(0, 1),
        ):
            with pytest.raises(wp.errors.ShapeMismatchError, match="give a contiguous CPU tensor"):
                source.read_region("w", ((3, 2), (0, 5), (0, 4)), out=out)
