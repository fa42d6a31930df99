"""Reading torch files (``torch.save``): zip and legacy formats, and plain pickles.

The pickle inside is run by :class:`~weightport.sources.safepickle.RestrictedUnpickler`,
which imports and calls nothing from the file and records where each tensor's
bytes are instead of reading them; a storage a plain pickle embeds as bytes is read
here (:func:`read_embedded_storage`, handed to the machine). Tensor data is then mapped from the file
lazily. Tensor kinds that cannot be mapped (quantized, sparse) fall back to
``torch.load(weights_only=True)``; only an explicit ``trust_pickle=True`` ever
runs the full pickle machinery.

The zip container is checked as an attacker would build it: one ``data.pkl``,
no duplicate or encrypted entries, storage records stored uncompressed, local
headers that agree with the central directory, and records whose data do not
overlap or leave the file.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import torch

from weightport.errors import CorruptFileError, UnsafeFileError, UnsupportedFormatError
from weightport.sources._dtypes import check_viewable
from weightport.sources._mapped import MappedFile, TensorRef, first_overlap
from weightport.sources.safepickle import (
    Budget,
    Inert,
    NeedsTorchLoad,
    NumpyArray,
    PickledTensor,
    RestrictedUnpickler,
    StorageRef,
    StorageType,
)
from weightport.sources.safepickle.records import MAX_DIM

log = logging.getLogger(__name__)

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_PICKLE_BYTES = 1 << 30  # a data.pkl larger than this is not a checkpoint
MAX_TENSOR_BYTES = 1 << 42  # a tensor claiming more is a damaged or hostile file
MAX_NESTING = 200
MAX_RATIO = 100  # a compressed data.pkl (re-zipped file) may inflate this much, beyond its first MiB
BUDGET_RATIO = 16  # ... but its work and memory budgets count at most this many bytes per compressed byte
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_MAGIC = 0x04034B50
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")

Locate = Callable[[StorageRef], tuple[MappedFile, int, int]]


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
    """Parse a torch or pickle file into an object tree whose tensors are not yet read.

    Raises:
        CorruptFileError: The file is empty, truncated, damaged or hostile.
        UnsafeFileError: Only torch's full pickle could read it (and ``trust_pickle`` is off).
    """
    if os.path.getsize(path) == 0:
        raise CorruptFileError(f"{path}: the file is empty (0 bytes); the download or save did not complete")
    if trust_pickle:
        return _torch_load(path, weights_only=False)
    container = _container(path)
    try:
        if container == "zip":
            return _parse_zip(path)
        if container == "tar":
            return _torch_load(path, weights_only=True)
        return _parse_pickle_file(path)
    except NeedsTorchLoad as e:
        log.info("%s: %s needs torch's own loader; reading with torch.load(weights_only=True)", path, e)
        return _torch_load(path, weights_only=True, reason=f"it holds {e}")


def _container(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(ZIP_MAGICS):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    return "pickle"


def torch_unsafe_globals(path: str) -> list[str]:
    """torch's ``get_unsafe_globals_in_checkpoint`` for a zip file; ``[]`` where it does not apply."""
    if _container(path) != "zip":
        return []
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a static scan that may not understand the file; ours stands
        return []


# -- zip ---------------------------------------------------------------------------------------


def _parse_zip(path: str) -> Parsed:
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            return _read_zip(path, zf, raw)
    except (CorruptFileError, UnsupportedFormatError, NeedsTorchLoad):
        raise
    except zipfile.BadZipFile as e:
        if "not a zip file" in str(e):  # no end-of-central-directory record: the end of the file is gone
            raise CorruptFileError(
                f"{path}: the zip archive has no central directory (its end is missing): the file is truncated "
                "or damaged; download or save it again"
            ) from e
        raise CorruptFileError(f"{path}: damaged zip archive ({e})") from e
    except Exception as e:
        raise CorruptFileError(f"{path}: damaged zip archive ({type(e).__name__}: {e})") from e


