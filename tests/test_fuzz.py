"""Fuzzing (hypothesis, bounded): the readers and the mapping-file parser let nothing but
WeightportError escape, whatever the bytes.

Inputs are valid files with bytes flipped, cut, inserted or overwritten; pickle streams
built from random opcodes; random TOML-shaped mapping data. Example counts are fixed and
small and the runs derandomized, so CI is reproducible; set ``WEIGHTPORT_FUZZ_EXAMPLES`` to fuzz
longer, with fresh random inputs, locally.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightport as wp
from weightport.errors import WeightportError
from weightport.mapping.files import load_mapping, parse_mapping
from weightport.sources.safepickle import NeedsTorchLoad, RestrictedUnpickler

EXAMPLES = int(os.environ.get("WEIGHTPORT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="WEIGHTPORT_FUZZ_EXAMPLES" not in os.environ,  # CI: reproducible; longer local runs: fresh
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

STATE = OrderedDict(
    [
        ("conv.weight", torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)),
        ("conv.bias", torch.tensor([1.5, -2.0], dtype=torch.float16)),
        ("steps", torch.tensor(7)),
        ("t", torch.arange(6.0).reshape(2, 3).t()),  # a strided view
    ]
)


def _bytes_of(writer) -> bytes:
    buf = io.BytesIO()
    writer(buf)
    return buf.getvalue()


def _safetensors() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.safetensors"
        wp.save(STATE, path)
        return path.read_bytes()


SEEDS = {
    ".safetensors": _safetensors(),
    ".pth": _bytes_of(lambda b: torch.save({"state_dict": STATE, "epoch": 3}, b)),
    ".bin": _bytes_of(lambda b: torch.save(STATE, b, _use_new_zipfile_serialization=False)),
    ".pkl": pickle.dumps({"w": STATE["conv.weight"], "meta": {"a": [1, 2.0, None]}}, protocol=2),
}


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "overwrite", "zero_run"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        else:
            n = draw(st.integers(1, 64))
            data[at : at + n] = bytes(min(n, len(data) - at))
    return bytes(data)


def read_everything(path: Path) -> None:
    try:
        src = wp.open_source(str(path))
        for name in src:
            src.meta(name)
            src[name]
    except WeightportError:
        pass


def _check_file(suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(data)
        read_everything(path)  # anything but WeightportError fails the test


@pytest.mark.parametrize("suffix", sorted(SEEDS))
def test_seeds_are_valid(suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"seed{suffix}"
        path.write_bytes(SEEDS[suffix])
        assert len(wp.open_source(str(path))) >= 1


@FUZZ
@given(data=mutated(SEEDS[".safetensors"]))
def test_fuzz_safetensors(data):
    _check_file(".safetensors", data)


@FUZZ
@given(data=mutated(SEEDS[".pth"]))
def test_fuzz_torch_zip(data):
    _check_file(".pth", data)


@FUZZ
@given(data=mutated(SEEDS[".bin"]))
def test_fuzz_torch_legacy(data):
    _check_file(".bin", data)


@FUZZ
@given(data=mutated(SEEDS[".pkl"]))
def test_fuzz_plain_pickle(data):
    _check_file(".pkl", data)


@pytest.mark.slow
@FUZZ
@given(
    header=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=12,
    ),
    names=st.lists(st.sampled_from(["a", "b", "__metadata__", "dtype", "shape", "data_offsets"]), max_size=3),
)
def test_fuzz_safetensors_header_json(header, names):
    """Well-formed JSON with arbitrary structure, placed where the header goes."""
    import json

    obj = {n: header for n in names} if names else header
    try:
        raw = json.dumps(obj).encode()
    except ValueError:
        return
    _check_file(".safetensors", struct.pack("<Q", len(raw)) + raw + bytes(64))


# -- the pickle machine on its own -------------------------------------------------------------------

OPCODES = [
    bytes([c])
    for c in b"NJKM\x8a\x8b\x8c\x8dXBCTU)]}\x8fghjbaesu\x90\x85\x86\x87pqr\x94(01tld\x91\x93oiRQ\x81\x922\x88\x89G\x95"
]


@st.composite
def opcode_streams(draw: st.DrawFn) -> bytes:
    parts = [b"\x80\x04"]
    for _ in range(draw(st.integers(0, 40))):
        parts.append(draw(st.sampled_from(OPCODES)))
        parts.append(draw(st.binary(max_size=6)))
        if draw(st.booleans()):
            parts.append(
                draw(st.sampled_from([b"cos\nsystem\n", b"ctorch._utils\n_rebuild_tensor_v2\n", b"\x8c\x02os"]))
            )
    parts.append(b".")
    return b"".join(parts)


@FUZZ
@given(stream=opcode_streams() | st.binary(max_size=200))
def test_fuzz_restricted_unpickler(stream):
    try:
        RestrictedUnpickler(stream).load()
    except (WeightportError, NeedsTorchLoad):
        pass


@FUZZ
@given(stream=mutated(pickle.dumps({"a": [1, (2, 3)], "b": {"c": b"x" * 10, "d": 1.5}, "e": {1, 2}}, protocol=4)))
def test_fuzz_mutated_pickle_stream(stream):
    try:
        RestrictedUnpickler(stream).load()
    except (WeightportError, NeedsTorchLoad):
        pass


# -- mapping files ----------------------------------------------------------------------------------

FIELD_NAMES = [
    "rename",
    "to",
    "drop",
    "split",
    "fuse",
    "dim",
    "sizes",
    "op",
    "transform",
    "params",
    "strip_prefix",
    "add_prefix",
    "factor",
    "index",
    "x",
]
PATTERN_BITS = ["{i}", "{n*}", "{i+1}", "{i-1}", "*", "**", ".", "re:", "(", "[", "a", "b.", "{", "}", "\\", "0"]
values = st.recursive(
    st.lists(st.sampled_from(PATTERN_BITS), max_size=6).map("".join)
    | st.integers(-5, 5)
    | st.booleans()
    | st.floats(allow_nan=True),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=3),
    max_leaves=8,
)
rules = st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=4)


@FUZZ
@given(
    data=st.fixed_dictionaries(
        {"rule": st.lists(rules, max_size=4)},
        optional={"name": values, "extends": values, "description": values, "bogus": values},
    )
)
def test_fuzz_mapping_data(data):
    try:
        parse_mapping(data, "<fuzz>")
    except WeightportError:
        pass


MAPPING_SEED = b"""name = "a->b"
[[rule]]
rename = "encoder.layers.{i}.ln_{n}.{p}"
to = "blocks.{i}.norm{n}.{p}"
[[rule]]
split = "blocks.{i}.qkv.{p}"
to = ["q.{i}.{p}", "k.{i}.{p}", "v.{i}.{p}"]
dim = 0
[[rule]]
transform = "head.weight"
to = "fc.weight"
op = "select"
index = [0, 2]
"""


@FUZZ
@given(text=mutated(MAPPING_SEED))
def test_fuzz_mapping_file_bytes(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.toml"
        path.write_bytes(text)
        try:
            load_mapping(path)
        except WeightportError:
            pass


def test_mapping_seed_is_valid(tmp_path):
    path = tmp_path / "m.toml"
    path.write_bytes(MAPPING_SEED)
    assert len(load_mapping(path).rules) == 3


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=300)
    | st.complex_numbers(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=5)
        | st.frozensets(st.integers() | st.text(max_size=3), max_size=4)
    ),
    max_leaves=40,
)


@FUZZ
@given(value=plain_values, protocol=st.integers(0, 5), shared=st.booleans())
def test_machine_agrees_with_pickle_on_plain_data(value, protocol, shared):
    """Differential check: on plain data the machine builds exactly what CPython's pickle builds."""
    obj = [value, value, OrderedDict(a=value)] if shared else value  # shared: memo PUT/GET paths
    assert RestrictedUnpickler(pickle.dumps(obj, protocol=protocol)).load() == obj


