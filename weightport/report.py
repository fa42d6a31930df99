"""What a transfer did to every tensor: :class:`Entry`, :class:`TransferReport` and renderers."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from weightport.sources.base import SourceInfo

__all__ = ["Entry", "TransferReport", "group_names"]

STATUSES = ("loaded", "adapted", "fresh")
_new = object.__new__
_setattr = object.__setattr__


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

    @classmethod
    def _loaded_as_is(
        cls,
        target: str,
        source: str,
        rule: str | None,
        shape: tuple[int, ...],
        tied_to: str | None,
        numel: int,
        is_parameter: bool,
    ) -> Entry:
        """``Entry(target, "loaded", (source,), rule, (), shape, shape, None, tied_to, numel, is_parameter)``,
        made without the frozen dataclass's per-field ``__init__`` (planning makes one per tensor,
        100k of them for a large model). Equal, in every respect, to the one ``__init__`` makes."""
        entry = _new(cls)
        _setattr(
            entry,
            "__dict__",
            {
                "target": target,
                "status": "loaded",
                "sources": (source,),
                "rule": rule,
                "ops": (),
                "source_shape": shape,
                "target_shape": shape,
                "reason": None,
                "tied_to": tied_to,
                "numel": numel,
                "is_parameter": is_parameter,
            },
        )
        return entry

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


@dataclass(frozen=True)
class TransferReport:
    """Every target tensor in scope with its status, and the fate of every source tensor.

    Attributes:
        entries: One :class:`Entry` per target tensor in scope, in the model's order.
        unused: Source keys that fed no target.
        dropped: Source keys a rule dropped on purpose.
        warnings: Things worth a look: rules that matched nothing, incomplete fuses …
        source: Where the weights came from (wrapper key, stripped prefixes, provenance).
        applied: ``False`` for a plan's preview (nothing written yet).
        into: The submodule loaded into, if any.
        stats: Measurements of the apply step (seconds, bytes read).
        unused_reasons: Why each unused key was not used.
    """

    entries: tuple[Entry, ...]
    unused: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    source: SourceInfo | None = None
    applied: bool = True
    into: str | None = None
    stats: dict[str, float] = field(default_factory=dict)
    unused_reasons: dict[str, str] = field(default_factory=dict)

    # -- views ----------------------------------------------------------------------------------
    def _with(self, status: str) -> list[Entry]:
        return [e for e in self.entries if e.status == status]

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
        return [e for e in self.entries if e.status == "fresh" and e.reason == "shape mismatch"]

    @property
    def coverage(self) -> float:
        """Share of target parameter elements (each shared tensor once) that received
        pretrained values."""
        params = [e for e in self.entries if e.is_parameter and e.tied_to is None]
        total = sum(e.numel for e in params)
        done = sum(e.numel for e in params if e.status != "fresh")
        return done / total if total else 1.0

    def __getitem__(self, target: str) -> Entry:
        for e in self.entries:
            if e.target == target:
                return e
        raise KeyError(target)

    # -- renderers ------------------------------------------------------------------------------
    def summary(self) -> str:
        """A few lines: counts, coverage, and grouped names of what did not load as is."""
        verb = "transferred" if self.applied else "planned (dry run)"
        lines = [
            f"{verb}: {len(self.loaded)} loaded, {len(self.adapted)} adapted, "
            f"{len(self.fresh)} fresh of {len(self.entries)} target tensors; "
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
            "counts": {s: len(self._with(s)) for s in STATUSES},
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