def _read_zip(path: str, zf: zipfile.ZipFile, raw: Any) -> Parsed:
    infos = {i.filename: i for i in zf.infolist()}
    if len(infos) != len(zf.infolist()):
        raise CorruptFileError(f"{path}: the zip archive lists an entry twice; the file is damaged or forged")
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in infos):
        raise UnsupportedFormatError(
            f"{path}: a TorchScript archive (torch.jit.save), not a torch.save file; its module attributes do not "
            "give state-dict names reliably. Load it with torch.jit.load(path) (it runs TorchScript code: only "
            "for files you trust) and pass the module or its state_dict()"
        )
    pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CorruptFileError(f"{path}: {_no_data_pkl(infos) if not pkl else 'several data.pkl records'}")
    prefix = pkl[0][: -len("data.pkl")]
    spans = {pkl[0]: _record_span(path, raw, infos[pkl[0]], stored=False)}
    data = _read_small(path, zf, infos[pkl[0]], MAX_PICKLE_BYTES)
    byteorder = "little"
    if prefix + "byteorder" in infos:
        byteorder = _read_small(path, zf, infos[prefix + "byteorder"], 16).decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise CorruptFileError(f"{path}: unknown byte order {byteorder!r} in the archive")
    file = MappedFile(path)
    located: dict[str, tuple[MappedFile, int, int]] = {}

    def storage(pid: Any) -> StorageRef:
        ref = _storage_ref(pid, path, zip_format=True)
        if ref.key not in located:
            name = f"{prefix}data/{ref.key}"
            info = infos.get(name)
            if info is None:
                raise CorruptFileError(f"{path}: storage record {name} is missing from the archive")
            offset, nbytes = spans[name] = _record_span(path, raw, info, stored=True)
            located[ref.key] = (file, offset, nbytes)
        return ref

    budget = Budget(_justified_size(infos[pkl[0]]))
    machine = RestrictedUnpickler(data, storage, budget=budget, embedded_storage=read_embedded_storage)
    obj = _where(path, machine.load)
    _check_overlaps(path, spans)
    obj = _Resolver(lambda ref: located[ref.key], byteorder != "little", path).walk(obj)
    return Parsed(obj, "torch-zip", [file], machine.unsafe_globals)


def _justified_size(info: zipfile.ZipInfo) -> int:
    """The stream size a ``data.pkl`` record's budgets are based on: a compressed record (torch never
    compresses; a re-zipped file) is credited at most :data:`BUDGET_RATIO` times its compressed bytes, so
    deflate cannot multiply the work and memory a few bytes on disk may ask for."""
    if info.compress_type == zipfile.ZIP_STORED:
        return info.file_size
    return min(info.file_size, max(1 << 20, BUDGET_RATIO * info.compress_size))


def _no_data_pkl(infos: dict[str, zipfile.ZipInfo]) -> str:
    return "a zip archive without a data.pkl record is not a torch.save file"


