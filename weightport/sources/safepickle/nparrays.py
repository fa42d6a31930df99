"""numpy stand-ins: arrays rebuilt from their raw bytes as tensors; numpy is never imported.

Only plain numeric arrays are read; object and structured arrays stay unread records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from weightport.errors import CorruptFileError
from weightport.sources.safepickle.records import dims

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
    sizes = dims(list(shape), "numpy shape")
    itemsize = torch.empty((), dtype=tdtype).element_size()
    numel = 1
    for d in sizes:
        numel *= d
    if numel * itemsize != len(raw):
        raise CorruptFileError(f"a pickled numpy array of shape {sizes} has {len(raw)} bytes of data")
    flat = torch.frombuffer(bytearray(raw), dtype=tdtype) if raw else torch.empty(0, dtype=tdtype)
    if dtype.big_endian and itemsize > 1:
        flat = flat.view(torch.uint8).reshape(-1, itemsize).flip(1).contiguous().view(tdtype).reshape(-1)
    if order == "F":
        return flat.reshape(sizes[::-1]).permute(*reversed(range(len(sizes)))).contiguous(), ""
    return flat.reshape(sizes), ""


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


def numpy_stand_ins() -> dict[str, Callable[..., Any]]:
    """The numpy globals this package answers, by qualified name (both numpy 1 and 2 spellings)."""
    calls: dict[str, Callable[..., Any]] = {"numpy.dtype": _np_dtype}
    for np in ("numpy.core", "numpy._core"):
        calls[f"{np}.multiarray._reconstruct"] = _np_reconstruct
        calls[f"{np}.multiarray.scalar"] = _np_scalar
        calls[f"{np}.numeric._frombuffer"] = _np_frombuffer
    return calls
