"""The ``weightport`` command. The only module that prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from weightport._text import printable
from weightport.errors import StrictnessError, WeightportError

EXIT_OK, EXIT_STRICT, EXIT_BAD_INPUT = 0, 1, 2


def _say(*parts: object, file: Any = None, end: str = "\n") -> None:
    """``print``, with control characters from files shown as escapes, line by line (a tensor
    name must not move the cursor, set the title or write the clipboard)."""
    text = " ".join(map(str, parts))
    print("\n".join(map(printable, text.split("\n"))), file=file or sys.stdout, end=end)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.run(args) or EXIT_OK)
    except StrictnessError as e:
        if e.report is not None:  # what would have loaded, so the user sees what to fix
            _say(e.report.to_json() if getattr(args, "json", False) else e.report)
        _say(f"weightport: {e}", file=sys.stderr)
        return EXIT_STRICT
    except WeightportError as e:
        _say(f"weightport: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _say("weightport: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `weightport inspect big.pth | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weightport", description="Move pretrained weights between models and zoos.")
    sub = p.add_subparsers(dest="command")

    ins = sub.add_parser("inspect", help="list the tensors of a source (nothing is loaded)")
    ins.add_argument("source", help="file, folder, or spec (torchvision:resnet50, timm:NAME, hf:org/name)")
    _source_options(ins)
    ins.add_argument("--json", action="store_true", help="print JSON on stdout")
    ins.set_defaults(run=_inspect)

    port = sub.add_parser("port", help="transfer SOURCE into TARGET and report every tensor")
    port.add_argument("source")
    port.add_argument("target", help="package.module:factory(k=v, …), timm:NAME(…) or torchvision:NAME(…)")
    port.add_argument("--mapping", "-m", help="shipped mapping name or mapping file")
    port.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="FROM=>TO",
        help="extra rename rule (repeatable); 'FROM=>' drops FROM",
    )
    port.add_argument("--into", help="load into this submodule")
    port.add_argument("--on-mismatch", choices=["skip", "adapt", "error"], default="skip")
    port.add_argument("--strict", action="store_true", help="every target loads, every source is used")
    port.add_argument("--require", action="append", default=[], metavar="GLOB")
    port.add_argument("--dtype", help="cast floating-point tensors (float16, bfloat16, …)")
    port.add_argument("--out", "-o", help="save the ported weights here (safetensors)")
    port.add_argument("--dry-run", action="store_true", help="plan only: read no tensor data, write nothing")
    port.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    shown = port.add_mutually_exclusive_group()
    shown.add_argument("--table", "-v", action="store_true", help="print every tensor's row, not only the summary")
    shown.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    _source_options(port)
    port.set_defaults(run=_port)

    demo = sub.add_parser("demo", help="run the README's main job: a real transfer, offline")
    demo.set_defaults(run=lambda args: __import__("weightport.demo", fromlist=["main"]).main())

    sug = sub.add_parser("suggest", help="propose a mapping file from SOURCE's and TARGET's names and shapes")
    sug.add_argument("source")
    sug.add_argument("target", help="package.module:factory(k=v, …), timm:NAME(…) or torchvision:NAME(…)")
    sug.add_argument("--out", "-o", help="write the mapping file here (default: print it)")
    sug.add_argument("--into", help="suggest for this submodule only")
    sug.add_argument("--name", default="suggested", help="the mapping's name")
    _source_options(sug)
    sug.set_defaults(run=_suggest)

    ver = sub.add_parser("verify", help="prove a mapping: port random weights, compare outputs, round trip")
    ver.add_argument("mapping", help="shipped mapping name or mapping file")
    ver.add_argument("--source", help="source architecture spec (default: every pair the mapping lists)")
    ver.add_argument("--target", help="target architecture spec (with --source)")
    ver.add_argument("--names-only", action="store_true", help="build on meta, check names and shapes only")
    ver.add_argument("--input-size", help="input shape without batch, e.g. 3,64,64")
    ver.add_argument("--atol", type=float, default=1e-4, help="largest output difference accepted (default 1e-4)")
    ver.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ver.set_defaults(run=_verify)

    maps = sub.add_parser("mappings", help="list the shipped mappings")
    maps.add_argument("--json", action="store_true")
    maps.set_defaults(run=_mappings)
    return p


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-key", help="key of the weights inside a nested checkpoint")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full pickle loading (runs code from the file: only for files you trust)",
    )
    p.add_argument(
        "--no-check-hash",
        dest="check_hash",
        action="store_false",
        help="skip the hash check of zoo files whose names carry one (torchvision)",
    )
    p.add_argument("--sha256", metavar="HEX", help="refuse the file unless its sha256 is HEX (checked before parsing)")


def _open(args: argparse.Namespace) -> Any:
    from weightport.sources import open_source

    return open_source(
        args.source,
        checkpoint_key=args.checkpoint_key,
        trust_pickle=args.trust_pickle,
        check_hash=args.check_hash,
        expected_sha256=args.sha256,
    )


# -- inspect ---------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from weightport.checkpoint._info import info as checkpoint_info
    from weightport.checkpoint._info import is_checkpoint_source

    src = _open(args)
    ckpt = checkpoint_info(src) if is_checkpoint_source(src) else None
    rows: list[dict[str, Any]] = []
    for name in src:
        m = src.meta(name)
        rows.append(
            {
                "name": name,
                "shape": list(m.shape),
                "dtype": str(m.dtype).replace("torch.", ""),
                "numel": m.numel,
                "nbytes": m.nbytes,
            }
        )
    total = {"tensors": len(rows), "numel": sum(r["numel"] for r in rows), "nbytes": sum(r["nbytes"] for r in rows)}
    if args.json:
        payload = {"source": src.info.to_dict(), "tensors": rows, "total": total}
        if ckpt is not None:
            payload["checkpoint"] = ckpt.to_dict()
        _say(json.dumps(payload, indent=2))
        return EXIT_OK
    from weightport.report import source_facts

    _say(f"{src.info.location} ({src.info.kind})")
    for line in source_facts(src.info, detail=True) + (ckpt.lines() if ckpt is not None else []):
        _say(f"  {line}")
    _say()
    shown = (_model_rows(rows) or rows) if ckpt is not None else rows
    width = min(70, max((len(r["name"]) for r in shown), default=4))
    _say(f"{'name'.ljust(width)}  {'shape':<22} {'dtype':<9} {'params':>12}")
    for r in shown:
        shape = str(tuple(r["shape"]))
        _say(f"{r['name'].ljust(width)}  {shape:<22} {r['dtype']:<9} {r['numel']:>12,}")
    _say(f"\n{total['tensors']} tensors, {total['numel']:,} elements, {_size(total['nbytes'])}")
    if len(shown) < len(rows):
        _say(f"({len(rows) - len(shown)} optimizer, RNG and other tensors not listed; --json lists every tensor)")
    return EXIT_OK


def _model_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model's tensors of a training checkpoint, under the model's own names."""
    return [{**r, "name": r["name"][len("model/") :]} for r in rows if r["name"].startswith("model/")]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