def _read_small(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise CorruptFileError(f"{path}: record {info.filename} claims {info.file_size} bytes (limit {limit})")
    if info.flag_bits & 0x1:
        raise CorruptFileError(f"{path}: record {info.filename} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(1 << 20, MAX_RATIO * info.compress_size):
        raise CorruptFileError(
            f"{path}: record {info.filename} would inflate {info.compress_size} bytes to {info.file_size} "
            "(a zip bomb?); torch never compresses its records"
        )
    data = zf.read(info)  # zipfile stops at the declared size and checks the CRC
    if len(data) != info.file_size:
        raise CorruptFileError(f"{path}: record {info.filename} is truncated")
    return data


def _record_span(path: str, raw: Any, info: zipfile.ZipInfo, *, stored: bool) -> tuple[int, int]:
    """``(offset, nbytes)`` of a record's data in the file, checked against its local header."""
    if info.flag_bits & 0x1:
        raise CorruptFileError(f"{path}: record {info.filename} is encrypted")
    if stored and (info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size):
        raise CorruptFileError(
            f"{path}: storage record {info.filename} is compressed; torch never writes that (was the file "
            "re-zipped?); re-save it with torch.save"
        )
    size = os.fstat(raw.fileno()).st_size
    if info.header_offset < 0 or info.header_offset + _LOCAL_HEADER.size > size:
        raise CorruptFileError(f"{path}: zip record {info.filename} starts past the end of the file")
    raw.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
    name = raw.read(fields[9])
    if fields[0] != _LOCAL_MAGIC or name.decode("utf-8", "replace") != info.filename:
        raise CorruptFileError(f"{path}: zip record {info.filename} has a damaged local header")
    offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    if offset + info.compress_size > size:
        raise CorruptFileError(
            f"{path}: zip record {info.filename} spans bytes {offset}..{offset + info.compress_size} but the "
            f"file has {size} bytes; the file is truncated, download or save it again"
        )
    return offset, info.compress_size


def _check_overlaps(path: str, spans: dict[str, tuple[int, int]]) -> None:
    pair = first_overlap([(off, off + n, name) for name, (off, n) in spans.items()])
    if pair is not None:
        (_, _, a), (_, _, b) = pair
        raise CorruptFileError(f"{path}: zip records {a} and {b} overlap; the file is damaged or forged")


def _storage_ref(pid: Any, path: str, *, zip_format: bool) -> StorageRef:
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
        raise CorruptFileError(f"{path}: the pickle references an unknown kind of external object")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, StorageType) or type(numel) is not int or not 0 <= numel <= MAX_DIM:
        raise CorruptFileError(f"{path}: a storage record has an unknown type or size")
    if type(key) not in (str, int) or len(str(key)) > 64:
        raise CorruptFileError(f"{path}: a storage record has a malformed key")
    view_offset = 0
    if not zip_format and len(pid) > 5 and pid[5] is not None:
        view = pid[5]
        if not isinstance(view, tuple) or len(view) != 3 or type(view[1]) is not int or not 0 <= view[1] <= MAX_DIM:
            raise CorruptFileError(f"{path}: a storage view is malformed")
        view_offset = view[1]
    return StorageRef(str(key), storage_type.dtype, numel, view_offset)


def _where(path: str, load: Callable[[], Any]) -> Any:
    """Run ``load``, naming ``path`` in any error it raises."""
    try:
        return load()
    except CorruptFileError as e:
        if str(e).startswith(path):
            raise
        raise CorruptFileError(f"{path}: {e}") from e


# -- legacy (pre-1.6) and plain pickles --------------------------------------------------------


def _parse_pickle_file(path: str) -> Parsed:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        machine = RestrictedUnpickler(buf, embedded_storage=read_embedded_storage)
        first = _where(path, machine.load)
        if type(first) is int and first == MAGIC_NUMBER:
            legacy = _where(path, lambda: _legacy_sections(buf, machine.pos, path))
            file = MappedFile(path)
            table = {k: (file, off, n) for k, (off, n) in legacy.storages.items()}
            obj = _Resolver(_locator(table, path), not legacy.little_endian, path).walk(legacy.obj)
            return Parsed(obj, "torch-legacy", [file], legacy.unsafe_globals)
    obj = _Resolver(None, False, path).walk(first)
    return Parsed(obj, "pickle", [], machine.unsafe_globals)


class _Legacy:
    def __init__(self) -> None:
        self.obj: Any = None
        self.little_endian = True
        self.storages: dict[str, tuple[int, int]] = {}
        self.unsafe_globals: list[str] = []


def _legacy_sections(buf: Any, pos: int, where: str, budget: Budget | None = None) -> _Legacy:
    """The sections after the magic number: protocol, system info, the object, storage keys, data.

    ``budget`` is given for an embedded storage (shared with the enclosing load), which may not embed another.
    """
    out = _Legacy()
    nested = read_embedded_storage if budget is None else None
    refs: dict[str, StorageRef] = {}

    def storage(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] in ("module", b"module"):
            return pid[1]  # the source code of a pickled module class, kept as data
        ref = _storage_ref(pid, where, zip_format=False)
        refs.setdefault(ref.key, ref)
        return ref

    sections: list[Any] = []
    for hook in (None, None, storage, None):
        machine = RestrictedUnpickler(buf, hook, start=pos, budget=budget, embedded_storage=nested)
        sections.append(machine.load())
        out.unsafe_globals += [g for g in machine.unsafe_globals if g not in out.unsafe_globals]
        pos = machine.pos
    protocol, sys_info, out.obj, keys = sections
    if protocol != LEGACY_PROTOCOL:
        raise CorruptFileError(f"unknown legacy torch protocol {protocol!r}")
    out.little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True) is not False
    if not isinstance(keys, list) or not all(type(k) in (str, int) for k in keys):
        raise CorruptFileError("the legacy storage table is malformed")
    fmt = struct.Struct("<q" if out.little_endian else ">q")
    for key in map(str, keys):
        ref = refs.get(key)
        if ref is None:
            raise CorruptFileError(f"storage {key!r} is listed but no tensor uses it")
        if pos + fmt.size > len(buf):
            raise CorruptFileError(f"storage {key!r} starts past the end of the data")
        (numel,) = fmt.unpack_from(buf, pos)
        nbytes = numel * ref.dtype.itemsize
        if numel != ref.numel or pos + fmt.size + nbytes > len(buf):
            raise CorruptFileError(
                f"storage {key!r} holds {numel} elements where {ref.numel} were pickled, in {len(buf) - pos} "
                "bytes left; the file is truncated or damaged"
            )
        out.storages[key] = (pos + fmt.size, nbytes)
        pos += fmt.size + nbytes
    return out


