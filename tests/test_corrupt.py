"""Corrupt input is a clear error: a WeightportError subclass naming the file and what is wrong.

Each case is opened with ``open_source`` and, where opening succeeds lazily, read in full:
no segfault, no RuntimeError from deep inside torch, no half-read tensor.
"""

from __future__ import annotations

import json
import pickle
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import save_legacy

import weightport as wp
from weightport.errors import CorruptFileError, SourceNotFoundError, UnsupportedFormatError, WeightportError
from weightport.sources.safepickle import RestrictedUnpickler
from weightport.sources.safepickle._stream import MEMORY_PER_BYTE

STATE = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.int64)}


def read_all(path: Path) -> None:
    """Open ``path`` and read every tensor; corrupt input must fail with a WeightportError."""
    src = wp.open_source(str(path))
    for name in src:
        src[name].sum()


def expect(path: Path, error: type[WeightportError], *words: str) -> str:
    with pytest.raises(error) as err:
        read_all(path)
    msg = str(err.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# -- safetensors ---------------------------------------------------------------------------------


def safetensors_bytes(header: dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32(shape: list[int], begin: int, end: int | None = None) -> dict:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n if end is None else end]}


SAFETENSORS_CASES: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "header_length_past_eof": (safetensors_bytes({"x": f32([2], 0)}, b"\0" * 8, length=1 << 20), ("header length",)),
    "header_length_huge": (safetensors_bytes({}, length=(1 << 64) - 1), ("header length",)),
    "invalid_json": (struct.pack("<Q", 12) + b'{"x": [1, 2' + b" " + b"\0" * 8, ("not valid JSON",)),
    "header_not_utf8": (struct.pack("<Q", 4) + b"{\xff\xfe}", ("not valid JSON",)),
    "header_not_object": (struct.pack("<Q", 2) + b"[]", ("not a JSON object",)),
    "offsets_beyond_data": (safetensors_bytes({"x": f32([4], 0)}, b"\0" * 8), ("'x'",)),
    "offsets_past_end_huge": (safetensors_bytes({"x": f32([1], 1 << 62)}, b"\0" * 8), ("'x'",)),
    "offsets_wrong_size": (safetensors_bytes({"x": f32([4], 0, 8)}, b"\0" * 16), ("'x'", "16 bytes")),
    "offsets_reversed": (
        safetensors_bytes({"x": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 8),
        ("'x'",),
    ),
    "overlapping": (safetensors_bytes({"x": f32([2], 0), "y": f32([2], 4)}, b"\0" * 16), ("overlap",)),
    "unknown_dtype": (
        safetensors_bytes({"x": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        ("'F7'",),
    ),
    "malformed_shape": (
        safetensors_bytes({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        ("malformed",),
    ),
    "bool_as_int": (
        safetensors_bytes({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
        ("malformed",),
    ),
    "entry_not_object": (safetensors_bytes({"x": [1, 2]}), ("not an object",)),
    "metadata_not_strings": (safetensors_bytes({"__metadata__": {"k": 1}}), ("__metadata__",)),
    "too_short": (b"\x05\0\0", ()),
    "deep_json": (struct.pack("<Q", 200_001) + b"[" * 100_000 + b"]" * 100_000 + b"{", ("not valid JSON",)),
}
_DUP = b'{"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}'
SAFETENSORS_CASES["duplicate_key"] = (struct.pack("<Q", len(_DUP)) + _DUP + b"\0" * 4, ("appears twice",))


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_corrupt_safetensors(tmp_path, case):
    raw, words = SAFETENSORS_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(raw)
    expect(path, CorruptFileError if case != "deep_json" else WeightportError, *words)


def test_truncated_safetensors_at_every_cut(tmp_path):
    good = tmp_path / "good.safetensors"
    wp.save(STATE, good)
    raw = good.read_bytes()
    for cut in sorted({1, 7, 8, 9, 20, len(raw) // 2, len(raw) - 4, len(raw) - 1}):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(raw[:cut])
        expect(path, CorruptFileError)


# -- torch zip -------------------------------------------------------------------------------------


@pytest.fixture
def torch_zip(tmp_path) -> bytes:
    path = tmp_path / "good.pth"
    torch.save(STATE, path)
    return path.read_bytes()


def _rezip(raw: bytes, tmp_path: Path, change: Callable[[str, bytes], tuple[str, bytes, int]]) -> bytes:
    src = tmp_path / "src.zip"
    src.write_bytes(raw)
    out = tmp_path / "rezipped.zip"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            name, data, compress = change(info.filename, zin.read(info))
            zout.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return out.read_bytes()


def _offset_of(raw: bytes, record: bytes) -> int:
    return raw.index(record)


def test_truncated_torch_zip_at_every_cut(tmp_path, torch_zip):
    for cut in sorted(
        {1, 4, 30, 100, len(torch_zip) // 3, len(torch_zip) // 2, len(torch_zip) - 30, len(torch_zip) - 1}
    ):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(torch_zip[:cut])
        expect(path, WeightportError)


def test_damaged_pickle_record_fails_its_crc(tmp_path, torch_zip):
    at = torch_zip.index(b"data.pkl") + len(b"data.pkl") + 100  # inside the pickle's bytes
    raw = bytearray(torch_zip)
    raw[at] ^= 0xFF
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(raw))
    expect(path, CorruptFileError)


def test_damaged_local_header(tmp_path, torch_zip):
    raw = bytearray(torch_zip)
    at = raw.index(b"PK\x03\x04", raw.index(b"data/0") - 64)  # a storage record's local header
    raw[at + 26] = 0xFF  # its name length
    path = tmp_path / "header.pth"
    path.write_bytes(bytes(raw))
    expect(path, CorruptFileError)


def test_compressed_storage_record(tmp_path, torch_zip):
    raw = _rezip(torch_zip, tmp_path, lambda n, d: (n, d, zipfile.ZIP_DEFLATED))
    path = tmp_path / "deflated.pth"
    path.write_bytes(raw)
    expect(path, CorruptFileError, "compressed")


def test_missing_storage_record(tmp_path, torch_zip):
    raw = _rezip(torch_zip, tmp_path, lambda n, d: (n.replace("/data/0", "/data/zz"), d, zipfile.ZIP_STORED))
    path = tmp_path / "missing.pth"
    path.write_bytes(raw)
    expect(path, CorruptFileError, "missing")


def test_short_storage_record(tmp_path, torch_zip):
    raw = _rezip(torch_zip, tmp_path, lambda n, d: (n, d[:8] if "/data/" in n else d, zipfile.ZIP_STORED))
    path = tmp_path / "short.pth"
    path.write_bytes(raw)
    expect(path, CorruptFileError)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    expect(path, CorruptFileError, "data.pkl")


def test_torchscript_archive_is_named(tmp_path):
    path = tmp_path / "scripted.pt"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated; still met in the wild
        torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 2))), path)
    expect(path, UnsupportedFormatError, "TorchScript", "torch.jit.load")


def test_overlapping_zip_records(tmp_path):
    """A forged archive: storage record 1's local header and data sit inside record 0's data."""
    good = tmp_path / "good.pth"
    torch.save({"a": torch.zeros(64), "b": torch.ones(5, dtype=torch.int64)}, good)
    with zipfile.ZipFile(good) as z:
        names = {i.filename: i for i in z.infolist()}
        rec0, rec1 = (n for n in names if n.endswith("/data/0")), (n for n in names if n.endswith("/data/1"))
        name0, name1 = next(rec0), next(rec1)
        contents = {n: z.read(n) for n in names}
    inner = name1.encode()
    embedded = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 40, 40, len(inner), 0) + inner
    contents[name0] = (embedded + contents[name1]).ljust(256, b"\0")
    forged = tmp_path / "overlap.pth"
    with zipfile.ZipFile(forged, "w") as z:
        for n, data in contents.items():
            z.writestr(n, data)
    raw = bytearray(forged.read_bytes())
    with zipfile.ZipFile(forged) as z:
        info0 = z.getinfo(name0)
    local = info0.header_offset
    data0 = local + 30 + struct.unpack_from("<H", raw, local + 26)[0] + struct.unpack_from("<H", raw, local + 28)[0]
    central = raw.index(b"PK\x01\x02")
    pos = central
    while True:  # find record 1's central entry and point it into record 0's data
        name_len, extra, comment = struct.unpack_from("<HHH", raw, pos + 28)
        if bytes(raw[pos + 46 : pos + 46 + name_len]) == inner:
            struct.pack_into("<I", raw, pos + 42, data0)
            break
        pos += 46 + name_len + extra + comment
    forged.write_bytes(bytes(raw))
    expect(forged, CorruptFileError, "overlap")


def test_garbage_pickle_in_zip(tmp_path, torch_zip):
    raw = _rezip(torch_zip, tmp_path, lambda n, d: (n, b"\x80\x02garbage" if n.endswith("data.pkl") else d, 0))
    path = tmp_path / "garbage.pth"
    path.write_bytes(raw)
    expect(path, CorruptFileError)


def test_tensor_reading_past_its_storage(tmp_path, torch_zip):
    big = {"a.weight": torch.zeros(3, 4)}
    p = tmp_path / "big.pth"
    torch.save(big, p)
    raw = _rezip(p.read_bytes(), tmp_path, lambda n, d: (n, d[:16] if "/data/" in n else d, 0))
    path = tmp_path / "past.pth"
    path.write_bytes(raw)
    expect(path, CorruptFileError)


# -- legacy and plain pickles ---------------------------------------------------------------------


def test_truncated_legacy_file(tmp_path):
    good = tmp_path / "legacy.pth"
    save_legacy(STATE, good)
    raw = good.read_bytes()
    for cut in sorted({1, 12, 40, len(raw) // 2, len(raw) - 8, len(raw) - 1}):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(raw[:cut])
        expect(path, CorruptFileError)


def test_truncated_plain_pickle(tmp_path):
    raw = pickle.dumps(STATE, protocol=2)
    for cut in (1, len(raw) // 2, len(raw) - 1):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(raw[:cut])
        expect(path, CorruptFileError)


def test_pickle_without_tensors(tmp_path):
    path = tmp_path / "config.pkl"
    path.write_bytes(pickle.dumps({"lr": 0.1, "epochs": [1, 2]}))
    expect(path, WeightportError, "no tensors")


# -- empty files, wrong extensions ------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".safetensors", ".pth", ".bin", ".pkl", ".ckpt", ".pt"])
def test_empty_file(tmp_path, ext):
    path = tmp_path / f"empty{ext}"
    path.write_bytes(b"")
    expect(path, CorruptFileError, "empty")


@pytest.mark.parametrize(
    ("content", "ext", "words"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", ".bin", ("git lfs pull",)),
        (b"<!DOCTYPE html><html>Sign in</html>", ".safetensors", ("HTML",)),
        (b'{"architectures": ["Bert"]}', ".pth", ("JSON",)),
        (b"\x1f\x8b\x08\0\0\0\0\0", ".pth", ("gzip",)),
        (b"\x93NUMPY\x01\0", ".pth", ("numpy",)),
        (b"GGUF\x03\0\0\0", ".pth", ("GGUF",)),
        (b"hello world, definitely not weights", ".xyz", ("unknown weights format",)),
        (b"\x00\x01\x02\x03garbage bytes", ".safetensors", ()),
        (b"\x00\x01\x02\x03garbage bytes", ".pth", ()),
    ],
)
def test_not_weights(tmp_path, content, ext, words):
    path = tmp_path / f"file{ext}"
    path.write_bytes(content)
    expect(path, WeightportError, *words)


def test_wrong_extension_is_read_by_content(tmp_path):
    a = tmp_path / "really_safetensors.pth"
    wp.save(STATE, a)
    b = tmp_path / "really_torch.safetensors"
    torch.save(STATE, b)
    for path in (a, b):
        src = wp.open_source(str(path))
        assert all(torch.equal(src[k], v) for k, v in STATE.items())


def test_unsupported_format_is_also_a_value_error(tmp_path):
    path = tmp_path / "x.xyz"
    path.write_bytes(b"abc")
    with pytest.raises(ValueError):
        wp.open_source(str(path))
    with pytest.raises(UnsupportedFormatError):
        wp.open_source(str(path))


# -- sharded checkpoints ----------------------------------------------------------------------------


def _index(folder: Path, weight_map: dict[str, str]) -> Path:
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_index_pointing_to_missing_shard(tmp_path):
    wp.save({"a.weight": STATE["a.weight"]}, tmp_path / "s1.safetensors")
    index = _index(tmp_path, {"a.weight": "s1.safetensors", "b": "s2.safetensors"})
    msg = expect(index, SourceNotFoundError, "s2.safetensors")
    assert "s1.safetensors" not in msg.split("exist:")[-1]
    with pytest.raises(FileNotFoundError):
        wp.open_source(str(tmp_path))  # the folder form too


def test_index_shard_lacking_a_tensor(tmp_path):
    wp.save({"a.weight": STATE["a.weight"]}, tmp_path / "s1.safetensors")
    index = _index(tmp_path, {"a.weight": "s1.safetensors", "b": "s1.safetensors"})
    expect(index, CorruptFileError, "'b'", "s1.safetensors")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", ("not valid JSON",)),
        ('{"weight_map": []}', ("weight_map",)),
        ('{"weight_map": {}}', ("weight_map",)),
        ('{"weight_map": {"a": "../../etc/passwd"}}', ("outside the folder",)),
        ('{"weight_map": {"a": "/etc/passwd"}}', ("outside the folder",)),
        ('{"weight_map": {"a": "other.index.json"}}', ("itself an index",)),
        ("[1, 2]", ("weight_map",)),
    ],
)
def test_malformed_index(tmp_path, text, words):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(text)
    expect(path, CorruptFileError, *words)


def test_corrupt_shard_names_the_shard(tmp_path):
    (tmp_path / "s1.safetensors").write_bytes(b"")
    index = _index(tmp_path, {"a.weight": "s1.safetensors"})
    with pytest.raises(CorruptFileError, match="s1.safetensors"):
        read_all(index)


# -- denial of service --------------------------------------------------------------------------------


def _pkl(tmp_path: Path, name: str, stream: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(stream)
    return path


@pytest.mark.parametrize(
    ("name", "stream"),
    [
        ("huge_unicode8", b"\x80\x04\x8d" + struct.pack("<Q", 1 << 62) + b"x."),
        ("huge_bytes8", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"x."),
        ("huge_frame", b"\x80\x04\x95" + struct.pack("<Q", 1 << 62) + b"N."),
        ("huge_long4", b"\x80\x02\x8b" + struct.pack("<i", (1 << 31) - 1) + b"."),
        ("negative_long4", b"\x80\x02\x8b" + struct.pack("<i", -5) + b"."),
        ("huge_memo_index", b"\x80\x02Nr\xff\xff\xff\xffj\xfe\xff\xff\xff."),
        ("deep_lists", b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."),
        ("deep_tuples", b"\x80\x02" + b"(" * 100_000 + b"t" * 100_000 + b"."),
        ("deep_dict_keys", b"\x80\x02}" + b"N\x85" * 50 + b"Ns."),
        ("int_too_long", b"I" + b"9" * 100_000 + b"\n."),
        ("stack_underflow", b"\x80\x02R."),
        ("pop_mark_without_mark", b"\x80\x021N."),
        ("unknown_protocol", b"\x80\x09N."),
        ("stop_on_empty_stack", b"\x80\x02."),
    ],
)
def test_hostile_structure_is_a_clear_error(tmp_path, name, stream):
    path = _pkl(tmp_path, f"{name}.pkl", stream)
    expect(path, CorruptFileError)


def test_shared_subtrees_are_bounded(tmp_path, monkeypatch):
    """30 levels of dicts, each holding ten references to the level below: 10**30 names if expanded."""
    monkeypatch.setattr("weightport.sources.unwrap.MAX_WALK_WORK", 20_000)
    t = torch.ones(1)
    level: dict = {"t": t}
    for _ in range(30):
        level = {"t": t, **{f"k{j}": level for j in range(10)}}
    path = tmp_path / "bomb.pth"
    torch.save(level, path)
    expect(path, CorruptFileError, "implausibly large")


def test_billion_laughs_is_bounded(tmp_path):
    """Each level a list of ten references to the level below: 10**30 leaves if expanded."""
    stream = b"\x80\x02]q\x00"  # level 0: empty list, memo 0
    for level in range(1, 31):
        stream += b"](" + b"h" + bytes([level - 1]) + b"" + (b"h" + bytes([level - 1])) * 9 + b"eq" + bytes([level])
    stream += b"."
    path = _pkl(tmp_path, "laughs.pkl", stream)
    expect(path, WeightportError)
    exploded = {f"k{i}": [] for i in range(3)}
    exploded["w"] = torch.ones(2)  # a real state dict next to a laugh bomb is still read
    raw = pickle.dumps(exploded, protocol=2)
    assert wp.open_source(str(_pkl(tmp_path, "ok.pkl", raw)))["w"].sum() == 2


def test_compressed_pickle_bomb_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02N" + b"0N" * (8 << 20) + b".")  # 16 MiB of POP/NONE
    assert path.stat().st_size < 100_000
    expect(path, CorruptFileError, "zip bomb")


def test_recompressed_small_checkpoint_without_storages_still_reads(tmp_path):
    path = tmp_path / "small.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"epoch": 3, "cfg": {"lr": 0.1}}, protocol=2))
    expect(path, WeightportError, "no tensors")  # read fine; it simply holds no weights


# -- zip tricks that are not damage ---------------------------------------------------------------


def _rewrite(src: Path, dst: Path, *, rename: Callable[[str], str] = lambda n: n, zip64: bool = False) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        zout.writestr("pad", b"x")  # shifts every record: offsets are not 64-byte aligned any more
        for info in zin.infolist():
            with zout.open(rename(info.filename), "w", force_zip64=zip64) as f:
                f.write(zin.read(info))


@pytest.mark.parametrize("variant", ["zip64", "traversal_names", "unaligned"])
def test_rewritten_archives_read_exactly(tmp_path, variant):
    good = tmp_path / "good.pth"
    torch.save(STATE, good)
    path = tmp_path / f"{variant}.pth"
    if variant == "traversal_names":  # names are lookup keys only: nothing is extracted anywhere
        _rewrite(good, path, rename=lambda n: "../" + n.split("/", 1)[1])
    else:
        _rewrite(good, path, zip64=variant == "zip64")
    src = wp.open_source(str(path))
    assert list(src) == list(STATE)
    assert all(torch.equal(src[k], v) for k, v in STATE.items())


def test_cli_reports_corrupt_input_in_one_line(tmp_path, capsys):
    from weightport.cli import main

    cases = {"empty.pth": b"", "cut.safetensors": struct.pack("<Q", 1000) + b"{", "page.bin": b"<html></html>"}
    for name, raw in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        assert main(["inspect", str(path)]) == 2
        assert main(["port", str(path), "torch.nn:Identity", "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all(line.startswith("weightport: error: ") and str(path) in line for line in err)


@pytest.mark.parametrize("opcode", [b"\x8f", b"]", b"}", b"("], ids=["EMPTY_SET", "EMPTY_LIST", "EMPTY_DICT", "MARK"])
def test_objects_a_pickle_builds_are_bounded_by_its_size(monkeypatch, opcode):
    """One-byte opcodes that each create an object: memory stays within the documented bytes per stream byte."""
    monkeypatch.setattr("weightport.sources.safepickle._stream.BASE_MEMORY", 0)  # only the per-byte allowance
    stream = b"\x80\x04" + opcode * 100_000 + b"N."
    tracemalloc.start()
    try:
        RestrictedUnpickler(stream).load()
    except CorruptFileError as e:
        assert "per byte of stream" in str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1.5 * MEMORY_PER_BYTE * len(stream), peak / len(stream)


class _FakeModule:
    """Pickled as a placeholder with a module's attributes: safe extraction walks it like an nn.Module."""


def _shared_module_graph(depth: int, entries: int) -> _FakeModule:
    """``depth`` levels of modules, each holding the next one twice and one shared ``entries``-long
    ``_parameters`` dict of non-tensors: 2**depth paths, each iterating every entry."""
    shared = {f"p{i}": None for i in range(entries)}
    node = None
    for _ in range(depth):
        parent = _FakeModule()
        parent.__dict__.update(_parameters=shared, _buffers={}, _modules={} if node is None else {"a": node, "b": node})
        node = parent
    return node


@pytest.mark.slow
def test_safe_extraction_counts_every_entry_it_iterates(tmp_path):
    path = tmp_path / "graph.pkl"
    path.write_bytes(pickle.dumps({"w": torch.ones(1), "model": _shared_module_graph(14, 10_000)}, protocol=2))
    assert path.stat().st_size < 200_000
    with pytest.raises(CorruptFileError, match="implausibly large") as err:
        wp.open_source(str(path), checkpoint_key="model")
    assert str(path) in str(err.value)


def test_safe_extraction_budget_is_shared_across_keys(tmp_path, monkeypatch):
    """Each key alone is within the budget; together they are not."""
    monkeypatch.setattr("weightport.sources.unwrap.MAX_WALK_WORK", 50_000)
    graph = _shared_module_graph(4, 2_000)  # 15 modules walked, 2 000 entries each: about 30 000 per key
    path = tmp_path / "graph.pkl"
    path.write_bytes(pickle.dumps({"w": torch.ones(1), **{f"k{i}": graph for i in range(10)}}, protocol=2))
    with pytest.raises(CorruptFileError, match="implausibly large"):
        wp.open_source(str(path))
    single = tmp_path / "one.pkl"
    single.write_bytes(pickle.dumps({"w": torch.ones(1), "k": graph}, protocol=2))
    assert list(wp.open_source(str(single))) == ["w"]


def _zip_state(path: Path, entries: bytes, storage_numel: int = 4) -> Path:
    """A torch zip whose data.pkl is ``{entries}`` (hand-assembled), over one 16-byte float storage ``"0"``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}(" + entries + b"u.")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", bytes(4 * storage_numel))
    return path


def _long(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<i", len(raw)) + raw  # LONG4


def _tensor_pickle(size: list[bytes], stride: list[bytes]) -> bytes:
    pid = (
        b"("
        + b"X\x07\x00\x00\x00storage"
        + b"ctorch\nFloatStorage\n"
        + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    )
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid
        + b"K\x00("
        + b"".join(size)
        + b"t("
        + b"".join(stride)
        + b"t\x89ccollections\nOrderedDict\n)RtR"
    )


@pytest.mark.parametrize("dim", [1 << 63, 1 << 64, 10**5000], ids=["2**63", "2**64", "5000 digits"])
def test_dimension_no_tensor_can_have_is_refused_when_opened(tmp_path, dim):
    """A zero-element tensor with a huge dimension is refused at open, before any hook or plan sees it."""
    path = _zip_state(
        tmp_path / "t.pth", b"X\x01\x00\x00\x00w" + _tensor_pickle([b"K\x00", _long(dim)], [_long(dim), b"K\x01"])
    )
    with pytest.raises(CorruptFileError, match="2\\*\\*63") as err:
        wp.open_source(str(path))
    assert str(path) in str(err.value)
    digits = "1" + "0" * 5000 if dim > 1 << 64 else str(dim)  # str() refuses a 5000-digit int
    header = ('{"w": {"dtype": "F32", "shape": [0, ' + digits + '], "data_offsets": [0, 0]}}').encode()
    st = tmp_path / "t.safetensors"
    st.write_bytes(struct.pack("<Q", len(header)) + header)
    expect(st, CorruptFileError, "not valid JSON" if dim > 1 << 64 else "'w'")


def test_huge_integer_key_is_named_not_a_value_error(tmp_path):
    key = 10**5000
    path = _zip_state(tmp_path / "k.pth", _long(key) + _tensor_pickle([b"K\x04"], [b"K\x01"]))
    src = wp.open_source(str(path))
    (name,) = list(src)
    assert "integer of" in name and src[name].shape == (4,)


def test_huge_integer_in_a_shard_index_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "a.safetensors"}, "n": ' + "9" * 5000 + "}"
    )
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        wp.open_source(str(tmp_path))
