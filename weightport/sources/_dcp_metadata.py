"""A DCP checkpoint's ``.metadata`` file, read without running code from it.

``torch.distributed.checkpoint.FileSystemReader.read_metadata`` reads ``.metadata`` with a
plain ``pickle.load``: a hostile file runs code the moment it is opened. Here the pickle goes
through weightport's restricted machine (:mod:`weightport.sources.safepickle`): DCP's classes
come back as inert placeholders recording their fields, which are checked (types, bounds, file
names inside the folder) and rebuilt into DCP's own public dataclasses (``Metadata``,
``TensorStorageMetadata`` …), so that DCP's reader can then read the data files as it always
does. ``trust_pickle=True`` hands the file to DCP's reader instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint import (
    BytesStorageMetadata,
    FileSystemReader,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties

from weightport.errors import CorruptFileError, SourceNotFoundError, UnsupportedFormatError
from weightport.sources.safepickle import Inert, NeedsTorchLoad, RestrictedUnpickler
from weightport.sources.safepickle.records import StandIn, dims

METADATA_FILE = ".metadata"
DATA_SUFFIX = ".distcp"
_MODULE = "torch.distributed.checkpoint.metadata."
#: The DCP classes a ``.metadata`` pickle names; any other global is listed as a placeholder.
KNOWN_GLOBALS = frozenset(
    {
        *(
            _MODULE + n
            for n in (
                "Metadata",
                "TensorStorageMetadata",
                "TensorProperties",
                "_MEM_FORMAT_ENCODING",
                "ChunkStorageMetadata",
                "BytesStorageMetadata",
                "MetadataIndex",
                "StorageMeta",
            )
        ),
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.Path",
    }
)


@dataclass(frozen=True)
class StorageInfo:
    """Where one saved item lies: the fields DCP's ``FileSystemReader`` reads of each entry of
    ``Metadata.storage_data`` (its own class for them is private)."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ReadMetadata:
    """``.metadata``, read: DCP's ``Metadata`` and the globals its pickle named beyond DCP's own."""

    metadata: Metadata
    placeholders: tuple[str, ...]


def read_metadata(folder: str, *, trust_pickle: bool = False) -> ReadMetadata:
    """Read ``folder/.metadata`` safely (or with DCP's own ``pickle.load`` when ``trust_pickle``).

    Raises:
        SourceNotFoundError: The folder holds no ``.metadata`` and no data files.
        CorruptFileError: It holds data files but no ``.metadata`` (an unfinished save), or ``.metadata``
            is empty, damaged, or describes data it cannot hold.
    """
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(path):
        names = os.listdir(folder) if os.path.isdir(folder) else []
        if any(n.endswith(DATA_SUFFIX) for n in names):
            raise CorruptFileError(
                f"{folder}: holds DCP data files (*{DATA_SUFFIX}) but no {METADATA_FILE}, which DCP writes last: "
                "the save did not finish; save the checkpoint again"
            )
        raise SourceNotFoundError(
            f"{folder}: no {METADATA_FILE} file, so it is not a torch.distributed.checkpoint folder"
        )
    if trust_pickle:
        try:
            return ReadMetadata(FileSystemReader(folder).read_metadata(), ())
        except Exception as e:
            raise CorruptFileError(f"{path}: DCP cannot read it ({type(e).__name__}: {e}); {_FIX}") from e
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise CorruptFileError(f"{path}: the file is empty (0 bytes); {_FIX}")
    machine = _MetadataUnpickler(data)
    try:
        obj = machine.load()
        metadata = _metadata(obj)
    except NeedsTorchLoad as e:
        raise CorruptFileError(f"{path}: names {e}, which no DCP metadata holds; {_FIX}") from e
    except CorruptFileError as e:
        raise CorruptFileError(f"{path}: {e}; {_FIX}") from e
    return ReadMetadata(metadata, tuple(g for g in machine.unsafe_globals if g not in KNOWN_GLOBALS))


_FIX = "the checkpoint folder is damaged or was not written by torch.distributed.checkpoint; save it again"


_LAYOUTS = {"torch.strided": torch.strided}


class _MetadataUnpickler(RestrictedUnpickler):
    """The restricted machine, plus the one torch global DCP metadata pickles: a tensor layout by name."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.serialization", "_get_layout"):
            return StandIn("torch.serialization._get_layout", _layout)
        return super().find_class(module, name)


def _layout(machine: Any, name: Any) -> torch.layout:
    if name not in _LAYOUTS:
        raise UnsupportedFormatError(f"a tensor with layout {name!r}; DCP sources read strided (dense) tensors")
    return _LAYOUTS[name]


def _fields(obj: Any, qualname: str, where: str) -> Any:
    """The ``BUILD`` state of a placeholder for DCP's ``qualname`` (a dict, or a tuple for ``TensorProperties``)."""
    if not isinstance(obj, Inert) or obj.qualname.rpartition(".")[2] != qualname.rpartition(".")[2]:
        raise CorruptFileError(f"{where} is a {getattr(obj, 'qualname', type(obj).__name__)}, not a {qualname}")
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
        state = {**(state[0] or {}), **(state[1] if isinstance(state[1], dict) else {})}  # (dict, slots)
    return state


