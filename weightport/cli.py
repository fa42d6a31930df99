"""The ``weightport`` command. The only modules that print are this one and its ``_cli_*`` helpers.

Exit codes, one table for every command (``weightport --help`` shows it, docs/cli.md too):
see :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from weightport._cli_text import flags_of, one_line, quoting_hint, say, speak_flags
from weightport.errors import NonFiniteError, ShapeMismatchError, StrictnessError, WeightportError

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

#: Every exit code and what it means, for ``--help`` and docs/cli.md.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (
        EXIT_REFUSED,
        "refused by a check: --strict, --require, --on-mismatch error or --check-finite not met, nothing "
        "would load (--allow-empty allows it), or verify found the mapping wrong; nothing was written",
    ),
    (EXIT_BAD_INPUT, "bad input or usage: a missing or unreadable file, a bad spec, flag or value, any other error"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)
#: Errors that mean "refused by a check" (exit 1); every other error is exit 2.
REFUSALS = (StrictnessError, ShapeMismatchError, NonFiniteError)


def exit_codes_text() -> str:
    """The exit-code table as ``--help`` prints it."""
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES)


class _UsageError(Exception):
    """argparse's complaint about the command line (raised instead of printing and exiting)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see :data:`EXIT_CODES`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    flags = flags_of(parser)
    args: argparse.Namespace | None = None
    try:
        args = parser.parse_args(argv)
        args.flags = flags
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        with _logging(args):
            return int(args.run(args) or EXIT_OK)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    except _UsageError as e:
        return _fail(str(e), EXIT_BAD_INPUT, argv, flags)
    except WeightportError as e:
        report = getattr(e, "report", None)
        if isinstance(e, REFUSALS) and report is not None and args is not None and not getattr(args, "quiet", False):
            # what would have loaded: what to fix
            say(report.to_json() if getattr(args, "json", False) else speak_flags(str(report), flags))
        return _fail(str(e), EXIT_REFUSED if isinstance(e, REFUSALS) else EXIT_BAD_INPUT, argv, flags)
    except KeyboardInterrupt:
        say("weightport: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `weightport inspect big.pth | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
    except Exception as e:  # torch's RuntimeError, an OSError …: one line too; -v shows where
        if args is not None and getattr(args, "verbose", False):
            raise
        where = " (run with -v for the traceback)" if args is not None and hasattr(args, "quiet") else ""
        return _fail(f"{type(e).__name__}: {e}{where}", EXIT_BAD_INPUT, argv, flags)


def _fail(message: str, code: int, argv: Sequence[str], flags: Any) -> int:
    hint = quoting_hint(argv)
    text = one_line(speak_flags(message, flags)) + (f"; {hint}" if hint else "")
    say(f"weightport: error: {text}", file=sys.stderr)
    return code


class _CliLog(logging.Handler):
    """The ``weightport`` logger under the CLI: one ``weightport: warning: …`` line per record on
    stderr, INFO too with -v, nothing with -q; warnings a printed report already shows are not repeated."""

    def __init__(self, level: int, flags: Any) -> None:
        super().__init__(level)
        self.flags = flags
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.held.append(record)  # said after the report, unless the report says it
        else:
            self.say(record)

    def say(self, record: logging.LogRecord) -> None:
        text = one_line(speak_flags(record.getMessage(), self.flags))
        say(f"weightport: {record.levelname.lower()}: {text}", file=sys.stderr)

    def say_held(self, shown: Sequence[str] = ()) -> None:
        held, self.held = self.held, []
        for record in held:
            if record.getMessage() not in shown:
                self.say(record)


_LOG: _CliLog | None = None


@contextlib.contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    global _LOG
    logger = logging.getLogger("weightport")
    level = logging.CRITICAL + 1 if getattr(args, "quiet", False) else logging.INFO if args.verbose else logging.WARNING
    handler = _LOG = _CliLog(level, args.flags)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(min(level, logging.WARNING))
    logger.propagate = False
    try:
        yield
        handler.say_held()
    finally:  # a failed command says its error alone, on one line
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        _LOG = None


def _shown(warnings: Sequence[str]) -> None:
    """The report printed shows these warnings: the log need not repeat them."""
    if _LOG is not None:
        _LOG.say_held(shown=warnings)


def _parser() -> argparse.ArgumentParser:
    from weightport import __version__

    p = _Parser(
        prog="weightport",
        description="Move pretrained weights between models and zoos.",
        epilog=exit_codes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"weightport {__version__}")
    sub = p.add_subparsers(dest="command")

    ins = sub.add_parser("inspect", help="list the tensors of a source (nothing is loaded)")
    ins.add_argument("source", help="file, folder, or spec (torchvision:resnet50, timm:NAME, hf:org/name)")
    _source_options(ins)
    ins.add_argument("--json", action="store_true", help="print JSON on stdout")
    _verbosity(ins, "list every tensor, also the optimizer's and RNG's of a training checkpoint")
    ins.set_defaults(run=_inspect)

    port = sub.add_parser(
        "port",
        help="transfer SOURCE into TARGET and report every tensor",
        epilog=exit_codes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    port.add_argument("source")
    port.add_argument("target", help=_TARGET_HELP)
    port.add_argument("--mapping", "-m", help="shipped mapping name or mapping file; quote names with '->'")
    port.add_argument(
        "--rule",
        dest="rules",
        action="append",
        default=[],
        metavar="FROM=>TO",
        help="extra rename rule (repeatable); 'FROM=>' drops FROM; quote it: '=>' is a redirection to the shell",
    )
    port.add_argument("--into", help="load into this submodule")
    port.add_argument("--on-mismatch", choices=["skip", "adapt", "error"], default="skip")
    port.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        default=[],
        metavar="NAME",
        help="also try this shape adapter on a mismatch (head, vocab: a resized classifier or vocabulary keeps "
        "the first rows; it is fresh otherwise)",
    )
    port.add_argument(
        "--fact",
        dest="facts",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a model fact a mapping's parameters name ($heads, $kv_heads, $head_dim, $hidden, $vocab), when "
        "neither the target's config nor the source's config.json/params.json states it (repeatable)",
    )
    port.add_argument("--strict", action="store_true", help="every target loads, every source is used")
    port.add_argument("--require", action="append", default=[], metavar="GLOB")
    port.add_argument("--allow-empty", action="store_true", help="allow a transfer that loads no tensor at all")
    port.add_argument("--dtype", help="cast floating-point tensors (float16, bfloat16, …)")
    port.add_argument("--device", help="place the loaded tensors on this device (cpu, cuda, cuda:1, …)")
    port.add_argument(
        "--zero-copy",
        action="store_true",
        help="build the target on meta and map the file's pages instead of copying (the file must not change)",
    )
    port.add_argument(
        "--check-finite",
        nargs="?",
        const=True,
        choices=["report"],
        help="refuse tensors holding NaN or Inf; '--check-finite report' loads them and lists them",
    )
    port.add_argument("--out", "-o", help="save the ported weights here (.safetensors, .pt, .pth, .bin)")
    port.add_argument(
        "--dry-run", action="store_true", help="plan only: build the target on meta, read no tensor data, write nothing"
    )
    port.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    _verbosity(port, "print every tensor's row, not only the summary", "--table")
    _source_options(port)
    port.set_defaults(run=_port)

    demo = sub.add_parser("demo", help="run the README's main job: a real transfer, offline")
    demo.set_defaults(run=lambda args: __import__("weightport.demo", fromlist=["main"]).main(), verbose=False)

    sug = sub.add_parser("suggest", help="propose a mapping file from SOURCE's and TARGET's names and shapes")
    sug.add_argument(
        "source", help="a weights file (recorded as source_file) or an architecture spec (recorded as source)"
    )
    sug.add_argument("target", help=_TARGET_HELP)
    sug.add_argument("--out", "-o", help="write the mapping file here (default: print it)")
    sug.add_argument("--into", help="suggest for this submodule only")
    sug.add_argument("--name", default="suggested", help="the mapping's name")
    _source_options(sug)
    _verbosity(sug, "also print the plan the suggested mapping gives, row by row")
    sug.set_defaults(run=_suggest)

    ver = sub.add_parser("verify", help="prove a mapping: port random weights, compare outputs, round trip")
    ver.add_argument("mapping", help="shipped mapping name or mapping file")
    ver.add_argument(
        "--source",
        help="source architecture spec (default: every pair the mapping lists; alone: the mapping's target)",
    )
    ver.add_argument("--target", help="target architecture spec (alone: the mapping's source or first pair)")
    ver.add_argument("--names-only", action="store_true", help="build on meta, check names and shapes only")
    ver.add_argument("--input-size", help="input shape without batch: 3,64,64 for images, 16 (tokens) for text")
    ver.add_argument("--input", metavar="FILE", help="run this input (.pt, .safetensors or .npy tensor, batch incl.)")
    ver.add_argument(
        "--atol",
        type=float,
        default=None,
        help="largest output difference accepted (default: the mapping's atol, else 1e-4)",
    )
    ver.add_argument(
        "--fact",
        dest="facts",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a model fact the mapping's parameters name ($heads …), when neither architecture states it (repeatable)",
    )
    ver.add_argument("--json", action="store_true", help="print the results, per-module table included, as JSON")
    _verbosity(ver, "also the mapping, relative difference and tolerance", quiet="print only the pairs that failed")
    ver.set_defaults(run=_verify)

    maps = sub.add_parser("mappings", help="list the shipped mappings")
    maps.add_argument("--json", action="store_true")
    maps.set_defaults(run=_mappings, verbose=False)
    return p


_TARGET_HELP = (
    "package.module:factory(k=v, …) (imported from the current folder too), timm:NAME(…), torchvision:NAME(…) "
    "or transformers:CLASS(…); quote it: the shell reads parentheses"
)


def _verbosity(
    p: argparse.ArgumentParser, verbose: str, alias: str | None = None, quiet: str = "print nothing but errors"
) -> None:
    """-v/--verbose and -q/--quiet, the same pair on every command that prints more than one line."""
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--verbose", "-v", *([alias] if alias else []), dest="verbose", action="store_true", help=verbose
    )
    shown.add_argument("--quiet", "-q", action="store_true", help=quiet)


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
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="take a checkpoint's EMA weights (--no-ema: its raw weights); default: the raw weights, and the "
        "summary says an EMA set exists",
    )
    p.add_argument(
        "--sha256",
        dest="expected_sha256",
        metavar="HEX",
        help="refuse the file unless its sha256 is HEX (checked before parsing)",
    )


