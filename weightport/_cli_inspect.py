"""What ``weightport inspect`` shows of a source: its tensors, and around the weights of a
checkpoint its scalar entries (``epoch=3``, ``arch='resnet50'``) and the other weights it holds
(an EMA copy under ``state_dict_ema`` …), counted as tensors rather than listed as ignored."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from weightport._cli_text import say
from weightport._text import byte_size
from weightport.errors import WeightportError
from weightport.sources.base import Source
from weightport.sources.unwrap import EMA_KEYS, WRAPPER_KEYS, find_weights

__all__ = ["Entries", "checkpoint_entries", "show"]

_SCALARS = (bool, int, float, str, type(None))
_LONGEST = 80  # characters of a string entry shown


@dataclass
class Entries:
    """The top-level entries of a checkpoint file beside the weights it was opened for.

    Attributes:
        scalars: ``{key: value}`` for entries holding a number, string, bool or ``None``.
        weights: ``{key: (tensors, elements, bytes)}`` for entries holding other weights (EMA …).
    """

    scalars: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def keys(self) -> set[str]:
        return {*self.scalars, *self.weights}

    def to_dict(self) -> dict[str, Any]:
        return {
            "scalars": self.scalars,
            "weights": {
                k: {"tensors": n, "numel": e, "nbytes": b, "ema": k in EMA_KEYS}
                for k, (n, e, b) in self.weights.items()
            },
        }

    def lines(self, option: str) -> list[str]:
        """Human-readable lines; ``option`` is how the user selects other weights (a flag or keyword)."""
        out = []
        if self.scalars:
            out.append("entries: " + ", ".join(f"{k}={_short(v)}" for k, v in self.scalars.items()))
        for k, (n, numel, nbytes) in self.weights.items():
            what = "EMA weights" if k in EMA_KEYS else "weights"
            out.append(
                f"{what} under {k!r}: {n} tensors, {numel:,} elements, {byte_size(nbytes)} ({option} {k} loads them)"
            )
        return out


def show(src: Source, args: argparse.Namespace, speak: Callable[[str], str]) -> None:
    """Print ``src`` as ``weightport inspect`` does (``args``: its options; ``speak``: library
    text in the CLI's flags)."""
    from weightport.checkpoint._info import info as checkpoint_info
    from weightport.checkpoint._info import is_checkpoint_source

    ckpt = checkpoint_info(src) if is_checkpoint_source(src) else None
    entries = checkpoint_entries(src, trust_pickle=args.trust_pickle)
    whole = getattr(src, "whole", src) if ckpt is not None else src  # a training checkpoint: every part
    rows = [_row(name, whole) for name in whole]
    aliases = whole.aliases(list(whole))  # tied weights a file stores once are counted once
    order = {name: i for i, name in enumerate(whole)} if aliases else {}
    counted = [r for r in rows if not any(order[o] < order[r["name"]] for o in aliases.get(r["name"], ()))]
    total = {
        "tensors": len(rows),
        "numel": sum(r["numel"] for r in counted),
        "nbytes": sum(r["nbytes"] for r in counted),
    }
    if args.json:
        payload = {"source": src.info.to_dict(), "tensors": rows, "total": total, "entries": entries.to_dict()}
        if ckpt is not None:
            payload["checkpoint"] = ckpt.to_dict()
        say(json.dumps(payload, indent=2))
        return
    if args.quiet:
        return
    info = src.info.with_(ignored=tuple(k for k in src.info.ignored if k not in entries.keys))
    say(f"{info.location} ({info.kind})")
    facts = info.facts(detail=True) + entries.lines("--checkpoint-key")
    for line in facts + (ckpt.lines() if ckpt is not None else []):
        say(f"  {speak(line)}")
    say()
    shown = (_model_rows(rows) or rows) if ckpt is not None and not args.verbose else rows
    width = min(70, max((len(r["name"]) for r in shown), default=4))
    say(f"{'name'.ljust(width)}  {'shape':<22} {'dtype':<9} {'params':>12}")
    for r in shown:
        shape = str(tuple(r["shape"]))
        say(f"{r['name'].ljust(width)}  {shape:<22} {r['dtype']:<9} {r['numel']:>12,}")
    shared = len(rows) - len(counted)
    note = f" ({shared} name(s) share another's storage: tied weights, counted once)" if shared else ""
    say(f"\n{total['tensors']} tensors, {total['numel']:,} elements, {byte_size(total['nbytes'])}{note}")
    if len(shown) < len(rows):
        say(f"({len(rows) - len(shown)} optimizer, RNG and other tensors not listed; -v lists every tensor)")


def _row(name: str, src: Source) -> dict[str, Any]:
    m = src.meta(name)
    dtype = str(m.dtype).replace("torch.", "")
    return {"name": name, "shape": list(m.shape), "dtype": dtype, "numel": m.numel, "nbytes": m.nbytes}


def _model_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model's tensors of a training checkpoint, under the model's own names."""
    return [{**r, "name": r["name"][len("model/") :]} for r in rows if r["name"].startswith("model/")]


def checkpoint_entries(src: Source, trust_pickle: bool = False) -> Entries:
    """The scalar entries and the other weights beside ``src``'s, when ``src`` is one torch file
    holding a checkpoint (a dict around the weights); empty otherwise. Reads no tensor data."""
    from weightport.sources.files import sniff
    from weightport.sources.torchfile import parse_torch_file

    files = [f for f in src.info.files if os.path.isfile(f)]
    if (src.info.wrapper is None and not src.info.ignored) or len(files) != 1:  # nothing beside the weights
        return Entries()
    try:
        if sniff(files[0]) != "torch":
            return Entries()
        tree = parse_torch_file(files[0], trust_pickle=trust_pickle).obj
    except WeightportError:  # it opened as a source a moment ago: nothing more to tell
        return Entries()
    if not isinstance(tree, Mapping):
        return Entries()
    found = Entries()
    for key, value in tree.items():
        if not isinstance(key, str) or key == src.info.wrapper:
            continue
        if isinstance(value, _SCALARS):
            found.scalars[key] = _plain(value)
        elif key in EMA_KEYS or key in WRAPPER_KEYS:
            counted = _weights(tree, key, files[0])
            if counted is not None:
                found.weights[key] = counted
    return found


def _weights(tree: Any, key: str, location: str) -> tuple[int, int, int] | None:
    try:
        tensors = find_weights(tree, location, checkpoint_key=key).tensors
    except WeightportError:
        return None
    numels = [math.prod(t.shape) for t in tensors.values()]
    nbytes = sum(n * t.dtype.itemsize for n, t in zip(numels, tensors.values()))
    return len(tensors), sum(numels), nbytes


def _plain(value: Any) -> Any:
    """A scalar from a file as it can be shown and written as JSON (no 10,000-digit integers)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, str) and len(value) > 1000:
        return value[:1000] + "…"
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _LONGEST else text[: _LONGEST - 1] + "…"
