"""What a transfer did to every tensor: :class:`Entry`, :class:`TransferReport` and renderers."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from itertools import chain, compress, repeat
from typing import Any, Literal, NamedTuple, overload

from weightport._grouping import group_names
from weightport._html import render
from weightport._text import byte_size, printable
from weightport._tuples import rows
from weightport.sources.base import SourceInfo

__all__ = ["Entry", "EntryTable", "LoadedColumns", "Row", "TransferReport", "group_names"]

STATUSES = ("loaded", "adapted", "fresh")
Status = Literal["loaded", "adapted", "fresh"]


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
    status: Status
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


class Row(NamedTuple):
    """A report row: :class:`Entry`'s fields as a named tuple, built and read by field name (a
    table of 100k entries keeps rows and makes each :class:`Entry` only when it is asked for)."""

    target: str
    status: Status
    sources: tuple[str, ...]
    rule: str | None
    ops: tuple[str, ...]
    source_shape: tuple[int, ...] | None
    target_shape: tuple[int, ...]
    reason: str | None
    tied_to: str | None
    numel: int
    is_parameter: bool


if Row._fields != FIELDS:  # Entry(*row) below relies on it: fail at import, never corrupt a report
    raise ImportError(f"weightport.report.Row's fields {Row._fields} are not Entry's {FIELDS}")


def _entry(row: Row) -> Entry:
    return Entry(*row)


def _row(entry: Entry) -> Row:
    return Row(**{f: getattr(entry, f) for f in FIELDS})


class LoadedColumns(NamedTuple):
    """Entries of tensors loaded as they are, one list per field: a plan's bulk of a large model.

    Each is ``Entry(name, "loaded", (source,), rule, (), shape, shape, None, None, numel,
    is_parameter)``: no ops, the source's shape is the target's, not tied.
    """

    names: Sequence[str]
    sources: Sequence[str]
    rules: Sequence[str | None]  # each rule as written
    shapes: Sequence[tuple[int, ...]]
    params: Sequence[bool]

    def rows(self) -> Iterator[Row]:
        columns: dict[str, Iterable[Any]] = {
            "target": self.names,
            "status": repeat("loaded"),
            "sources": zip(self.sources),
            "rule": self.rules,
            "ops": repeat(()),
            "source_shape": self.shapes,
            "target_shape": self.shapes,
            "reason": repeat(None),
            "tied_to": repeat(None),
            "numel": map(math.prod, self.shapes),
            "is_parameter": self.params,
        }
        return rows(Row, *(columns[f] for f in Row._fields))


class EntryTable(Sequence[Entry]):
    """A report's entries, kept as rows of field values (one tuple per target tensor, in
    :class:`Entry` field order); each :class:`Entry` is made when it is asked for.

    A plan's loaded-as-is bulk can be kept as :class:`LoadedColumns` beside the other rows
    (:meth:`from_parts`): their rows are then made only when entries are listed one by one;
    counts, coverage and the summary read the columns. A 100k-tensor model's plan then costs
    a few lists instead of 100k rows. The table behaves as an immutable sequence of
    :class:`Entry` in the model's order and compares equal to any sequence of equal entries.
    """

    __slots__ = ("_all", "_loaded", "_order", "_other")

    def __init__(self, entries: Iterable[Entry | tuple[Any, ...]] = ()) -> None:
        rows = tuple(_row(e) if isinstance(e, Entry) else Row._make(e) for e in entries)
        self._all: tuple[Row, ...] | None = rows
        self._other = rows
        self._order: Sequence[str] = ()
        self._loaded: LoadedColumns | None = None

    @classmethod
    def from_parts(cls, order: Sequence[str], other: Sequence[Row], loaded: LoadedColumns) -> EntryTable:
        """A table of ``loaded`` and the ``other`` rows (in the model's order among themselves),
        listed in ``order``: every target name once, in the model's order."""
        if len(order) != len(other) + len(loaded.names):
            raise ValueError(f"{len(order)} names for {len(other)} rows and {len(loaded.names)} loaded entries")
        table = cls()
        table._order, table._other, table._loaded = order, tuple(map(Row._make, other)), loaded
        table._all = None if loaded.names else table._other
        return table

    @property
    def rows(self) -> tuple[Row, ...]:
        """Every row, in the model's order (the loaded columns' rows are made on first use)."""
        if self._all is None:
            assert self._loaded is not None
            loaded = self._loaded.rows()
            if not self._other and list(self._order) == list(self._loaded.names):
                self._all = tuple(loaded)
            else:
                by_name = dict(zip(self._loaded.names, loaded))
                by_name.update((r.target, r) for r in self._other)
                self._all = tuple(map(by_name.__getitem__, self._order))
        return self._all

    @property
    def other_rows(self) -> tuple[Row, ...]:
        """The rows not in loaded columns (every row when there are none), in the model's order."""
        return self._other

    def names(self) -> Iterator[str]:
        """Every target name (the loaded columns' first, when there are some)."""
        if self._loaded is None:
            return (r.target for r in self._other)
        return chain(self._loaded.names, (r.target for r in self._other))

    def counts(self) -> Counter[str]:
        """Entries by status."""
        counts: Counter[str] = Counter(r.status for r in self._other)
        if self._loaded is not None and self._loaded.names:
            counts["loaded"] += len(self._loaded.names)
        return counts

    def coverage_numel(self) -> tuple[int, int, int]:
        """``(loaded, adapted, all)`` elements of parameters, each tied tensor once."""
        params = [r for r in self._other if r.is_parameter and r.tied_to is None]
        total = sum(r.numel for r in params)
        exact = sum(r.numel for r in params if r.status == "loaded")
        adapted = sum(r.numel for r in params if r.status == "adapted")
        if self._loaded is not None:
            numel = sum(map(math.prod, compress(self._loaded.shapes, self._loaded.params)))
            total, exact = total + numel, exact + numel
        return exact, adapted, total

    def __len__(self) -> int:
        return len(self._other) + (len(self._loaded.names) if self._loaded is not None else 0)

    @overload
    def __getitem__(self, index: int) -> Entry: ...

    @overload
    def __getitem__(self, index: slice) -> list[Entry]: ...

    def __getitem__(self, index: int | slice) -> Entry | list[Entry]:
        if isinstance(index, slice):
            return [_entry(row) for row in self.rows[index]]
        return _entry(self.rows[index])

    def __iter__(self) -> Iterator[Entry]:
        for row in self.rows:
            yield _entry(row)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EntryTable):
            return self.rows == other.rows
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<EntryTable of {len(self)} entries>"


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
        outside: Tensors of the model outside ``into=`` that were on meta and are initialised
            fresh (names in the whole model); they have no entry.
        bytes_read_per_rank: For a sharded model, the source bytes each rank read (rank order);
            empty otherwise.
        consumed: Source keys used without a target of their own, each with why: those a target
            module's own ``_load_from_state_dict`` consumes, as torch's ``load_state_dict`` does
            (``FrozenBatchNorm2d`` drops ``num_batches_tracked``), and aliases of a loaded tensor
            (tied weights a file stores once). Neither unused nor loaded.
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
    outside: tuple[str, ...] = ()
    consumed: dict[str, str] = field(default_factory=dict)
    bytes_read_per_rank: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.entries, EntryTable):
            object.__setattr__(self, "entries", EntryTable(self.entries))

    @property
    def _table(self) -> EntryTable:
        return self.entries  # type: ignore[return-value]  # made one in __post_init__

    # -- views ----------------------------------------------------------------------------------
    def _with(self, status: str) -> list[Entry]:
        rows = self._table.rows if status == "loaded" else self._table.other_rows
        return [_entry(r) for r in rows if r.status == status]

    def counts(self) -> dict[str, int]:
        """How many target tensors have each status."""
        counts = self._table.counts()
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
        return [_entry(r) for r in self._table.other_rows if r.status == "fresh" and r.reason == "shape mismatch"]

    def fresh_parameters_note(self) -> str | None:
        """One line naming the parameters that load nothing (grouped), or ``None``: what a transfer
        announces on the ``weightport`` logger at WARNING, and ``warnings`` carries."""
        names = [e.target for e in self.fresh if e.is_parameter and e.tied_to is None]
        if not names:
            return None
        return f"{len(names)} parameter(s) not loaded, keeping their initialisation: {_grouped(names)}"

    @property
    def missing_keys(self) -> list[str]:
        """Target keys no source tensor fed (torch's ``load_state_dict`` word): fresh, not for a
        shape mismatch (those are :attr:`mismatched_keys`)."""
        return [e.target for e in self.fresh if e.reason != "shape mismatch"]

    @property
    def unexpected_keys(self) -> list[str]:
        """Source keys that fed no target (torch's word): :attr:`unused`; keys a rule dropped on
        purpose are not unexpected."""
        return list(self.unused)

    @property
    def mismatched_keys(self) -> list[tuple[str, tuple[int, ...] | None, tuple[int, ...]]]:
        """``(target key, source shape, target shape)`` of targets left fresh for their shape
        (transformers' ``mismatched_keys``)."""
        return [(e.target, e.source_shape, e.target_shape) for e in self.skipped]

    @property
    def coverage(self) -> float:
        """Share of target parameter elements (each shared tensor once) that received
        pretrained values."""
        exact, adapted, total = self._table.coverage_numel()
        return (exact + adapted) / total if total else 1.0

    @property
    def exact_coverage(self) -> float:
        """Share of target parameter elements that hold the source's values exactly (``loaded``
        entries: copied, renamed or re-laid out); :attr:`coverage` less the ``adapted`` share."""
        exact, _, total = self._table.coverage_numel()
        return exact / total if total else 1.0

    def __getitem__(self, target: str) -> Entry:
        for r in self._table.rows:
            if r.target == target:
                return _entry(r)
        raise KeyError(target)

    # -- renderers ------------------------------------------------------------------------------
    def summary(self) -> str:
        """A few lines: counts, coverage, and grouped names of what did not load as is."""
        verb = "transferred" if self.applied else "planned (dry run)"
        counts = self.counts()
        lines = [
            f"{verb}: {counts['loaded']} loaded, {counts['adapted']} adapted, "
            f"{counts['fresh']} fresh of {len(self.entries)} target tensors; "
            f"coverage {self.coverage:.2%} of parameters"
            + (f" ({self.exact_coverage:.2%} exact)" if counts["adapted"] else ""),
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
        if self.consumed:
            lines.append(f"used without a target of their own ({len(self.consumed)}): {_grouped(self.consumed)}")
        if self.bytes_read_per_rank:
            read = ", ".join(f"rank {r}: {byte_size(n)}" for r, n in enumerate(self.bytes_read_per_rank))
            lines.append(f"source bytes read per rank: {read}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(map(printable, lines))  # names come from files: never terminal commands

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """``(target, status, source, shapes, detail)`` per entry, for tables."""
        out: list[tuple[str, str, str, str, str]] = []
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
            out.append((printable(e.target), e.status, printable(src), shapes, printable(detail)))
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
            "exact_coverage": self.exact_coverage,
            "entries": [e.to_dict() for e in self.entries],
            "unused": list(self.unused),
            "unused_reasons": dict(self.unused_reasons),
            "dropped": list(self.dropped),
            "outside": list(self.outside),
            "consumed": dict(self.consumed),
            "warnings": list(self.warnings),
            "source": self.source.to_dict() if self.source is not None else None,
            "stats": dict(self.stats),
            "bytes_read_per_rank": list(self.bytes_read_per_rank),
        }

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def to_markdown(self) -> str:
        head = "| target | status | source | shape | detail |\n|---|---|---|---|---|"
        body = "\n".join("| " + " | ".join(_md(c) for c in r) + " |" for r in self.rows())
        summary = "\n".join(f"- {_md(line)}" for line in self.summary().splitlines())
        return f"{summary}\n\n{head}\n{body}\n"

    def to_html(self) -> str:
        """HTML for notebooks (what ``_repr_html_`` shows): the summary, then the fresh, adapted,
        unused and dropped rows, the consumed keys and the loaded rows folded; names grouped and
        escaped (see docs/report.md)."""
        return render(self, "weightport report" if self.applied else "weightport preview: nothing applied (dry run)")

    def _repr_html_(self) -> str:
        return self.to_html()

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
    return "; ".join([f"{info.location} ({info.kind})", *info.facts()])


def _shape(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else str(tuple(shape))


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _grouped(names: Iterable[str], limit: int = 12) -> str:
    groups = group_names(names)
    shown = ", ".join(groups[:limit])
    return shown + (f", … ({len(groups) - limit} more groups)" if len(groups) > limit else "")
