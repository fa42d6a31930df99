"""HTML of a report or a plan for notebooks (``_repr_html_``, ``to_html()``).

The summary comes first, then what deserves a look, each section a ``<details>``: fresh and
adapted target tensors, unused, dropped and consumed source keys, open; the loaded tensors
last, folded. Rows that differ only in integer segments of their names, with the same shapes
and detail, share one line with grouped names (``blocks.{0..11}.attn.qkv.weight``), as the text
summary groups them; a section shows at most :data:`MAX_LINES` lines, so a 100k-tensor model
gives a page a notebook can hold (``str(report)`` and ``report.to_dict()`` list every row).

Names come from files and may hold markup or control characters: every text goes through
:func:`~weightport._text.printable` and :func:`html.escape`. Styles are inline (a notebook
strips ``<style>``) and tint backgrounds while the text keeps the theme's own colour, so dark
and light themes both read.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import TYPE_CHECKING

from weightport._grouping import group_names
from weightport._text import printable

if TYPE_CHECKING:
    from weightport.report import Row, TransferReport

__all__ = ["MAX_LINES", "render"]

MAX_LINES = 200  # lines per section; the rest is counted, not listed

# an integer segment of a dotted name (what group_names may group): rows differing only there share a line
_INTEGER_SEGMENT = re.compile(r"(?<![^.])\d+(?![^.])")
_skeleton = functools.partial(_INTEGER_SEGMENT.sub, "#")

_TINTS = {  # background tints: the text keeps the theme's colour
    "fresh": "rgba(230,120,20,.22)",
    "adapted": "rgba(56,132,255,.22)",
    "unused": "rgba(220,50,50,.20)",
    "dropped": "rgba(128,128,128,.22)",
    "consumed": "rgba(128,128,128,.22)",
    "loaded": "rgba(46,160,67,.22)",
    "warning": "rgba(230,160,20,.25)",
}
_CELL = "text-align:left;padding:1px 8px;border-bottom:1px solid rgba(127,127,127,.25);vertical-align:top"
_TABLE = "border-collapse:collapse;margin:4px 0 8px 16px;font-size:12px"
_SUMMARY = "cursor:pointer;font-weight:600;padding:1px 0"
_MONO = "font-family:var(--jp-code-font-family,monospace);background:none;white-space:pre-wrap;word-break:break-all"

_SAME = "(same name)"
Line = tuple[Sequence[str], int]  # the cells of one line, and how many rows it stands for


def render(report: TransferReport, title: str) -> str:
    """The report as one ``<div>``: ``title``, the summary, then one ``<details>`` per section."""
    table = report.entries
    counts = report.counts()
    parts = [_summary(report, title)]
    for status in ("fresh", "adapted"):
        if counts[status]:
            rows = (r for r in table.other_rows if r.status == status)  # type: ignore[attr-defined]
            parts.append(_section(status, f"{counts[status]} target tensor(s)", _target_lines(rows), True))
    unused = [(k, report.unused_reasons.get(k, "")) for k in report.unused]
    for name, what, keys in (
        ("unused", "source tensor(s) that fed no target", unused),
        ("dropped", "source tensor(s) dropped by rules", [(k, "") for k in report.dropped]),
        ("consumed", "source tensor(s) used without a target of their own", list(report.consumed.items())),
    ):
        if keys:
            parts.append(_section(name, f"{len(keys)} {what}", _lines(keys), name != "consumed"))
    if counts["loaded"]:
        rows = (r for r in table.rows if r.status == "loaded")  # type: ignore[attr-defined]
        lines = _target_lines(rows)
        parts.append(_section("loaded", f"{counts['loaded']} target tensor(s) with the source's values", lines, False))
    style = "font-size:13px;line-height:1.45;color:inherit;max-width:100%;overflow-x:auto"
    return f"<div class='weightport-report' style='{style}'>{''.join(parts)}</div>"


def _summary(report: TransferReport, title: str) -> str:
    lines = []
    for line in report.summary().splitlines():
        tint = f"background:{_TINTS['warning']};" if line.startswith("warning: ") else ""
        lines.append(f"<div style='{tint}{_MONO}'>{_text(line)}</div>")
    return f"<div data-section='summary'><div style='font-weight:700'>{_text(title)}</div>{''.join(lines)}</div>"


def _section(name: str, caption: str, lines: tuple[list[Line], int], open_: bool) -> str:
    shown, more = lines
    head = "".join(f"<th style='{_CELL}'>{h}</th>" for h in _HEADS[name])
    body = "".join(
        "<tr>"
        + "".join(f"<td style='{_CELL}'><code style='{_MONO}'>{_cell(c)}</code></td>" for c in cells)
        + f"<td style='{_CELL}'>{n}</td></tr>"
        for cells, n in shown
    )
    if more:
        body += (
            f"<tr><td style='{_CELL}' colspan='{len(_HEADS[name])}'>… {more} more row(s) not shown: "
            "<code>str(report)</code> or <code>report.to_dict()</code> lists every one</td></tr>"
        )
    pill = f"<span style='background:{_TINTS[name]};padding:0 6px;border-radius:3px'>{name}</span>"
    return (
        f"<details data-section='{name}'{' open' if open_ else ''}><summary style='{_SUMMARY}'>{pill} "
        f"{_text(caption)}</summary><table style='{_TABLE}'><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></details>"
    )


_TARGET_HEADS = ("target", "source", "shape", "detail", "n")
_KEY_HEADS = ("source key", "why", "n")
_HEADS: dict[str, tuple[str, ...]] = {s: _TARGET_HEADS for s in ("fresh", "adapted", "loaded")}
_HEADS.update(dict.fromkeys(("unused", "dropped", "consumed"), _KEY_HEADS))


def _target_lines(rows: Iterable[Row]) -> tuple[list[Line], int]:
    return _lines(map(_target_cells, rows))


def _target_cells(r: Row) -> tuple[str, str, str, str]:
    """A target row's cells, as the text table shows them."""
    source = _SAME if r.sources == (r.target,) else ", ".join(r.sources) or "-"
    detail = ""
    if r.ops or r.reason or r.tied_to:  # most rows have none: no join for them
        tied = f"tied to {r.tied_to}" if r.tied_to else ""
        detail = "; ".join(x for x in (", ".join(r.ops), r.reason or "", tied) if x)
    source_shape = None if r.source_shape is None else tuple(r.source_shape)  # an Entry made by hand may hold lists
    return r.target, source, _shape(source_shape, tuple(r.target_shape)), detail


