"""The bulk paths that make 100k-key sources cheap give exactly what the per-key paths give."""

from __future__ import annotations

import gc
import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from test_corrupt import SAFETENSORS_CASES, safetensors_bytes

import weightport as wp
from weightport._gc import gc_paused
from weightport.sources._mapped import MappedFile
from weightport.sources.safetensors import _entry_ref, _refs_in_bulk, read_header
from weightport.sources.unwrap import strip_wrapper_prefixes


def _per_entry(path: str) -> dict:
    header, start = read_header(path)
    header.pop("__metadata__", None)
    file = MappedFile(path)
    return {name: _entry_ref(path, file, start, name, entry, []) for name, entry in header.items()}


def _bulk(path: str) -> dict | None:
    header, start = read_header(path)
    header.pop("__metadata__", None)
    return _refs_in_bulk(MappedFile(path), start, header)


def _fields(refs: dict) -> dict:
    return {k: tuple(r)[1:] for k, r in refs.items()}  # all but the file object


def test_bulk_header_checks_give_the_per_entry_references(tmp_path):
    tensors = {
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "i64": torch.arange(7),
        "bool": torch.tensor([True, False]),
        **{f"layers.{i}.w": torch.randn(2, 3) for i in range(50)},
    }
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    bulk = _bulk(path)
    assert bulk is not None
    assert _fields(bulk) == _fields(_per_entry(path))
    src = wp.open_source(path)
    for name, t in tensors.items():
        assert torch.equal(src[name], t)


def test_bulk_header_checks_accept_gaps_and_any_order(tmp_path):
    header = {
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},  # bytes 8..16 belong to no tensor
    }
    path = tmp_path / "gaps.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 24))
    bulk = _bulk(str(path))
    assert bulk is not None and _fields(bulk) == _fields(_per_entry(str(path)))


_ENTRY_CASES = [
    "offsets_beyond_data",
    "offsets_past_end_huge",
    "offsets_wrong_size",
    "offsets_reversed",
    "overlapping",
    "unknown_dtype",
    "malformed_shape",
    "bool_as_int",
    "entry_not_object",
]


@pytest.mark.parametrize("case", _ENTRY_CASES)
def test_bulk_header_checks_leave_every_damaged_entry_to_the_per_entry_checks(tmp_path, case):
    raw, _ = SAFETENSORS_CASES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    header, start = read_header(str(path))
    assert _refs_in_bulk(MappedFile(str(path)), start, header) is None


