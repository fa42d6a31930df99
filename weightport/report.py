"""What a transfer did to every tensor: :class:`Entry`, :class:`TransferReport` and renderers."""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, overload

from weightport.sources.base import SourceInfo

__all__ = ["Entry", "EntryTable", "TransferReport", "group_names"]

STATUSES = ("loaded", "adapted", "fresh")


@dataclass(frozen=True)
class Entry:
    """What happened to one target tensor.

    Attributes:
        target: Target key (relative to ``into`` when given).
        status: ``"loaded"`` (copied as is, maybe renamed), ``"adapted"`` (changed by an op
            or adapter) or ``"fresh"`` (nothing loaded; keeps the target's initialisation).
        sources: Source key(s) it came from; ``()`` when fresh.
        rule: The rule that produced the name, as written; ``None`` for an identical name.
        ops: Ops and adapters applied, e.g. ``("split[1/3]",)`` or ``("in_channels 3->1",)``.
        source_shape: Shape of the source tensor (after fusing several), ``None`` when fresh
            with no source.
        target_shape: Shape of the target tensor.
        reason: For fresh entries: ``"missing"``, ``"shape mismatch"`` or ``"dropped"``.
        tied_to: For a tensor shared with another target key (tied weights): that key.
        numel: Number of elements.
        is_parameter: A parameter (counts toward coverage) rather than a buffer.
    """

    target: str
    status: str
    sources: tuple[str, ...] = ()
    rule: str | None = None
    ops: tuple[str, ...] = ()
    source_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] = ()
    reason: str | None = None
    tied_to: str | None = None
    numel: int = 0
    is_parameter: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "status": self.status,
            "sources": list(self.sources),
            "rule": self.rule,
            "ops": list(self.ops),
            "source_shape": list(self.source_shape) if self.source_shape is not None else None,
            "target_shape": list(self.target_shape),
            "reason": self.reason,
            "tied_to": self.tied_to,
        }


FIELDS = tuple(f.name for f in fields(Entry))
_STATUS, _REASON, _TIED, _NUMEL, _PARAM = (
    FIELDS.index(f) for f in ("status", "reason", "tied_to", "numel", "is_parameter")
)


class EntryTable(Sequence[Entry]):
    """A report's entries, kept as rows of field values (one tuple per target tensor, in
    :class:`Entry` field order); each :class:`Entry` is made when it is asked for.

    A 100k-tensor model's report then costs 100k small tuples instead of 100k dataclass
    instances, and counts, coverage and the summary read the rows directly. It behaves as an
    immutable sequence of :class:`Entry` and compares equal to any sequence of equal entries.
    """

    __slots__ = ("_rows",)

    def __init__(self, entries: Iterable[Entry | tuple[Any, ...]] = ()) -> None:
        self._rows: tuple[tuple[Any, ...], ...] = tuple(
            tuple(getattr(e, f) for f in FIELDS) if isinstance(e, Entry) else e for e in entries
        )

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[Any, ...]]) -> EntryTable:
        """A table over ``rows`` as they are (tuples in field order, not checked)."""
        table = cls()
        table._rows = tuple(rows)
        return table

    @property
    def rows(self) -> tuple[tuple[Any, ...], ...]:
        return self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Entry: ...

    @overload
    def __getitem__(self, index: slice) -> list[Entry]: ...

    def __getitem__(self, index: int | slice) -> Entry | list[Entry]:
        if isinstance(index, slice):
            return [Entry(*row) for row in self._rows[index]]
        return Entry(*self._rows[index])

    def __iter__(self) -> Iterator[Entry]:
        for row in self._rows:
            yield Entry(*row)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EntryTable):
            return self._rows == other._rows
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self._rows) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<EntryTable of {len(self._rows)} entries>"


