"""Named tuples made in bulk from columns, in C.

Planning a 100k-key model makes several named tuples per key (candidates, targets, tensor
references). ``Cls._make`` is a Python-level classmethod; ``tuple.__new__(Cls, fields)`` builds
the same object without a Python frame, and ``map`` over it keeps the whole loop in C. This is
the one place that uses the trick; :func:`rows` is equal to ``[Cls(*r) for r in zip(*columns)]``
(tested), and only takes named tuples without defaults to fill (every field given).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import repeat
from typing import Any, TypeVar

T = TypeVar("T", bound=tuple)  # type: ignore[type-arg]

__all__ = ["rows"]


def rows(cls: type[T], *columns: Iterable[Any]) -> Iterator[T]:
    """``cls(*fields)`` for each row of ``columns`` (one column per field, in field order), lazily."""
    if len(columns) != len(cls._fields):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} has {len(cls._fields)} fields, got {len(columns)} columns")  # type: ignore[attr-defined]
    return map(tuple.__new__, repeat(cls), zip(*columns))  # type: ignore[arg-type]
