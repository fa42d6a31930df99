"""What ``weightport verify`` prints: one line per pair, then what explains a failure or a difference
(the first module that diverges, a numerical cause, why the round trip was not checked)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from weightport._cli_text import say
from weightport.errors import WeightportError
from weightport.mapping.verify import Verification

__all__ = ["run"]


def run(args: argparse.Namespace, facts: dict[str, int] | None = None) -> list[Verification]:
    """Verify what the arguments name and print it; the results (the caller picks the exit code).
    ``facts``: the ``--fact NAME=N`` values, parsed."""
    from weightport.mapping.verify import verify, verify_all

    if args.input and args.input_size:
        raise WeightportError("verify: give --input or --input-size, not both (--input has its own shape)")
    options: dict[str, Any] = {
        "numerics": not args.names_only,
        "input_size": _input_size(args.input_size),
        "atol": args.atol,
        "input": args.input,
        "facts": facts,
    }
    if args.source or args.target:
        results = [verify(args.mapping, source=args.source, target=args.target, **options)]
    else:
        results = verify_all(args.mapping, **options)
    if args.json:
        say(json.dumps([asdict(r) | {"ok": r.ok()} for r in results], indent=2))
        return results
    for r in results:
        if args.quiet and r.ok():
            continue
        for line in lines(r, verbose=args.verbose):
            say(line)
    return results


def lines(r: Verification, *, verbose: bool = False) -> list[str]:
    """The text ``weightport verify`` prints for one pair."""
    diff = "names and shapes only" if r.max_abs_diff is None else f"max abs diff {r.max_abs_diff:.3g}"
    trip = {True: "round trip exact", False: "round trip DIFFERS", None: "no round trip"}[r.round_trip]
    verdict = "ok" if r.ok() else "FAILED"
    out = [f"{verdict:<6} {r.source} -> {r.target}: {r.loaded} tensors, {diff}, {trip} ({r.seconds:.1f} s)"]
    if r.max_abs_diff is not None:
        bad = [m for m in r.modules if not m.ok]
        out.append(f"       {len(r.modules)} corresponding modules compared, {len(bad)} beyond the tolerance")
    first = r.first_divergence
    if first is not None:
        inp = "-" if first.input_diff is None else f"{first.input_diff:.3g}"
        out.append(
            f"       first diverging module: {first.source} -> {first.target}: output diff "
            f"{first.output_diff:.3g} (input diff {inp}, largest output {first.scale:.3g})"
        )
    if r.cause is not None:
        out.append(f"       explained by {r.cause}: max abs diff {r.explained_diff:.3g} with the source's values")
    if r.round_trip_note:
        out.append(f"       round trip not checked: {r.round_trip_note}")
    if verbose:
        rel = "-" if r.max_rel_diff is None else f"{r.max_rel_diff:.3g}"
        out.append(f"       mapping {r.mapping}, max rel diff {rel}, accepted up to {r.atol:g} (--atol)")
        if r.input:
            out.append(f"       input: {r.input}")
        if r.facts:
            out.append("       model facts: " + ", ".join(f"{k}={v}" for k, v in r.facts.items()))
    return out


def _input_size(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise WeightportError(
            f"--input-size {text!r}: expected comma-separated integers, e.g. 3,64,64 (images) or 16 (tokens)"
        ) from None
