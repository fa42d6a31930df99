"""The fixed table of globals a pickle may name, and the stand-ins behind them.

A stand-in is our own function behind a pickled global name (``torch._utils._rebuild_tensor_v2``,
``collections.OrderedDict``, ``numpy.core.multiarray._reconstruct`` …). It checks its arguments and
returns a record or a plain value; it never imports or calls anything the file names. Stand-ins take
the running machine ``m`` first (for its work budget, key checks, per-load placeholders and the
reader of embedded storages it was given).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from typing import Any

import torch

from weightport.errors import CorruptFileError
from weightport.sources.safepickle.nparrays import numpy_stand_ins
from weightport.sources.safepickle.records import MAX_DIM, Inert, PickledTensor, StandIn, StorageRef, StorageType, dims

# -- torch stand-ins -----------------------------------------------------------------------------


def _rebuild_tensor(m: Any, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> PickledTensor:
    if not isinstance(storage, StorageRef) or type(offset) is not int or not 0 <= offset <= MAX_DIM:
        raise CorruptFileError("a pickled tensor does not reference a storage")
    shape, strides = dims(size, "size"), dims(stride, "stride")
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
    """A storage inside a plain pickle: itself a tiny legacy torch file, read by the machine's embedded reader."""
    if not isinstance(data, (bytes, bytearray)):
        raise CorruptFileError("a pickled storage record is malformed")
    return m.embedded_storage(bytes(data))


def _size(m: Any, value: Any = ()) -> torch.Size:
    return torch.Size(dims(value, "torch.Size"))


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
        **numpy_stand_ins(),
    }
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