@dataclass(frozen=True)
class TransferReport:
    """Every target tensor in scope with its status, and the fate of every source tensor.

    Attributes:
        entries: One :class:`Entry` per target tensor in scope, in the model's order (an
            :class:`EntryTable`: any sequence of entries given is stored as one).
        unused: Source keys that fed no target.
        dropped: Source keys a rule dropped on purpose.
        warnings: Things worth a look: rules that matched nothing, incomplete fuses …
        source: Where the weights came from (wrapper key, stripped prefixes, provenance).
        applied: ``False`` for a plan's preview (nothing written yet).
        into: The submodule loaded into, if any.
        stats: Measurements of the apply step (seconds, bytes read).
        unused_reasons: Why each unused key was not used.
    """

    entries: Sequence[Entry]
    unused: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    source: SourceInfo | None = None
    applied: bool = True
    into: str | None = None
    stats: dict[str, float] = field(default_factory=dict)
    unused_reasons: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.entries, EntryTable):
            object.__setattr__(self, "entries", EntryTable(self.entries))

    @property
    def _rows(self) -> tuple[tuple[Any, ...], ...]:
        return self.entries.rows  # type: ignore[attr-defined]

    # -- views ----------------------------------------------------------------------------------
    def _with(self, status: str) -> list[Entry]:
        return [Entry(*r) for r in self._rows if r[_STATUS] == status]

    def counts(self) -> dict[str, int]:
        """How many target tensors have each status."""
        counts = Counter(r[_STATUS] for r in self._rows)
        return {s: counts.get(s, 0) for s in STATUSES}

    @property
    def loaded(self) -> list[Entry]:
        return self._with("loaded")

    @property
    def adapted(self) -> list[Entry]:
        return self._with("adapted")

    @property
    def fresh(self) -> list[Entry]:
        return self._with("fresh")

    @property
    def skipped(self) -> list[Entry]:
        """Fresh entries refused for a shape mismatch."""
        return [Entry(*r) for r in self._rows if r[_STATUS] == "fresh" and r[_REASON] == "shape mismatch"]

    @property
    def coverage(self) -> float:
        """Share of target parameter elements (each shared tensor once) that received
        pretrained values."""
        params = [r for r in self._rows if r[_PARAM] and r[_TIED] is None]
        total = sum(r[_NUMEL] for r in params)
        done = sum(r[_NUMEL] for r in params if r[_STATUS] != "fresh")
        return done / total if total else 1.0

    def __getitem__(self, target: str) -> Entry:
        for r in self._rows:
            if r[0] == target:
                return Entry(*r)
        raise KeyError(target)

    # -- renderers ------------------------------------------------------------------------------
    def summary(self) -> str:
        """A few lines: counts, coverage, and grouped names of what did not load as is."""
        verb = "transferred" if self.applied else "planned (dry run)"
        counts = self.counts()
        lines = [
            f"{verb}: {counts['loaded']} loaded, {counts['adapted']} adapted, "
            f"{counts['fresh']} fresh of {len(self.entries)} target tensors; "
            f"coverage {self.coverage:.2%} of parameters",
        ]
        if self.source is not None:
            lines.append(f"source: {_source_line(self.source)}")
        if self.adapted:
            lines.append("adapted: " + _grouped(e.target for e in self.adapted))
        for reason in ("shape mismatch", "missing", "dropped"):
            names = [e.target for e in self.fresh if e.reason == reason]
            if names:
                lines.append(f"fresh ({reason}): {_grouped(names)}")
        if self.unused:
            lines.append(f"unused source tensors ({len(self.unused)}): {_grouped(self.unused)}")
        if self.dropped:
            lines.append(f"dropped by rules ({len(self.dropped)}): {_grouped(self.dropped)}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """``(target, status, source, shapes, detail)`` per entry, for tables."""
        out = []
        for e in self.entries:
            src = ", ".join(e.sources) if e.sources else "-"
            if e.source_shape is not None and tuple(e.source_shape) != tuple(e.target_shape):
                shapes = f"{_shape(e.source_shape)} -> {_shape(e.target_shape)}"
            else:
                shapes = _shape(e.target_shape)
            detail = "; ".join(
                x
                for x in (
                    ", ".join(e.ops),
                    e.reason or "",
                    f"tied to {e.tied_to}" if e.tied_to else "",
                )
                if x
            )
            out.append((e.target, e.status, src, shapes, detail))
        return out

    def __str__(self) -> str:
        rows = [("target", "status", "source", "shape", "detail"), *self.rows()]
        widths = [min(60, max(len(r[i]) for r in rows)) for i in range(4)]
        lines = []
        for r in rows:
            cells = [r[i].ljust(widths[i]) for i in range(4)] + [r[4]]
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines) + "\n\n" + self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "into": self.into,
            "counts": self.counts(),
            "coverage": self.coverage,
            "entries": [e.to_dict() for e in self.entries],
            "unused": list(self.unused),
            "unused_reasons": dict(self.unused_reasons),
            "dropped": list(self.dropped),
            "warnings": list(self.warnings),
            "source": self.source.to_dict() if self.source is not None else None,
            "stats": dict(self.stats),
        }

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def to_markdown(self) -> str:
        head = "| target | status | source | shape | detail |\n|---|---|---|---|---|"
        body = "\n".join("| " + " | ".join(_md(c) for c in r) + " |" for r in self.rows())
        summary = "\n".join(f"- {_md(line)}" for line in self.summary().splitlines())
        return f"{summary}\n\n{head}\n{body}\n"

    def _repr_html_(self) -> str:
        colors = {"loaded": "#2e7d32", "adapted": "#1565c0", "fresh": "#e65100"}
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td style='color:{colors.get(c, 'inherit')}'>{html.escape(c)}</td>"
                if i == 1
                else f"<td><code>{html.escape(c)}</code></td>"
                for i, c in enumerate(r)
            )
            + "</tr>"
            for r in self.rows()
        )
        summary = "<br>".join(html.escape(line) for line in self.summary().splitlines())
        return (
            f"<div><p>{summary}</p><table><thead><tr><th>target</th><th>status</th>"
            f"<th>source</th><th>shape</th><th>detail</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        styles = {"loaded": "green", "adapted": "blue", "fresh": "yellow"}
        table = Table("target", "status", "source", "shape", "detail", show_lines=False)
        for r in self.rows():
            table.add_row(r[0], Text(r[1], style=styles.get(r[1], "")), r[2], r[3], r[4])
        return Group(table, Text(self.summary()))


def _source_line(info: SourceInfo) -> str:
    parts = [f"{info.location} ({info.kind})"]
    if info.wrapper:
        parts.append(f"weights under {info.wrapper!r}")
    if info.prefixes:
        parts.append("stripped " + ", ".join(repr(p) for p in info.prefixes))
    if info.placeholders:
        parts.append(f"{len(info.placeholders)} pickled globals kept inert")
    return "; ".join(parts)


def _shape(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else str(tuple(shape))


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _grouped(names: Iterable[str], limit: int = 12) -> str:
    groups = group_names(names)
    shown = ", ".join(groups[:limit])
    return shown + (f", … ({len(groups) - limit} more groups)" if len(groups) > limit else "")


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
    return int(seg) if seg.isdigit() and (seg == "0" or not seg.startswith("0")) else seg


def _render(seg: Any) -> str:
    if not isinstance(seg, _Range):
        return str(seg)
    values = list(seg)
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(str(v) for v in values) + "}"
