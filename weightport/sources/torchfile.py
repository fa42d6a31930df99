"""Reading torch files (``torch.save``): zip and legacy formats, and plain pickles.

The pickle inside is read with :class:`~weightport.sources.unpickle.RestrictedUnpickler`,
which imports and calls nothing from the file and records where each tensor's
bytes are instead of reading them. Tensor data is then mapped from the file
lazily. Tensor kinds that cannot be mapped (quantized, sparse) fall back to
``torch.load(weights_only=True)``; only an explicit ``trust_pickle=True`` ever
runs the full pickle machinery.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any

import torch

from weightport.errors import CorruptFileError, UnsafeFileError
from weightport.sources._mapped import MappedFile, TensorRef
from weightport.sources.unpickle import (
    Inert,
    NeedsTorchLoad,
    PickledTensor,
    RestrictedUnpickler,
    StorageRef,
    _checked_load,
    restricted_loads,
)

log = logging.getLogger(__name__)

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")


class Parsed:
    """A torch file's object tree with lazy tensors, before unwrapping.

    Attributes:
        obj: The unpickled object, tensors as :class:`TensorRef` or in-memory tensors.
        kind: ``"torch-zip"``, ``"torch-legacy"``, ``"pickle"`` or ``"torch-load"``.
        files: Mapped files tensors refer to.
        unsafe_globals: Globals replaced by inert placeholders.
    """

    def __init__(self, obj: Any, kind: str, files: list[MappedFile], unsafe_globals: list[str]):
        self.obj = obj
        self.kind = kind
        self.files = files
        self.unsafe_globals = unsafe_globals


def parse_torch_file(path: str, *, trust_pickle: bool = False) -> Parsed:
    """Parse a torch or pickle file into an object tree whose tensors are not yet read."""
    size = os.path.getsize(path)
    if size == 0:
        raise CorruptFileError(f"{path}: the file is empty")
    if trust_pickle:
        return _torch_load(path, weights_only=False)
    try:
        if zipfile.is_zipfile(path):
            return _parse_zip(path)
        if _is_tar(path):
            return _torch_load(path, weights_only=True)
        return _parse_pickle_stream(path)
    except NeedsTorchLoad:
        return _torch_load(path, weights_only=True)
    except CorruptFileError as e:
        if str(e).startswith(path):
            raise
        raise CorruptFileError(f"{path}: not a readable torch or pickle file: {e}") from e


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


# -- zip ---------------------------------------------------------------------------------------


def _parse_zip(path: str) -> Parsed:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: damaged zip archive ({e})") from e
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CorruptFileError(
                f"{path}: a zip archive without data.pkl is not a torch.save file "
                "(a TorchScript archive? load it with torch.jit.load and pass the module)"
            )
        prefix = pkl[0][: -len("data.pkl")]
        try:
            data = zf.read(pkl[0])
            byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise CorruptFileError(f"{path}: damaged record in zip archive ({e})") from e
        infos = {i.filename: i for i in zf.infolist()}
    file = MappedFile(path)
    storages: dict[str, tuple[int, int]] = {}

    def storage(pid: Any) -> StorageRef:
        ref = _storage_ref(pid, path, zip_format=True)
        info = infos.get(f"{prefix}data/{ref.key}")
        if info is None:
            raise CorruptFileError(f"{path}: storage record data/{ref.key} is missing from the archive")
        if ref.key not in storages:
            storages[ref.key] = (_record_offset(path, file, info), info.file_size)
        return ref

    try:
        obj, unsafe = restricted_loads(data, storage)
    except CorruptFileError as e:
        raise CorruptFileError(f"{path}: {e}") from e
    swap = byteorder != "little"
    obj = _resolve(obj, lambda ref: (file, *storages[ref.key]), swap, path)
    return Parsed(obj, "torch-zip", [file], unsafe)


def _record_offset(path: str, file: MappedFile, info: zipfile.ZipInfo) -> int:
    if info.compress_type != zipfile.ZIP_STORED:
        raise CorruptFileError(f"{path}: record {info.filename} is compressed; torch never writes that")
    file.check_range(info.header_offset, _LOCAL_HEADER.size, f"zip record {info.filename}")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if fields[0] != 0x04034B50:
        raise CorruptFileError(f"{path}: zip record {info.filename} has a damaged local header")
    offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    file.check_range(offset, info.file_size, f"zip record {info.filename}")
    return offset


def _storage_ref(pid: Any, path: str, *, zip_format: bool) -> StorageRef:
    if not isinstance(pid, tuple) or not pid:
        raise CorruptFileError(f"{path}: malformed persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage" or len(pid) < 5:
        raise CorruptFileError(f"{path}: unknown persistent id {kind!r}")
    storage_type, key, _location, numel = pid[1:5]
    dtype = getattr(storage_type, "dtype", None)
    if not isinstance(dtype, torch.dtype) or type(numel) is not int or numel < 0:
        raise CorruptFileError(f"{path}: storage {key!r} has an unknown type {storage_type!r}")
    view_offset = 0
    if not zip_format and len(pid) > 5 and pid[5] is not None:
        view = pid[5]
        if not isinstance(view, tuple) or len(view) != 3 or type(view[1]) is not int:
            raise CorruptFileError(f"{path}: malformed storage view {view!r}")
        view_offset = view[1]
    return StorageRef(str(key), dtype, numel, view_offset)


# -- legacy (pre-1.6) and plain pickles --------------------------------------------------------


def _parse_pickle_stream(path: str) -> Parsed:
    with open(path, "rb") as f:
        unpickler = RestrictedUnpickler(f)
        first = _checked_load(unpickler)
        if type(first) is int and first == MAGIC_NUMBER:
            return _parse_legacy(path, f)
    obj = _resolve(first, None, False, path)
    return Parsed(obj, "pickle", [], unpickler.unsafe_globals)


def _parse_legacy(path: str, f: Any) -> Parsed:
    protocol = _checked_load(RestrictedUnpickler(f))
    if protocol != 1001:
        raise CorruptFileError(f"{path}: unknown legacy torch protocol {protocol!r}")
    sys_info = _checked_load(RestrictedUnpickler(f))
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    refs: dict[str, StorageRef] = {}

    def storage(pid: Any) -> Any:
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        if kind in ("module", b"module") and len(pid) >= 2:
            return pid[1]
        ref = _storage_ref(pid, path, zip_format=False)
        refs.setdefault(ref.key, ref)
        return ref

    unpickler = RestrictedUnpickler(f, storage)
    obj = _checked_load(unpickler)
    keys = _checked_load(RestrictedUnpickler(f))
    if not isinstance(keys, list):
        raise CorruptFileError(f"{path}: the legacy storage table is malformed")
    file = MappedFile(path)
    offsets: dict[str, tuple[MappedFile, int, int]] = {}
    pos = f.tell()
    for key in keys:
        ref = refs.get(str(key))
        if ref is None:
            raise CorruptFileError(f"{path}: storage {key!r} is listed but never used")
        file.check_range(pos, 8, f"storage {key!r}")
        f.seek(pos)
        (numel,) = struct.unpack("<q", f.read(8))
        itemsize = torch.empty((), dtype=ref.dtype).element_size()
        file.check_range(pos + 8, numel * itemsize, f"storage {key!r}")
        offsets[str(key)] = (file, pos + 8, numel * itemsize)
        pos += 8 + numel * itemsize
    obj = _resolve(obj, lambda ref: offsets[ref.key], not little, path)
    return Parsed(obj, "torch-legacy", [file], unpickler.unsafe_globals)


def read_embedded_storage(data: bytes) -> StorageRef:
    """A storage that a plain pickle embeds as a tiny legacy torch file (``_load_from_bytes``)."""
    f = io.BytesIO(data)
    if _checked_load(RestrictedUnpickler(f)) != MAGIC_NUMBER:
        raise CorruptFileError("an embedded storage is not a torch legacy record")
    _checked_load(RestrictedUnpickler(f))
    _checked_load(RestrictedUnpickler(f))
    found: list[StorageRef] = []

    def storage(pid: Any) -> StorageRef:
        ref = _storage_ref(pid, "<embedded storage>", zip_format=False)
        found.append(ref)
        return ref

    _checked_load(RestrictedUnpickler(f, storage))
    _checked_load(RestrictedUnpickler(f))
    if len(found) != 1:
        raise CorruptFileError("an embedded storage record is malformed")
    ref = found[0]
    (numel,) = struct.unpack("<q", f.read(8))
    itemsize = torch.empty((), dtype=ref.dtype).element_size()
    raw = f.read(numel * itemsize)
    if len(raw) != numel * itemsize:
        raise CorruptFileError("an embedded storage record is truncated")
    ref.data = torch.frombuffer(bytearray(raw), dtype=ref.dtype) if raw else torch.empty(0, dtype=ref.dtype)
    return ref


# -- turning pickled tensors into references ---------------------------------------------------


def _resolve(obj: Any, locate: Any, byteswap: bool, path: str) -> Any:
    """Replace every :class:`PickledTensor` in the tree by a :class:`TensorRef` (or tensor)."""
    memo: dict[int, Any] = {}

    def walk(x: Any, depth: int) -> Any:
        if depth > 200:
            raise CorruptFileError(f"{path}: the checkpoint nests too deeply")
        if isinstance(x, PickledTensor):
            return _tensor_ref(x, locate, byteswap, path)
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, dict):
            new: Any = type(x)()
            memo[id(x)] = new
            for k, v in x.items():
                new[k] = walk(v, depth + 1)
            if hasattr(x, "__dict__"):
                new.__dict__.update(x.__dict__)
            return new
        if isinstance(x, (list, tuple)):
            items = [walk(v, depth + 1) for v in x]
            return items if isinstance(x, list) else tuple(items)
        if isinstance(x, Inert):
            memo[id(x)] = x
            x.__dict__["_wp_state"] = walk(x._wp_state, depth + 1)
            x.__dict__["_wp_args"] = walk(x._wp_args, depth + 1)
            x.__dict__["_wp_items"] = walk(x._wp_items, depth + 1)
        return x

    return walk(obj, 0)


def _tensor_ref(t: PickledTensor, locate: Any, byteswap: bool, path: str) -> Any:
    ref = t.storage
    what = f"a tensor of shape {t.shape}"
    if ref.data is not None:  # embedded in the pickle: already in memory
        flat = ref.data
        if flat.dtype != t.dtype:
            flat = flat.view(t.dtype)
        try:
            return flat.as_strided(t.shape, t.stride, t.storage_offset + ref.view_offset)
        except RuntimeError as e:
            raise CorruptFileError(f"{path}: {what} does not fit its storage ({e})") from e
    if locate is None:
        raise CorruptFileError(f"{path}: {what} references a storage the file does not hold")
    file, offset, nbytes = locate(ref)
    itemsize = torch.empty((), dtype=t.dtype).element_size()
    out = TensorRef(
        file, offset, nbytes // itemsize, t.dtype, t.shape, t.stride, t.storage_offset + ref.view_offset, byteswap
    )
    out.validate(what)
    return out


def _torch_load(path: str, *, weights_only: bool) -> Parsed:
    """torch's own loader: for tensor kinds we do not map, or an explicit ``trust_pickle``."""
    if not weights_only:
        log.warning("%s: loading with full pickle (trust_pickle=True): code in this file can run", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=_mmap_ok(path))
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"{path}: torch refuses to load this file with weights_only=True ({e}); "
            "if you trust the file, pass trust_pickle=True"
        ) from e
    except Exception as e:
        raise CorruptFileError(f"{path}: torch cannot read this file: {type(e).__name__}: {e}") from e
    return Parsed(obj, "torch-load", [], [])


def _mmap_ok(path: str) -> bool:
    return zipfile.is_zipfile(path)