def read_embedded_storage(data: bytes, budget: Budget) -> StorageRef:
    """A storage that a plain pickle embeds as a tiny legacy torch file (``_load_from_bytes``), read
    under the enclosing load's budget; the machines that read it get no reader of their own."""
    machine = RestrictedUnpickler(data, budget=budget)
    if machine.load() != MAGIC_NUMBER:
        raise CorruptFileError("an embedded storage is not a torch legacy record")
    legacy = _legacy_sections(data, machine.pos, "an embedded storage", budget)
    if not isinstance(legacy.obj, StorageRef) or len(legacy.storages) != 1:
        raise CorruptFileError("an embedded storage record is malformed")
    ref = legacy.obj
    offset, nbytes = legacy.storages[ref.key]
    check_viewable(ref.dtype, "an embedded storage", f"storage {ref.key!r}")
    raw = bytearray(data[offset : offset + nbytes])
    flat = torch.frombuffer(raw, dtype=ref.dtype) if raw else torch.empty(0, dtype=ref.dtype)
    ref.data = flat if legacy.little_endian else _byteswapped(flat)
    return ref


def _byteswapped(flat: torch.Tensor) -> torch.Tensor:
    size = flat.element_size()
    return flat.view(torch.uint8).reshape(-1, size).flip(1).contiguous().view(flat.dtype).reshape(-1)


def _locator(table: dict[str, tuple[MappedFile, int, int]], path: str) -> Locate:
    def locate(ref: StorageRef) -> tuple[MappedFile, int, int]:
        found = table.get(ref.key)
        if found is None:
            raise CorruptFileError(f"{path}: a tensor uses storage {ref.key!r}, which the file does not hold")
        return found

    return locate


# -- turning pickled tensors into references ---------------------------------------------------


