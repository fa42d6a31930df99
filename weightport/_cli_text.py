"""The words of the command line: library messages in flags, errors on one line, quoting hints.

The library speaks Python (``allow_empty=True``, ``on_mismatch='adapt'``); under the CLI the
same message must speak flags (``--allow-empty``, ``--on-mismatch adapt``). :func:`speak_flags`
rewrites every ``name=value`` whose ``name`` is an option field (see :mod:`weightport.options`)
with a flag of the CLI's parser, so the table of flags is the parser itself and cannot go stale.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from weightport._text import printable
from weightport.options import PHASES

__all__ = ["flags_of", "one_line", "quoting_hint", "say", "speak_flags"]

_MISSING = object()
# name=value, optionally followed by the CLI form the library already wrote: "check_hash=False (CLI: --no-check-hash)"
_KEYWORD = re.compile(
    r"(?<![\w.])(?P<name>[a-z][a-z0-9_]*)="
    r"(?P<value>'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|\{[^}]*\}|True|False|None|-?\d[\w.]*)?"
    r"(?P<cli>\s*\(CLI: (?P<cli_text>[^)]*)\))?"
)
# the rule makers --rule can express, as the library names them in messages: rules=[weightport.strip_prefix('x.')]
_RULE = re.compile(r"(?:weightport|wp)\.(?P<kind>rename|drop|strip_prefix|add_prefix)\((?P<args>[^()]*)\)")


def say(*parts: object, file: Any = None, end: str = "\n") -> None:
    """``print``, with control characters from files shown as escapes, line by line (a tensor
    name must not move the cursor, set the title or write the clipboard)."""
    text = " ".join(map(str, parts))
    print("\n".join(map(printable, text.split("\n"))), file=file or sys.stdout, end=end)


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``option field -> the flag that sets it``, for every option field of
    :mod:`weightport.options` that a (sub)command of ``parser`` has a flag for (its ``dest``)."""
    names = {f.name for phase in PHASES for f in fields(phase)}
    found: dict[str, argparse.Action] = {}
    for action in _actions(parser):
        if action.dest in names and action.option_strings:
            found.setdefault(action.dest, action)
    return found


def _actions(parser: argparse.ArgumentParser) -> Iterable[argparse.Action]:
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield action


def speak_flags(text: str, flags: Mapping[str, argparse.Action]) -> str:
    """``text`` with each option keyword that has a flag written as that flag:
    ``allow_empty=True`` -> ``--allow-empty``, ``on_mismatch='adapt'`` -> ``--on-mismatch adapt``,
    ``checkpoint_key=`` -> ``--checkpoint-key``, ``check_finite=False`` -> ``omit --check-finite``;
    ``X (CLI: Y)`` becomes ``Y``, and ``rules=[weightport.strip_prefix('m.')]`` a ``--rule``."""

    def replace(m: re.Match[str]) -> str:
        if m["cli"]:
            return m["cli_text"].strip()
        name, raw = m["name"], m["value"]
        if name == "rules" and "rules" in flags and raw is not None and raw.startswith("["):
            rules = [_rule_flag(r, _flag(flags["rules"])) for r in _RULE.finditer(raw)]
            return " ".join(rules) if rules and None not in rules else m[0]  # type: ignore[arg-type]
        action = flags.get(name)
        if action is None:
            return m[0]
        return _flag_form(action, _literal(raw) if raw is not None else _MISSING)

    return re.sub(r"\bpass omit ", "omit ", _KEYWORD.sub(replace, text))


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _flag_form(action: argparse.Action, value: Any) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):  # --ema / --no-ema
        yes, no = sorted(action.option_strings, key=len)
        return {True: yes, False: no, None: f"omit {yes} and {no}"}.get(value, yes)  # type: ignore[call-overload]
    flag = _flag(action)
    if value is _MISSING:
        return flag
    if action.nargs == 0:  # store_true / store_false: the flag sets action.const
        return flag if value == action.const else f"omit {flag}"
    if value is None or value is False:
        return f"omit {flag}"
    if action.nargs == "?" and value == action.const:
        return flag
    values = value if isinstance(value, (list, tuple)) else [value]
    return " ".join(f"{flag} {shlex.quote(str(v))}" for v in values)


def _rule_flag(m: re.Match[str], flag: str) -> str | None:
    try:
        args = ast.literal_eval(f"({m['args']},)")
    except (ValueError, SyntaxError):
        return None
    if not args or not all(isinstance(a, str) for a in args):
        return None
    kind, first = m["kind"], args[0]
    rule = {
        "rename": f"{first}=>{args[-1]}" if len(args) == 2 else None,
        "drop": f"{first}=>",
        "strip_prefix": f"{first}{{rest*}}=>{{rest}}",
        "add_prefix": f"{{rest*}}=>{first}{{rest}}",
    }[kind]
    return None if rule is None else f"{flag} {shlex.quote(rule)}"


def one_line(text: str) -> str:
    """A multi-line message as one line: lines joined by ``; `` (by a space after a colon)."""
    out = ""
    for line in (s.strip() for s in text.splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


_EXAMPLES = {
    "--rule": "--rule 'encoder.{p*}=>backbone.{p}'",
    "--mapping": "--mapping 'torchvision.resnet->timm.resnet'",
}


def quoting_hint(argv: Sequence[str]) -> str | None:
    """A hint to quote, when a spec on the command line looks cut by the shell: one ending in
    ``-`` or ``=`` (``->``/``=>`` became a redirection), or with unbalanced parentheses
    (``factory(k=v, …)`` split at a space or read by the shell)."""
    previous = ""
    for token in argv:
        flag, value = token.split("=", 1) if token.startswith("--") and "=" in token else (previous, token)
        previous = token
        if value.startswith("-") or len(value) < 2:  # a flag, or stdin
            continue
        if value.count("(") != value.count(")"):
            return (
                f"{value!r} looks split by the shell (its parentheses do not pair up): quote the whole spec, "
                "e.g. 'timm:resnet50(num_classes=10)'"
            )
        if value.endswith(("-", "=")):
            example = _EXAMPLES.get(flag, "'encoder.{p*}=>backbone.{p}'")
            return f"{value!r} looks cut by the shell at '>' (read as a redirection): quote the spec, e.g. {example}"
    return None