# -- port ------------------------------------------------------------------------------------------


def _port(args: argparse.Namespace) -> int:
    import weightport as wp
    from weightport.targets import build_target

    rules = [_cli_rule(r) for r in args.rule]
    model = build_target(args.target)
    planned = wp.plan(
        _open(args),
        model,
        mapping=args.mapping,
        rules=rules,
        into=args.into,
        on_mismatch=args.on_mismatch,
        strict=args.strict,
        require=args.require,
        dtype=args.dtype,
    )
    report = planned.report if args.dry_run else planned.apply()
    if args.out and not args.dry_run:
        wp.save(model, args.out, metadata={"weightport.source": str(args.source), "weightport.target": args.target})
    if args.json:
        _say(report.to_json())
    elif not args.quiet:
        _say(report if args.table else report.summary())
        if args.out and not args.dry_run:
            _say(f"saved to {args.out}")
    return EXIT_OK


def _cli_rule(text: str) -> Any:
    import weightport as wp

    if "=>" not in text:
        raise WeightportError(f"--rule {text!r}: expected 'FROM=>TO' (or 'FROM=>' to drop)")
    src, dst = (s.strip() for s in text.split("=>", 1))
    return wp.drop(src) if not dst else wp.rename(src, dst)


# -- suggest ---------------------------------------------------------------------------------------


def _suggest(args: argparse.Namespace) -> int:
    import weightport as wp
    from weightport._atomic import atomic_write
    from weightport.mapping.suggest import suggest
    from weightport.meta import init_empty
    from weightport.targets import build_target

    with init_empty():
        model = build_target(args.target)
    src = _open(args)
    found = suggest(src, model, into=args.into)
    text = found.to_toml(name=args.name, source=str(args.source), target=args.target)
    preview = wp.plan(src, model, mapping=found.mapping(), into=args.into)
    if args.out:
        with atomic_write(args.out) as f:
            f.write(text.encode())
    else:
        _say(text, end="")
    where = f"written to {args.out}" if args.out else "printed above"
    _say(f"{len(found.rules)} rules {where}; planned with them: {preview.report.summary()}", file=sys.stderr)
    return EXIT_OK


# -- verify ----------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from weightport.mapping.verify import verify, verify_all

    if bool(args.source) != bool(args.target):
        raise WeightportError("verify: give --source and --target together (or neither, for the mapping's own list)")
    size = _input_size(args.input_size)
    options: dict[str, Any] = {"numerics": not args.names_only, "input_size": size}
    if args.source:
        results = [verify(args.mapping, source=args.source, target=args.target, **options)]
    else:
        results = verify_all(args.mapping, **options)
    failed = [r for r in results if not r.ok(args.atol)]
    if args.json:
        _say(json.dumps([asdict(r) | {"ok": r.ok(args.atol)} for r in results], indent=2))
    else:
        for r in results:
            diff = "names and shapes only" if r.max_abs_diff is None else f"max abs diff {r.max_abs_diff:.3g}"
            trip = {True: "round trip exact", False: "round trip DIFFERS", None: "no round trip"}[r.round_trip]
            verdict = "ok" if r.ok(args.atol) else "FAILED"
            _say(f"{verdict:<6} {r.source} -> {r.target}: {r.loaded} tensors, {diff}, {trip} ({r.seconds:.1f} s)")
    return EXIT_STRICT if failed else EXIT_OK


def _input_size(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise WeightportError(f"--input-size {text!r}: expected comma-separated integers, e.g. 3,64,64") from None


# -- mappings --------------------------------------------------------------------------------------


def _mappings(args: argparse.Namespace) -> int:
    import weightport as wp

    rows: list[dict[str, Any]] = []
    for name in wp.list_mappings():
        m = wp.load_mapping(name)
        verified = list(m.verified) or ([f"{m.source} -> {m.target}"] if m.source and m.target else [])
        rows.append({"name": name, "description": m.description, "verified": verified, "rules": len(m.rules)})
    if args.json:
        _say(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        _say("no shipped mappings")
    for r in rows:
        _say(f"{r['name']} ({r['rules']} rules)\n    {r['description'] or ''}")
        for pair in r["verified"]:
            _say(f"    verified: {pair}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