def _open(args: argparse.Namespace) -> Any:
    from weightport.sources import open_source

    return open_source(
        args.source,
        checkpoint_key=args.checkpoint_key,
        trust_pickle=args.trust_pickle,
        check_hash=args.check_hash,
        expected_sha256=args.expected_sha256,
        ema=args.ema,
    )


def _build(spec: str, *, on_meta: bool = False) -> Any:
    """The model a TARGET spec names (see :func:`_importable_here`)."""
    from weightport.meta import init_empty
    from weightport.targets import build_target

    with _importable_here(), init_empty() if on_meta else contextlib.nullcontext():
        return build_target(spec)


@contextlib.contextmanager
def _importable_here() -> Iterator[None]:
    """``package.module:factory`` targets import from the current folder too, as with ``python -m``,
    but after the installed packages: a file here cannot shadow one."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.append(here)
    try:
        yield
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


# -- inspect ---------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from weightport._cli_inspect import show

    show(_open(args), args, lambda text: speak_flags(text, args.flags))
    return EXIT_OK


# -- port ------------------------------------------------------------------------------------------


def _port(args: argparse.Namespace) -> int:
    import weightport as wp

    rules = [_cli_rule(r) for r in args.rules]
    # A dry run reads no data, so it needs no memory for the target either; zero-copy assigns the
    # file's pages to a target built on meta (there is nothing to copy into).
    model = _build(args.target, on_meta=args.dry_run or args.zero_copy)
    planned = wp.plan(
        _open(args),
        model,
        mapping=args.mapping,
        rules=rules,
        into=args.into,
        on_mismatch=args.on_mismatch,
        adapters=args.adapters,
        facts=_cli_facts(args.facts),
        strict=args.strict,
        require=args.require,
        allow_empty=args.allow_empty,
        dtype=args.dtype,
        device=args.device,
        zero_copy=args.zero_copy,
        check_finite=args.check_finite or False,
    )
    report = planned.report if args.dry_run else planned.apply()
    if args.out and not args.dry_run:
        wp.save(model, args.out, metadata={"weightport.source": str(args.source), "weightport.target": args.target})
    if args.json:
        say(report.to_json())
    elif not args.quiet:
        say(speak_flags(str(report) if args.verbose else report.summary(), args.flags))
        _shown(report.warnings)
        if args.out and not args.dry_run:
            say(f"saved to {args.out}")
    return EXIT_OK


def _cli_facts(texts: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for text in texts:
        name, _, value = text.partition("=")
        if not name.strip() or not value.strip().isdigit():
            raise WeightportError(f"--fact {text!r}: expected NAME=N with N a positive integer, e.g. --fact heads=32")
        out[name.strip()] = int(value)
    return out


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

    model = _build(args.target, on_meta=True)
    src = _open(args)
    found = suggest(src, model, into=args.into)
    # A weights file is recorded as the file it is; only an architecture spec is a mapping's `source`.
    given = {"source_file" if os.path.exists(args.source) else "source": str(args.source)}
    text = found.to_toml(name=args.name, target=args.target, **given)
    preview = wp.plan(src, model, mapping=found.mapping(), into=args.into)
    if args.out:
        with atomic_write(args.out) as f:
            f.write(text.encode())
    else:
        say(text, end="")
    where = f"written to {args.out}" if args.out else "printed above"
    if args.verbose:
        say(preview.report, file=sys.stderr)
    elif not args.quiet:
        say(f"{len(found.rules)} rules {where}; planned with them: {preview.report.summary()}", file=sys.stderr)
    return EXIT_OK


# -- verify ----------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    from weightport._cli_verify import run

    with _importable_here():
        results = run(args, facts=_cli_facts(args.facts))
    return EXIT_OK if all(r.ok() for r in results) else EXIT_REFUSED


# -- mappings --------------------------------------------------------------------------------------


def _mappings(args: argparse.Namespace) -> int:
    import weightport as wp

    rows: list[dict[str, Any]] = []
    for name in wp.list_mappings():
        m = wp.load_mapping(name)
        verified = list(m.verified) or ([f"{m.source} -> {m.target}"] if m.source and m.target else [])
        rows.append({"name": name, "description": m.description, "verified": verified, "rules": len(m.rules)})
    if args.json:
        say(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        say("no shipped mappings")
    for r in rows:
        say(f"{r['name']} ({r['rules']} rules)\n    {r['description'] or ''}")
        for pair in r["verified"]:
            say(f"    verified: {pair}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