# -- shard indexes (sharded folders) -----------------------------------------------------------------

INDEX_SEED = (
    b'{"metadata": {"total_size": 144}, "weight_map": {"conv.weight": "a.safetensors", "steps": "a.safetensors"}}'
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
SHARD_NAMES = st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd", "", "b.bin", "x.index.json", "a"])


@st.composite
def shard_indexes(draw: st.DrawFn) -> bytes:
    import json

    if draw(st.booleans()):
        return draw(mutated(INDEX_SEED))
    names = st.sampled_from(["conv.weight", "steps", "nope", ""]) | st.text(max_size=6)
    index = {
        "weight_map": draw(st.dictionaries(names, SHARD_NAMES | JSON_VALUES, max_size=4)),
        "metadata": draw(JSON_VALUES),
    }
    raw = json.dumps(draw(st.sampled_from([index, index["weight_map"], index["metadata"]])))
    if draw(st.booleans()):  # an integer past Python's digit limit somewhere
        raw = raw.replace("{", '{"n": ' + "7" * draw(st.integers(4300, 6000)) + ", ", 1)
    return raw.encode()


@FUZZ
@given(index=shard_indexes())
def test_fuzz_shard_index(index):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "a.safetensors").write_bytes(SEEDS[".safetensors"])
        (Path(d) / "model.safetensors.index.json").write_bytes(index)
        read_everything(Path(d))


# -- tensor records: every dtype, storage type and size a pickle can name ---------------------------

DTYPE_NAMES = sorted({str(d).removeprefix("torch.") for d in vars(torch).values() if isinstance(d, torch.dtype)})
STORAGE_NAMES = sorted(n for n in dir(torch) if n.endswith("Storage"))
DIMS = st.integers(0, 8) | st.sampled_from([2**31, 2**62, 2**63 - 1, 2**63, 2**64, 10**30])


def _int(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<i", len(raw)) + raw


@st.composite
def tensor_zips(draw: st.DrawFn) -> bytes:
    """A torch zip whose one tensor names any storage type, dtype override, size, stride and offset."""
    shape = draw(st.lists(DIMS, max_size=3))
    stride = draw(st.lists(DIMS, min_size=len(shape), max_size=len(shape)))
    numel = draw(DIMS)
    storage = f"ctorch\n{draw(st.sampled_from(STORAGE_NAMES))}\n".encode()
    pid = b"(X\x07\x00\x00\x00storage" + storage + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpu" + _int(numel) + b"tQ"
    args = pid + _int(draw(DIMS)) + b"(" + b"".join(map(_int, shape)) + b"t(" + b"".join(map(_int, stride)) + b"t"
    args += b"\x89ccollections\nOrderedDict\n)R"
    if draw(st.booleans()):
        rebuild = (
            b"ctorch._utils\n_rebuild_tensor_v3\n(" + args + f"ctorch\n{draw(st.sampled_from(DTYPE_NAMES))}\n".encode()
        )
    else:
        rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n(" + args
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}X\x01\x00\x00\x00w" + rebuild + b"tRs.")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", bytes(range(64)) * draw(st.integers(0, 2)))
    return buf.getvalue()


@FUZZ
@given(data=tensor_zips())
def test_fuzz_tensor_records(data):
    """Any storage type, dtype and geometry is read faithfully or refused; never a crash or a raw error."""
    _check_file(".pth", data)
