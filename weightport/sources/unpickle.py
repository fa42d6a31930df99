"""A restricted unpickler that never imports or calls anything from the file.

``find_class`` is the only door through which a pickle reaches code. Here it
returns one of three things and never imports a module:

* a small table of harmless constructors (``OrderedDict``, ``set``, dtypes …);
* our own stand-ins for torch's tensor rebuild functions, which record *where*
  a tensor's bytes live instead of reading them (so listing a checkpoint reads
  no tensor data);
* for every other global, an :class:`Inert` placeholder class. Calling,
  ``__new__``-ing, ``__setstate__``-ing or item-setting a placeholder only
  stores its arguments. Nothing from the file runs.

Whole pickled ``nn.Module`` graphs (``torch.save(model)``) become placeholder
trees whose recorded ``_parameters`` / ``_buffers`` / ``_modules`` give back the
exact state-dict names (:func:`module_state`).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from weightport.errors import CorruptFileError
from weightport.sources._mapped import TensorRef

__all__ = [
    "Inert",
    "NeedsTorchLoad",
    "PickledTensor",
    "RestrictedUnpickler",
    "StorageRef",
    "inert_name",
    "is_module_like",
    "module_state",
]


class NeedsTorchLoad(Exception):
    """A tensor kind we do not rebuild lazily (quantized, sparse …); torch's own
    ``weights_only=True`` loader is used for the whole file instead."""


class Inert:
    """Stand-in for a pickled global that was not imported. Records, never runs."""

    _wp_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        d = obj.__dict__
        d["_wp_args"] = args
        d["_wp_kwargs"] = kwargs
        d["_wp_state"] = None
        d["_wp_items"] = {}
        d["_wp_list"] = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_wp_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["_wp_items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["_wp_list"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["_wp_list"].extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return _placeholder(f"{self._wp_global}(...)")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert {self._wp_global}>"


_PLACEHOLDERS: dict[str, type[Inert]] = {}


def _placeholder(qualname: str) -> type[Inert]:
    cls = _PLACEHOLDERS.get(qualname)
    if cls is None:
        cls = type("Inert", (Inert,), {"_wp_global": qualname, "__module__": __name__})
        _PLACEHOLDERS[qualname] = cls
    return cls


def inert_name(obj: Any) -> str:
    return type(obj)._wp_global if isinstance(obj, Inert) else type(obj).__name__


# -- lazy tensors ----------------------------------------------------------------------------


@dataclass
class StorageRef:
    """A pickled storage: its key in the file, element type and size.

    ``data`` holds the flat values when the storage was embedded in the pickle itself
    (plain pickles of tensors); otherwise the reader resolves ``key`` to a file offset.
    """

    key: str
    dtype: torch.dtype
    numel: int
    view_offset: int = 0
    data: torch.Tensor | None = None


@dataclass
class PickledTensor:
    """A tensor as the pickle describes it; no data read."""

    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    is_parameter: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise CorruptFileError(f"pickled tensor has a malformed {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> PickledTensor:
    if not isinstance(storage, StorageRef) or type(storage_offset) is not int:
        raise CorruptFileError("pickled tensor does not reference a storage")
    return PickledTensor(storage, storage_offset, _ints(size, "size"), _ints(stride, "stride"), storage.dtype)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    *_: Any,
) -> PickledTensor:
    t = _rebuild_tensor(storage, storage_offset, size, stride)
    if isinstance(dtype, torch.dtype):
        t.dtype = dtype
    return t


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    if isinstance(data, PickledTensor):
        data.is_parameter = True
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func in _REBUILDERS and isinstance(args, tuple):
        return func(*args)
    return _placeholder("torch._tensor._rebuild_from_type_v2")(func, new_type, args, state)


def _needs_torch(*_: Any) -> Any:
    raise NeedsTorchLoad()


def _safe_encode(obj: Any, encoding: str = "latin1") -> bytes:
    if isinstance(obj, str) and encoding in ("latin1", "latin-1"):
        return obj.encode("latin1")
    raise CorruptFileError("pickle asked for an unexpected _codecs.encode call")


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    if isinstance(cls, type) and issubclass(cls, Inert):
        return cls()
    return _placeholder("copyreg._reconstructor")(cls, base, state)


def _load_from_bytes(data: Any) -> Any:
    """A storage pickled inside a plain pickle: itself a small torch file, parsed the same safe way."""
    from weightport.sources.torchfile import read_embedded_storage

    if not isinstance(data, (bytes, bytearray)):
        raise CorruptFileError("pickled storage bytes are malformed")
    return read_embedded_storage(bytes(data))


_REBUILDERS = {_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter}

_DTYPES = {name: obj for name, obj in vars(torch).items() if isinstance(obj, torch.dtype)}


def _storage_types() -> dict[str, _StorageType]:
    out = {"UntypedStorage": _StorageType(torch.uint8), "ByteStorage": _StorageType(torch.uint8)}
    for name, obj in vars(torch).items():
        if name.endswith("Storage") and isinstance(obj, type) and name not in out:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dtype = obj.dtype  # a class property on the legacy typed storages
            except Exception:  # noqa: BLE001 - any failure: not a typed storage class
                continue
            if isinstance(dtype, torch.dtype):
                out[name] = _StorageType(dtype)
    return out


_SAFE: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _safe_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch.nn.parameter", "Parameter"): _placeholder("torch.nn.parameter.Parameter"),
    ("torch", "Tensor"): _placeholder("torch.Tensor"),
}
_SAFE.update({("torch", n): d for n, d in _DTYPES.items()})
_SAFE.update({("torch", n): s for n, s in _storage_types().items()})
for _n in (
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_device_tensor_from_numpy",
    "_rebuild_device_tensor_from_cpu_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_wrapper_subclass",
    "_rebuild_nested_tensor",
    "_rebuild_xla_tensor",
):
    _SAFE[("torch._utils", _n)] = _needs_torch
_SAFE[("torch.serialization", "_get_layout")] = _needs_torch


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles without importing: see the module docstring.

    Attributes:
        unsafe_globals: Every ``module.name`` the pickle referenced that was replaced by
            a placeholder, in order of first use.
    """

    def __init__(self, file: BinaryIO, storage: Any = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storage = storage
        self.unsafe_globals: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        module, name = str(module), str(name)
        # Protocol 0-2 pickles spell Python 3 modules the Python 2 way (``__builtin__.set``).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _SAFE.get((module, name))
        if found is not None:
            return found
        qualname = f"{module}.{name}"
        if qualname not in self.unsafe_globals:
            self.unsafe_globals.append(qualname)
        return _placeholder(qualname)

    def persistent_load(self, pid: Any) -> Any:
        if self._storage is None:
            raise CorruptFileError("the pickle references external storages but none can be resolved")
        return self._storage(pid)


def restricted_loads(data: bytes, storage: Any = None) -> tuple[Any, list[str]]:
    """Unpickle ``data`` safely. Returns the object and the placeholder globals used."""
    unpickler = RestrictedUnpickler(io.BytesIO(data), storage)
    return _checked_load(unpickler), unpickler.unsafe_globals


def _checked_load(unpickler: RestrictedUnpickler) -> Any:
    try:
        return unpickler.load()
    except (NeedsTorchLoad, CorruptFileError):
        raise
    except RecursionError as e:
        raise CorruptFileError(f"the pickle nests too deeply to read ({e})") from e
    except Exception as e:
        raise CorruptFileError(f"the pickle cannot be read: {type(e).__name__}: {e}") from e


# -- whole modules ---------------------------------------------------------------------------


def _state_dict_of(obj: Inert) -> dict[str, Any] | None:
    state = obj._wp_state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]
    return state if isinstance(state, dict) else None


def is_module_like(obj: Any) -> bool:
    """Whether ``obj`` is a placeholder for a pickled ``nn.Module``."""
    if not isinstance(obj, Inert):
        return False
    state = _state_dict_of(obj)
    return state is not None and isinstance(state.get("_modules"), dict) and "_parameters" in state


def module_state(obj: Inert, prefix: str = "") -> dict[str, Any]:
    """The ``state_dict()`` names and tensors recorded in a pickled module graph."""
    state = _state_dict_of(obj) or {}
    out: dict[str, Any] = {}
    params = state.get("_parameters") or {}
    buffers = state.get("_buffers") or {}
    skip = state.get("_non_persistent_buffers_set") or set()
    if isinstance(params, dict):
        for name, t in params.items():
            if isinstance(t, (TensorRef, torch.Tensor)):
                out[prefix + str(name)] = t
    if isinstance(buffers, dict):
        for name, t in buffers.items():
            if isinstance(t, (TensorRef, torch.Tensor)) and name not in skip:
                out[prefix + str(name)] = t
    for name, child in (state.get("_modules") or {}).items():
        if is_module_like(child):
            out.update(module_state(child, f"{prefix}{name}."))
    return out
