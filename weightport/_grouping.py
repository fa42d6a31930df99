"""Grouping tensor names that differ only in integer segments: ``blocks.{0..11}.attn.qkv.weight``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["group_names"]


_MAX_DIGITS = 18  # longer digit runs stay text: int() of thousands of digits is slow, and refused


class _Range(tuple):  # type: ignore[type-arg]
    """Sorted integer values standing in one segment position."""


def group_names(names: Iterable[str]) -> list[str]:
    """Compress names that differ only in integer segments, exactly (no name is implied
    that was not given).

    Example:
        >>> group_names([f"blocks.{i}.attn.qkv.weight" for i in range(12)])
        ['blocks.{0..11}.attn.qkv.weight']
    """
    items: list[tuple[Any, ...]] = [tuple(_segment(s) for s in n.split(".")) for n in names]
    width = max((len(it) for it in items), default=0)
    for p in range(width - 1, -1, -1):
        groups: dict[tuple[Any, ...], list[int] | None] = {}
        for it in items:
            if p < len(it) and type(it[p]) is int:
                key = it[:p] + (None,) + it[p + 1 :]
                values = groups.setdefault(key, [])
                assert values is not None
                values.append(it[p])
            else:
                groups.setdefault(it, None)
        items = [
            key if values is None else key[:p] + (_Range(sorted(set(values))),) + key[p + 1 :]
            for key, values in groups.items()
        ]
    return [".".join(_render(s) for s in it) for it in items]


def _segment(seg: str) -> Any:
    """An integer segment as its value (ASCII digits only: ``"²"`` is a digit to ``str.isdigit``
    but not to ``int``); anything else, ``007`` included, as text."""
    if seg.isascii() and seg.isdigit() and (seg == "0" or not seg.startswith("0")) and len(seg) <= _MAX_DIGITS:
        return int(seg)
    return seg


def _render(seg: Any) -> str:
    if not isinstance(seg, _Range):
        return str(seg)
    values = list(seg)
    if len(values) == 1:
        return str(values[0])
    if values[-1] - values[0] + 1 == len(values):  # sorted and distinct: a run with no gap
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(str(v) for v in values) + "}"