@functools.lru_cache(maxsize=4096)
def _shape(source: tuple[int, ...] | None, target: tuple[int, ...]) -> str:
    return f"{source} -> {target}" if source is not None and source != target else str(target)


def _lines(items: Iterable[Sequence[str]]) -> tuple[list[Line], int]:
    """Rows that differ only in integer name segments, one line each with every cell's values
    grouped; the first :data:`MAX_LINES` lines in the rows' order, and how many rows are left out."""
    buckets: dict[tuple[str, ...], list[Sequence[str]]] = {}
    for cells in items:
        buckets.setdefault(tuple(map(_skeleton, cells)), []).append(cells)
    shown: list[Line] = [(_merged(members), len(members)) for members in islice(buckets.values(), MAX_LINES)]
    return shown, sum(len(m) for m in buckets.values()) - sum(n for _, n in shown)


def _merged(members: list[Sequence[str]], limit: int = 20) -> list[str]:
    if len(members) == 1:
        return list(members[0])
    out = []
    for column in zip(*members):
        groups = group_names(dict.fromkeys(column))
        more = f", … ({len(groups) - limit} more groups)" if len(groups) > limit else ""
        out.append(", ".join(groups[:limit]) + more)
    return out


def _cell(text: str, limit: int = 300) -> str:
    """A cell's text, cut at ``limit`` characters (a group of scattered indices can be long)."""
    if len(text) > limit:
        text = text[:limit] + f"… ({len(text) - limit} more characters)"
    return _text(text) if text else "-"


def _text(text: str) -> str:
    return html.escape(printable(text), quote=True)