class _Resolver:
    """Replaces every :class:`PickledTensor` in a tree by a :class:`TensorRef` (or an in-memory
    tensor), every readable numpy array by a tensor. Shared objects are visited once."""

    def __init__(self, locate: Locate | None, byteswap: bool, path: str) -> None:
        self.locate, self.byteswap, self.path = locate, byteswap, path
        self.memo: dict[int, Any] = {}

    def walk(self, x: Any, depth: int = 0, key: Any = None) -> Any:
        """``x`` resolved; ``key`` is the dict key ``x`` was found under, to name a refused tensor."""
        if depth > MAX_NESTING:
            raise CorruptFileError(f"{self.path}: the checkpoint nests more than {MAX_NESTING} levels deep")
        if id(x) in self.memo:
            return self.memo[id(x)]
        out: Any
        if isinstance(x, PickledTensor):
            out = self.memo[id(x)] = self._tensor(x, key)
        elif isinstance(x, NumpyArray):
            out = x.tensor if x.tensor is not None else x
        elif type(x) in (dict, collections.OrderedDict):
            out = self.memo[id(x)] = type(x)()
            out.update((k, self.walk(v, depth + 1, k)) for k, v in x.items())
            if type(x) is collections.OrderedDict:
                out.__dict__.update(x.__dict__)
        elif type(x) is list:
            out = self.memo[id(x)] = []
            out.extend(self.walk(v, depth + 1) for v in x)
        elif type(x) is tuple:
            out = self.memo[id(x)] = tuple(self.walk(v, depth + 1) for v in x)
        elif isinstance(x, Inert):
            out = self.memo[id(x)] = x
            x.args = self.walk(x.args, depth + 1)
            x.kwargs = self.walk(x.kwargs, depth + 1)
            x.state = self.walk(x.state, depth + 1)
            x.setitems = self.walk(x.setitems, depth + 1)
            x.appended = self.walk(x.appended, depth + 1)
        else:
            out = x
        return out

    def _tensor(self, t: PickledTensor, key: Any) -> Any:
        ref = t.storage
        what = f"tensor {key!r} (shape {t.shape})" if isinstance(key, str) else f"a tensor of shape {t.shape}"
        check_viewable(t.dtype, self.path, what)
        check_viewable(ref.dtype, self.path, f"the storage of {what}")
        itemsize = t.dtype.itemsize
        numel = 1
        for d in t.shape:
            numel *= d
        if numel * itemsize > MAX_TENSOR_BYTES:
            raise CorruptFileError(f"{self.path}: {what} claims {numel * itemsize} bytes")
        if ref.data is not None:
            return _embedded_tensor(t, ref.data, self.path, what)
        if self.locate is None:
            raise CorruptFileError(f"{self.path}: {what} references a storage the file does not hold")
        file, offset, nbytes = self.locate(ref)
        out = TensorRef(
            file,
            offset,
            nbytes // itemsize,
            t.dtype,
            t.shape,
            t.stride,
            t.storage_offset + ref.view_offset,
            self.byteswap,
        )
        out.validate(what)
        return out


def _embedded_tensor(t: PickledTensor, data: torch.Tensor, path: str, what: str) -> torch.Tensor:
    try:
        flat = data if data.dtype == t.dtype else data.view(torch.uint8).view(t.dtype)
        start = t.storage_offset + t.storage.view_offset
        if t.shape and min(t.shape) > 0:
            last = start + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
            if last >= flat.numel():
                raise CorruptFileError(f"{path}: {what} reads past the end of its storage")
        return flat.as_strided(t.shape, t.stride, start)
    except RuntimeError as e:
        raise CorruptFileError(f"{path}: {what} does not fit its storage ({e})") from e


def _torch_load(path: str, *, weights_only: bool, reason: str = "") -> Parsed:
    """torch's own loader: for tensor kinds we do not map, or an explicit ``trust_pickle``."""
    if not weights_only:
        log.warning("%s: loading with full pickle (trust_pickle=True): code in this file can run", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=_container(path) == "zip")
    except pickle.UnpicklingError as e:
        found = torch_unsafe_globals(path)
        listed = f" It references: {', '.join(found[:20])}." if found else ""
        raise UnsafeFileError(
            f"{path}: {reason + ', so ' if reason else ''}only torch's own loader can read it, and "
            f"torch.load(weights_only=True) refuses it: {str(e).splitlines()[0]}.{listed} If you trust the "
            "file, pass trust_pickle=True; better, load it once where you trust it and re-save its "
            "state_dict() with weightport.save()"
        ) from e
    except Exception as e:
        raise CorruptFileError(f"{path}: torch cannot read this file: {type(e).__name__}: {e}") from e
    return Parsed(obj, "torch-load", [], [])
