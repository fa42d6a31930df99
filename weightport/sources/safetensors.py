"""Reading ``.safetensors`` files: the header is parsed and checked, tensors are mapped lazily.

Checked before any tensor is touched: the header length against the file size, the
header as strict JSON (no duplicate keys, bounded nesting), each entry's dtype,
shape and offsets (integers, not booleans; the byte count matching shape and
dtype), that every tensor lies inside the data section, and that no two overlap.
"""

from __future__ import annotations

import json
import math
import os
import struct
from itertools import compress, repeat
from operator import add, attrgetter, gt, itemgetter, lt, mul, sub

import torch

from weightport._tuples import rows
from weightport.errors import CorruptFileError
from weightport.sources._mapped import MappedFile, TensorRef, first_overlap
from weightport.sources.base import SourceInfo
from weightport.sources.memory import FileSource
from weightport.sources.safepickle.records import MAX_DIM

#: The longest header read, and the longest a file of unknown type may claim to be taken for safetensors.
MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
}
for _name, _attr in [
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("C128", "complex128"),
]:
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def looks_like_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes start like safetensors: a plausible header length, then ``{``."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= MAX_HEADER


def read_header(path: str) -> tuple[dict, int]:
    """Parse and validate the header. Returns ``(header, data_start)``.

    Raises:
        CorruptFileError: The file is empty or too short, the length prefix runs past the end,
            or the header is not a JSON object.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise CorruptFileError(f"{path}: the file is empty (0 bytes); the download or save did not complete")
    if size < 8:
        raise CorruptFileError(f"{path}: {size} bytes is too short for a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise CorruptFileError(
                f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                "the file is truncated or not safetensors"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CorruptFileError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {dup!r} appears twice")
    return out


def open_safetensors(path: str, location: str | None = None) -> FileSource:
    """Open a safetensors file lazily; every entry is checked against the file's size."""
    header, start = read_header(path)
    file = MappedFile(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFileError(f"{path}: '__metadata__' is not a JSON object of strings")
    refs = _refs_in_bulk(file, start, header)
    if refs is None:  # something is off: the checks entry by entry say exactly what
        refs = {}
        spans: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            refs[name] = _entry_ref(path, file, start, name, entry, spans)
        _check_overlaps(path, spans)
    aliases = _aliases(metadata)
    for alias, canonical in aliases.items():
        if canonical in refs and alias not in refs:
            refs[alias] = refs[canonical]
    info = SourceInfo(
        kind="safetensors",
        location=location or path,
        files=(path,),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
    return FileSource(refs, info, [file])


def _refs_in_bulk(file: MappedFile, start: int, header: dict[str, object]) -> dict[str, TensorRef] | None:
    """The references of every entry when all of them pass :func:`_entry_ref`'s checks, made column
    by column (one pass each, mostly in C, instead of one entry at a time); ``None`` as
    soon as anything looks wrong, so the entry-by-entry checks can name the culprit."""
    entries = list(header.values())
    if any(type(e) is not dict for e in entries):
        return None
    try:
        dtypes = [DTYPES[e["dtype"]] for e in entries]  # type: ignore[index]
        shapes = [e["shape"] for e in entries]  # type: ignore[index]
        offsets = [e["data_offsets"] for e in entries]  # type: ignore[index]
    except (KeyError, TypeError):  # a missing field, or an unhashable dtype
        return None
    if {type(x) for x in shapes} - {list} or {type(x) for x in offsets} - {list}:
        return None
    if max(map(len, shapes), default=0) > 64 or {len(x) for x in offsets} - {2}:
        return None
    dims = [d for shape in shapes for d in shape]
    bounds = [o for pair in offsets for o in pair]
    if {type(x) for x in dims} - {int} or {type(x) for x in bounds} - {int}:
        return None  # floats, strings, and booleans (bool is not int here)
    if min(dims, default=0) < 0 or min(bounds, default=0) < 0 or max(dims, default=0) > MAX_DIM:
        return None
    numels = list(map(math.prod, shapes))
    begins, ends = bounds[0::2], bounds[1::2]
    if list(map(sub, ends, begins)) != list(map(mul, numels, map(attrgetter("itemsize"), dtypes))):
        return None  # a span that is not the size of its tensor
    if start + max(ends, default=0) > file.size:
        return None
    spans = sorted(compress(zip(begins, ends), map(gt, ends, begins)))  # empty tensors overlap nothing
    if any(map(lt, map(itemgetter(0), spans[1:]), map(itemgetter(1), spans))):
        return None  # a tensor begins before the one before it ends: they overlap
    offsets_in_file = map(add, repeat(start), begins)
    defaults = repeat(None), repeat(0), repeat(False)  # stride, storage_offset, byteswap
    return dict(
        zip(header, rows(TensorRef, repeat(file), offsets_in_file, numels, dtypes, map(tuple, shapes), *defaults))
    )


def _entry_ref(
    path: str, file: MappedFile, start: int, name: str, entry: object, spans: list[tuple[int, int, str]]
) -> TensorRef:
    if not isinstance(entry, dict):
        raise CorruptFileError(f"{path}: header entry {name!r} is not an object")
    dtype_name = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CorruptFileError(
            f"{path}: tensor {name!r} has dtype {dtype_name!r}, which this torch cannot hold "
            f"(known: {', '.join(DTYPES)})"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > 64
        or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
    ):
        raise CorruptFileError(f"{path}: tensor {name!r} has a malformed shape or data_offsets")
    dtype = DTYPES[dtype_name]
    begin, end = offsets
    numel = math.prod(shape)
    itemsize = dtype.itemsize
    if end < begin or end - begin != numel * itemsize:
        raise CorruptFileError(
            f"{path}: tensor {name!r} of shape {tuple(shape)} and dtype {dtype_name} needs "
            f"{numel * itemsize} bytes but its data_offsets span {end - begin}"
        )
    file.check_range(start + begin, end - begin, f"tensor {name!r}")
    spans.append((begin, end, name))
    return TensorRef(file, start + begin, numel, dtype, tuple(shape))


def _check_overlaps(path: str, spans: list[tuple[int, int, str]]) -> None:
    pair = first_overlap(spans)
    if pair is not None:
        (b0, e0, n0), (b1, e1, n1) = pair
        raise CorruptFileError(
            f"{path}: tensors {n0!r} and {n1!r} overlap (bytes {b0}..{e0} and {b1}..{e1}); the file is damaged"
        )


def _aliases(metadata: dict) -> dict[str, str]:
    raw = metadata.get("weightport.aliases")
    if not raw:
        return {}
    try:
        table = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, str)}