@pytest.mark.parametrize(
    ("entry", "data"),
    [
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, 8),
        ({"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}, 8),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, 9),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, False]}, 8),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, 8),
        ({"shape": [2], "data_offsets": [0, 8]}, 8),
        ({"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}, 4),
    ],
)
def test_malformed_entries_are_refused_in_bulk_and_named_one_by_one(tmp_path, entry, data):
    good = {f"ok.{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(3)}
    shift = 12
    entry = {**entry, "data_offsets": [o + shift if type(o) is int else o for o in entry["data_offsets"]]}
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes({**good, "bad": entry}, b"\0" * (shift + data)))
    assert _bulk(str(path)) is None
    with pytest.raises(wp.errors.CorruptFileError, match="'bad'"):
        wp.open_source(str(path))


def test_duplicate_keys_are_still_refused(tmp_path):
    raw = b'{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(wp.errors.CorruptFileError, match="appears twice"):
        wp.open_source(str(path))
    assert len(json.loads(raw)) == 1  # plain json keeps the last one silently: why the check matters


@pytest.mark.parametrize(
    ("names", "renames", "stripped"),
    [
        (["module.a", "module.b.c"], {"module.a": "a", "module.b.c": "b.c"}, ["module."]),
        (
            ["module._orig_mod.a", "module._orig_mod.b"],
            {"module._orig_mod.a": "a", "module._orig_mod.b": "b"},
            ["module.", "_orig_mod."],
        ),
        (["module.a", "b"], {}, []),
        (["module.", "module.a"], {}, []),  # stripping would leave an empty name
        (
            ["module.module.", "module.module.x"],
            {"module.module.": "module.", "module.module.x": "module.x"},
            ["module."],
        ),
        (["modulex.a", "module.b"], {}, []),
        ([], {}, []),
    ],
)
def test_wrapper_prefixes(names, renames, stripped):
    assert strip_wrapper_prefixes(names) == (renames, stripped)


def test_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


def _generation_of(obj: object) -> int:
    return next(g for g in range(3) if any(o is obj for o in gc.get_objects(generation=g)))


def test_gc_paused_moves_what_it_made_to_the_oldest_generation():
    gc.collect()
    with gc_paused():
        made = [[i] for i in range(2000)]  # more than a young collection's threshold
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert _generation_of(made) == 2 and _generation_of(made[-1]) == 2  # promoted without a scan
    assert gc.get_count()[0] < 100


def test_gc_paused_leaves_young_what_a_failed_block_made():
    gc.collect()
    with pytest.raises(RuntimeError), gc_paused():
        made = [[i] for i in range(10)]
        raise RuntimeError
    assert _generation_of(made) == 0  # a young collection frees a traceback's cycles soon


def test_gc_paused_keeps_the_process_own_frozen_objects_frozen():
    gc.collect()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with gc_paused():
            made = [[i] for i in range(10)]
        # not unfrozen (another library's thread may freeze more meanwhile: the count only must not drop)
        assert gc.get_freeze_count() >= frozen and gc.isenabled()
        # not promoted to the oldest generation (a young collection may have moved it one step)
        assert _generation_of(made) < 2
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64, torch.int8])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_the_read_buffer_of_a_destination_writes_into_it(dtype, shape):
    from weightport.sources._mapped import _buffer_of

    out = torch.zeros(shape, dtype=dtype)
    view = memoryview(_buffer_of(out)).cast("B")  # as a short read in read_run takes it
    assert view.nbytes == out.nbytes and not view.readonly
    view[:] = b"\x01" * out.nbytes
    assert bytes(out.reshape(-1).view(torch.uint8).tolist()) == b"\x01" * out.nbytes


def test_a_plan_refuses_a_model_whose_tensors_were_moved_between_names(tiny):
    from conftest import trained

    p = wp.plan(trained().state_dict(), tiny)
    tiny.fc.weight, tiny.fc.bias = tiny.fc.bias, tiny.fc.weight  # same tensors, other names
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(wp.errors.PlanError, match="changed since it was planned"):
        p.apply()
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_source_shapes_in_bulk(tmp_path):
    tensors = {"a": torch.zeros(2, 3), "b": torch.zeros(()), "c": torch.zeros(4)}
    path = str(tmp_path / "s.safetensors")
    save_file(tensors, path)
    for source in (wp.open_source(path), wp.open_source(tensors)):
        assert source.shapes(["c", "a", "b"]) == [(4,), (2, 3), ()]
        assert source.shapes(iter(["a"])) == [(2, 3)]
        with pytest.raises(wp.errors.TensorNotFoundError, match="'nope'"):
            source.shapes(["a", "nope"])


def test_source_bytes_in_bulk(tmp_path):
    tensors = {
        "a": torch.zeros(2, 3),
        "b": torch.zeros((), dtype=torch.float16),
        "c": torch.zeros(0, dtype=torch.int64),
    }
    path = str(tmp_path / "s.safetensors")
    save_file(tensors, path)
    torch.save(tensors, tmp_path / "s.pt")
    for source in (wp.open_source(path), wp.open_source(tensors), wp.open_source(tmp_path / "s.pt")):
        assert source.nbytes(["a", "b", "c"]) == [24, 2, 0] == [source.meta(k).nbytes for k in "abc"]
        with pytest.raises(wp.errors.TensorNotFoundError, match="'nope'"):
            source.nbytes(["a", "nope"])
