"""What the restricted unpickler may build: placeholders, tensor records, and stand-ins.

A stand-in is our own function behind a pickled global name (``torch._utils._rebuild_tensor_v2``,
``collections.OrderedDict``, ``numpy.core.multiarray._reconstruct`` …). It checks its arguments and
returns a record or a plain value; it never imports or calls anything the file names. Stand-ins take
the running machine ``m`` first (for its work budget, key checks and per-load placeholders).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from typing import Any

import torch

from weightport.errors import CorruptFileError

MAX_DIMS = 64  # torch's own limit on tensor dimensions


# -- placeholders and records --------------------------------------------------------------------


class Inert:
    """Stand-in for a pickled global that was not imported: records, never runs.

    Attributes:
        qualname: The ``module.name`` the pickle referenced (class attribute).
        args: Positional arguments it was called with.
        kwargs: Keyword arguments (``NEWOBJ_EX``).
        state: What ``BUILD`` gave it (an object's ``__dict__``, or ``(dict, slots)``).
        setitems: ``(key, value)`` pairs item-assigned to it.
        appended: Values appended to it.
    """

    __slots__ = ("appended", "args", "kwargs", "setitems", "state")
    qualname = "?"

    def __init__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> None:
        self.args = args
        self.kwargs = kwargs or {}
        self.state: Any = None
        self.setitems: list[tuple[Any, Any]] = []
        self.appended: list[Any] = []

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


def inert_name(obj: Any) -> str:
    """The pickled global an object stands for, or its type's name."""
    return obj.qualname if isinstance(obj, Inert) else type(obj).__name__


class StorageRef:
    """A pickled storage: its key in the file, element type and size; ``data`` holds the
    values when the pickle embeds them (plain pickles of tensors)."""

    __slots__ = ("data", "dtype", "key", "numel", "view_offset")

    def __init__(
        self, key: str, dtype: torch.dtype, numel: int, view_offset: int = 0, data: torch.Tensor | None = None
    ) -> None:
        self.key, self.dtype, self.numel, self.view_offset, self.data = key, dtype, numel, view_offset, data


class PickledTensor:
    """A tensor as the pickle describes it; no data read."""

    __slots__ = ("dtype", "is_parameter", "shape", "storage", "storage_offset", "stride")

    def __init__(
        self,
        storage: StorageRef,
        storage_offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        self.storage, self.storage_offset, self.shape, self.stride = storage, storage_offset, shape, stride
        self.dtype = dtype
        self.is_parameter = False


class StorageType:
    """``torch.FloatStorage`` and friends, as values: only their dtype matters."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class StandIn:
    """A callable the pickle may use: ``fn(machine, *args)``. Immutable, never pickled state."""

    __slots__ = ("fn", "name")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name, self.fn = name, fn

    def __call__(self, m: Any, *args: Any, **kwargs: Any) -> Any:
        return self.fn(m, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<stand-in {self.name}>"


# -- torch stand-ins -----------------------------------------------------------------------------


def _ints(value: Any, what: str, *, allow_empty: bool = True) -> tuple[int, ...]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) > MAX_DIMS
        or (not value and not allow_empty)
        or not all(type(v) is int and v >= 0 for v in value)
    ):
        raise CorruptFileError(f"a pickled tensor has a malformed {what}")
    return tuple(value)


def _rebuild_tensor(m: Any, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> PickledTensor:
    if not isinstance(storage, StorageRef) or type(offset) is not int or offset < 0:
        raise CorruptFileError("a pickled tensor does not reference a storage")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise CorruptFileError("a pickled tensor has a size and a stride of different lengths")
    return PickledTensor(storage, offset, shape, strides, storage.dtype)


def _rebuild_tensor_v3(
    m: Any, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *_: Any
) -> PickledTensor:
    t = _rebuild_tensor(m, storage, offset, size, stride)
    if isinstance(dtype, torch.dtype):
        t.dtype = dtype
    return t


def _rebuild_parameter(m: Any, data: Any, *_: Any) -> Any:
    if isinstance(data, PickledTensor):
        data.is_parameter = True
    return data


def _rebuild_from_type_v2(m: Any, func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    """A tensor subclass or a tensor with Python attributes: rebuilt as a plain tensor."""
    if isinstance(func, StandIn) and func.fn in _TENSOR_REBUILDERS and isinstance(args, tuple):
        return func.fn(m, *args)
    return m.placeholder("torch._tensor._rebuild_from_type_v2")((func, new_type, args, state))


def _load_from_bytes(m: Any, data: Any) -> Any:
    """A storage inside a plain pickle: itself a tiny legacy torch file, read the same safe way."""
    from weightport.sources.torchfile import read_embedded_storage

    if not isinstance(data, (bytes, bytearray)) or m.embedded:
        raise CorruptFileError("a pickled storage record is malformed")
    return read_embedded_storage(bytes(data), m.budget)


def _size(m: Any, value: Any = ()) -> torch.Size:
    return torch.Size(_ints(value, "torch.Size"))


def _device(m: Any, kind: Any, index: Any = None) -> torch.device:
    if not isinstance(kind, str) or len(kind) > 64 or not (index is None or type(index) is int):
        raise CorruptFileError("a pickled torch.device is malformed")
    return torch.device(kind) if index is None else torch.device(kind, index)


_TENSOR_REBUILDERS = {_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter}


# -- builtin stand-ins ---------------------------------------------------------------------------


def _ordered_dict(m: Any, items: Any = ()) -> collections.OrderedDict:
    pairs = list(items.items()) if isinstance(items, dict) else items
    if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise CorruptFileError("a pickled OrderedDict is malformed")
    out: collections.OrderedDict = collections.OrderedDict()
    for k, v in pairs:
        m.check_key(k)
        out[k] = v
    return out


def _set(kind: type) -> Callable[..., Any]:
    def make(m: Any, items: Any = ()) -> Any:
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise CorruptFileError(f"a pickled {kind.__name__} is malformed")
        for item in items:
            m.check_key(item)
        return kind(items)

    return make


def _number(x: Any) -> bool:
    return type(x) in (int, float)


def _complex(m: Any, real: Any = 0, imag: Any = 0) -> complex:
    if not (_number(real) and _number(imag)):
        raise CorruptFileError("a pickled complex number is malformed")
    return complex(real, imag)


def _slice(m: Any, *args: Any) -> slice:
    if len(args) > 3 or not all(a is None or type(a) is int for a in args):
        raise CorruptFileError("a pickled slice is malformed")
    return slice(*args)


def _latin1(value: Any, encoding: Any) -> bytes:
    if isinstance(value, bytes) and encoding is None:
        return value
    if isinstance(value, str) and encoding in ("latin1", "latin-1"):
        return value.encode("latin1")
    raise CorruptFileError("the pickle asked for an unexpected string encoding")


def _encode(m: Any, value: Any, encoding: Any = "latin1") -> bytes:
    return _latin1(value, encoding)


def _bytearray(m: Any, value: Any = b"", encoding: Any = None) -> bytearray:
    return bytearray(_latin1(value, encoding))


def _bytes(m: Any, value: Any = b"", encoding: Any = None) -> bytes:
    """``bytes()`` as protocols 0-2 write an empty bytes object (others go through ``_codecs.encode``)."""
    return bytes(_latin1(value, encoding))


def _reconstructor(m: Any, cls: Any, base: Any, state: Any = None) -> Inert:
    """Protocol 0/1 object creation: an instance of the placeholder, filled later by BUILD."""
    if isinstance(cls, type) and issubclass(cls, Inert):
        return cls()
    raise CorruptFileError("copyreg._reconstructor is applied to something that is not a class")


# -- numpy stand-ins (arrays rebuilt from their raw bytes; numpy is never imported) --------------

_NP_DTYPES = {
    "b1": "bool",
    "i1": "int8",
    "u1": "uint8",
    "i2": "int16",
    "u2": "uint16",
    "i4": "int32",
    "u4": "uint32",
    "i8": "int64",
    "u8": "uint64",
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
    "c8": "complex64",
    "c16": "complex128",
}


class NpDtype:
    """A pickled ``numpy.dtype``: its code and byte order (set by BUILD)."""

    __slots__ = ("big_endian", "code", "structured")

    def __init__(self, code: str) -> None:
        self.code, self.big_endian, self.structured = code, code.startswith(">"), False

    def build(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5:
            raise CorruptFileError("a pickled numpy dtype is malformed")
        self.big_endian = state[1] == ">"
        self.structured = state[3] is not None or state[4] is not None

    def torch_dtype(self) -> torch.dtype | None:
        name = _NP_DTYPES.get(self.code.lstrip("<>|="))
        dtype = getattr(torch, name, None) if name and not self.structured else None
        return dtype if isinstance(dtype, torch.dtype) else None


class NumpyArray:
    """A pickled ``numpy.ndarray``; ``tensor`` is set once BUILD gave it a supported dtype and data.

    Attributes:
        tensor: The values as a tensor, or ``None`` (object or structured arrays are not read).
        why: Why there is no tensor.
    """

    __slots__ = ("tensor", "why")

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.why = "never filled"

    def build(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise CorruptFileError("a pickled numpy array is malformed")
        shape, dtype, fortran, raw = state[-4:]
        self.tensor, self.why = _np_tensor(raw, dtype, shape, "F" if fortran else "C")


def _np_tensor(raw: Any, dtype: Any, shape: Any, order: Any) -> tuple[torch.Tensor | None, str]:
    if not isinstance(dtype, NpDtype):
        raise CorruptFileError("a pickled numpy array has a malformed dtype")
    tdtype = dtype.torch_dtype()
    if tdtype is None:
        return None, f"numpy dtype {dtype.code!r} is not read (only plain numeric arrays are)"
    if isinstance(raw, str):  # a Python 2 byte string that happened to be valid UTF-8
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, (bytes, bytearray)):
        return None, "object arrays are not read"
    dims = _ints(list(shape), "numpy shape")
    itemsize = torch.empty((), dtype=tdtype).element_size()
    numel = 1
    for d in dims:
        numel *= d
    if numel * itemsize != len(raw):
        raise CorruptFileError(f"a pickled numpy array of shape {dims} has {len(raw)} bytes of data")
    flat = torch.frombuffer(bytearray(raw), dtype=tdtype) if raw else torch.empty(0, dtype=tdtype)
    if dtype.big_endian and itemsize > 1:
        flat = flat.view(torch.uint8).reshape(-1, itemsize).flip(1).contiguous().view(tdtype).reshape(-1)
    if order == "F":
        return flat.reshape(dims[::-1]).permute(*reversed(range(len(dims)))).contiguous(), ""
    return flat.reshape(dims), ""


def _np_reconstruct(m: Any, subtype: Any, shape: Any, typecode: Any) -> NumpyArray:
    return NumpyArray()


def _np_dtype(m: Any, code: Any, align: Any = False, copy: Any = True) -> NpDtype:
    if not isinstance(code, str) or len(code) > 16:
        raise CorruptFileError("a pickled numpy dtype is malformed")
    return NpDtype(code)


def _np_frombuffer(m: Any, buf: Any, dtype: Any, shape: Any, order: Any) -> Any:
    arr = NumpyArray()
    arr.tensor, arr.why = _np_tensor(buf, dtype, shape, order)
    return arr


def _np_scalar(m: Any, dtype: Any, data: Any = None) -> Any:
    arr = NumpyArray()
    arr.tensor, arr.why = _np_tensor(data, dtype, (), "C")
    return arr


# -- the table -----------------------------------------------------------------------------------


def _storage_types() -> dict[str, StorageType]:
    out = {"UntypedStorage": StorageType(torch.uint8), "ByteStorage": StorageType(torch.uint8)}
    for name, obj in vars(torch).items():
        if name.endswith("Storage") and isinstance(obj, type) and name not in out:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dtype = getattr(obj, "dtype")  # noqa: B009 - a class property on the legacy typed storages
            except Exception:  # noqa: BLE001 - any failure: not a typed storage class
                continue
            if isinstance(dtype, torch.dtype):
                out[name] = StorageType(dtype)
    return out


def _stand_ins() -> dict[tuple[str, str], Any]:
    calls: dict[str, Callable[..., Any]] = {
        "collections.OrderedDict": _ordered_dict,
        "builtins.set": _set(set),
        "builtins.frozenset": _set(frozenset),
        "builtins.complex": _complex,
        "builtins.slice": _slice,
        "builtins.bytearray": _bytearray,
        "builtins.bytes": _bytes,
        "_codecs.encode": _encode,
        "copyreg._reconstructor": _reconstructor,
        "torch.Size": _size,
        "torch.device": _device,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.storage._load_from_bytes": _load_from_bytes,
    }
    for np in ("numpy.core", "numpy._core"):
        calls[f"{np}.multiarray._reconstruct"] = _np_reconstruct
        calls[f"{np}.multiarray.scalar"] = _np_scalar
        calls[f"{np}.numeric._frombuffer"] = _np_frombuffer
    calls["numpy.dtype"] = _np_dtype
    table: dict[tuple[str, str], Any] = {}
    for qualname, fn in calls.items():
        module, _, name = qualname.rpartition(".")
        table[(module, name)] = StandIn(qualname, fn)
    table.update({("torch", n): d for n, d in vars(torch).items() if isinstance(d, torch.dtype)})
    table.update({("torch", n): s for n, s in _storage_types().items()})
    table[("torch.storage", "UntypedStorage")] = table[("torch", "UntypedStorage")]
    return table


SAFE = _stand_ins()
# Tensor kinds read by torch's own weights_only loader instead (NeedsTorchLoad).
TORCH_ONLY = {
    ("torch._utils", n)
    for n in (
        "_rebuild_qtensor",
        "_rebuild_sparse_tensor",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_device_tensor_from_cpu_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_wrapper_subclass",
        "_rebuild_nested_tensor",
        "_rebuild_xla_tensor",
    )
} | {
    ("torch.serialization", "_get_layout"),
    ("torch", "per_tensor_affine"),
    ("torch", "per_channel_affine"),
    ("torch", "sparse_coo"),
    ("torch", "sparse_csr"),
}