def _get(state: Any, key: str, where: str, *, default: Any = ...) -> Any:
    if not isinstance(state, dict) or (key not in state and default is ...):
        raise CorruptFileError(f"{where} has no {key!r}")
    return state.get(key, default)


def _metadata(obj: Any) -> Metadata:
    state = _fields(obj, "Metadata", "the top object")
    entries = _get(state, "state_dict_metadata", "the metadata")
    storage = _get(state, "storage_data", "the metadata", default=None)
    planner_data = _get(state, "planner_data", "the metadata", default=None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CorruptFileError("the metadata's entries or storage table is not a dict")
    described = {fqn: _entry(fqn, value) for fqn, value in entries.items() if _is_fqn(fqn)}
    if len(described) != len(entries):
        raise CorruptFileError("the metadata has an entry whose name is not a string")
    storage_data = dict(_storage(k, v) for k, v in storage.items())
    for fqn, entry in described.items():
        keys = (
            [MetadataIndex(fqn, c.offsets) for c in entry.chunks]
            if isinstance(entry, TensorStorageMetadata)
            else [MetadataIndex(fqn)]
        )
        if any(k not in storage_data for k in keys):
            raise CorruptFileError(f"{fqn!r} has saved parts the storage table does not locate")
    return Metadata(state_dict_metadata=described, planner_data=_paths(planner_data), storage_data=storage_data)


def _is_fqn(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 10_000


def _entry(fqn: Any, value: Any) -> TensorStorageMetadata | BytesStorageMetadata:
    where = f"{fqn!r}"
    if isinstance(value, Inert) and value.qualname.endswith(".BytesStorageMetadata"):
        return BytesStorageMetadata()
    state = _fields(value, "TensorStorageMetadata", where)
    props = _fields(_get(state, "properties", where), "TensorProperties", where)
    dtype = props[0] if isinstance(props, tuple) and props else _get(props, "dtype", where)
    if not isinstance(dtype, torch.dtype):
        raise CorruptFileError(f"{where} has no tensor dtype")
    size = dims(_get(state, "size", where), f"size of {where}")
    chunks = _get(state, "chunks", where)
    if not isinstance(chunks, list) or (not chunks and 0 not in size):
        raise CorruptFileError(f"{where} lists no saved chunks")
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=dtype), size=torch.Size(size), chunks=[_chunk(c, size, where) for c in chunks]
    )


def _chunk(obj: Any, size: tuple[int, ...], where: str) -> ChunkStorageMetadata:
    state = _fields(obj, "ChunkStorageMetadata", f"a chunk of {where}")
    offsets = dims(_get(state, "offsets", where), f"chunk offset of {where}")
    sizes = dims(_get(state, "sizes", where), f"chunk size of {where}")
    if len(offsets) != len(size) or len(sizes) != len(size) or any(o + n > d for o, n, d in zip(offsets, sizes, size)):
        raise CorruptFileError(f"{where} has a chunk at {offsets} of {sizes} outside its size {size}")
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))


def _storage(key: Any, value: Any) -> tuple[MetadataIndex, StorageInfo]:
    index = _fields(key, "MetadataIndex", "a storage table key")
    fqn, offset = _get(index, "fqn", "a storage key"), _get(index, "offset", "a storage key", default=None)
    if not _is_fqn(fqn):
        raise CorruptFileError("a storage table key has no name")
    where = f"the storage of {fqn!r}"
    item = _fields(value, "_StorageInfo", where)
    path, start, length = (_get(item, k, where) for k in ("relative_path", "offset", "length"))
    transforms = _get(item, "transform_descriptors", where, default=None)
    if not _plain_file_name(path):
        raise CorruptFileError(f"{where} names the file {path!r}, which is not a file name inside the folder")
    if type(start) is not int or type(length) is not int or start < 0 or length < 0:
        raise CorruptFileError(f"{where} has a malformed offset or length")
    if transforms is not None and not (
        isinstance(transforms, (list, tuple)) and all(isinstance(t, str) for t in transforms)
    ):
        raise CorruptFileError(f"{where} has malformed transform descriptors")
    at = None if offset is None else torch.Size(dims(offset, f"offset of {where}"))
    return MetadataIndex(fqn, at), StorageInfo(path, start, length, None if transforms is None else tuple(transforms))


def _plain_file_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and not any(sep in name for sep in ("/", "\\", "\0"))
    )


def _paths(planner_data: Any) -> dict[str, tuple[str | int, ...]] | None:
    """DCP's ``planner_data``: each flattened name's key path in the nested state dict, when well formed."""
    if not isinstance(planner_data, dict):
        return None
    out = {}
    for fqn, path in planner_data.items():
        if not (_is_fqn(fqn) and isinstance(path, tuple) and path and all(type(p) in (str, int) for p in path)):
            return None
        out[fqn] = path
    return out
