"""What the restricted machine builds besides plain values: placeholders, tensor records, stand-in callables.

None of these classes has behaviour a pickle can reach: they hold what the stream gave them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from weightport.errors import CorruptFileError

MAX_DIMS = 64  # torch's own limit on tensor dimensions
MAX_DIM = (1 << 63) - 1  # the largest size or stride torch can hold (an int64)


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


def dims(value: Any, what: str, *, allow_empty: bool = True) -> tuple[int, ...]:
    """``value`` as a tensor's sizes or strides: at most :data:`MAX_DIMS` ints in ``0..MAX_DIM``."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) > MAX_DIMS
        or (not value and not allow_empty)
        or not all(type(v) is int and v >= 0 for v in value)
    ):
        raise CorruptFileError(f"a pickled tensor has a malformed {what}")
    if any(v > MAX_DIM for v in value):
        raise CorruptFileError(f"a pickled tensor has a {what} entry of over 2**63, which no tensor can have")
    return tuple(value)
