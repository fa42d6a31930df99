"""Name patterns and templates.

Patterns match a whole dotted key:

* ``{name}`` captures one segment (``[^.]+``); ``{name*}`` one or more segments;
* ``*`` and ``**`` are the anonymous forms;
* ``{{`` and ``}}`` are literal braces; every other character is literal;
* a pattern starting with ``re:`` is a regular expression (named groups capture;
  such rules cannot be inverted).

Templates build a key from captures: ``{name}``, and ``{i+1}`` / ``{i-1}`` to shift
an integer capture. A placeholder shifted in the template only matches integers
in the pattern, so ``layer{i}`` never captures ``layerX``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from weightport.errors import MappingError, PatternError

__all__ = ["Pattern", "Placeholder", "Template", "Wildcard", "parse"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEGMENT = r"[^.]+"
_SEGMENTS = r"[^.]+(?:\.[^.]+)*"
_LINE_SEGMENT = r"[^.\n]+"  # line mode: one key per line of a joined text
_LINE_SEGMENTS = r"[^.\n]+(?:\.[^.\n]+)*"
_INT = r"0|[1-9][0-9]*"


@dataclass(frozen=True)
class Placeholder:
    """``{name}``, ``{name*}`` or (templates only) ``{name+k}``."""

    name: str
    multi: bool = False
    offset: int = 0


@dataclass(frozen=True)
class Wildcard:
    """``*`` (one segment) or ``**`` (one or more)."""

    multi: bool


Token = str | Placeholder | Wildcard


def parse(text: str, *, template: bool = False) -> tuple[Token, ...]:
    """Split pattern or template text into literal strings and placeholders."""
    if not isinstance(text, str) or not text:
        raise PatternError(f"a {'template' if template else 'pattern'} must be a non-empty string, got {text!r}")
    tokens: list[Token] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "{}" and text[i : i + 2] in ("{{", "}}"):
            literal.append(c)
            i += 2
        elif c == "{":
            end = text.find("}", i)
            if end < 0:
                raise PatternError(f"{text!r}: '{{' at position {i} is never closed (write '{{{{' for a brace)")
            if literal:
                tokens.append("".join(literal))
                literal = []
            tokens.append(_placeholder(text, text[i + 1 : end], template))
            i = end + 1
        elif c == "}":
            raise PatternError(f"{text!r}: unmatched '}}' at position {i} (write '}}}}' for a brace)")
        elif c == "*":
            if template:
                raise PatternError(
                    f"{text!r}: a template cannot contain '*': name the part in the pattern, e.g. '{{rest*}}'"
                )
            if literal:
                tokens.append("".join(literal))
                literal = []
            multi = text[i : i + 2] == "**"
            tokens.append(Wildcard(multi))
            i += 2 if multi else 1
        else:
            literal.append(c)
            i += 1
    if literal:
        tokens.append("".join(literal))
    return tuple(tokens)


def _placeholder(text: str, body: str, template: bool) -> Placeholder:
    m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\*|[+-]\s*[0-9]+)?\s*", body)
    if not m:
        raise PatternError(
            f"{text!r}: '{{{body}}}' is not a placeholder; use '{{name}}', '{{name*}}' "
            "or, in a template, '{{name+1}}'"
        )
    name, extra = m.group(1), (m.group(2) or "").replace(" ", "")
    if extra == "*":
        return Placeholder(name, multi=True)
    if extra:
        if not template:
            raise PatternError(f"{text!r}: '{{{body}}}': offsets belong in templates, not patterns")
        return Placeholder(name, offset=int(extra))
    return Placeholder(name)


class Pattern:
    """A compiled, whole-key pattern.

    Attributes:
        text: The pattern as written.
        names: Captured placeholder names, in order of first appearance.
        invertible: Whether a template can rebuild every key it matches from its captures.
    """

    def __init__(self, text: str, *, int_names: frozenset[str] = frozenset()) -> None:
        self.text = text
        self.int_names = int_names
        if text.startswith("re:"):
            self.tokens: tuple[Token, ...] = ()
            self.regex_source = text[3:]
            try:
                self.regex = re.compile(self.regex_source)
            except re.error as e:
                raise PatternError(f"{text!r}: invalid regular expression: {e}") from e
            self.names = tuple(self.regex.groupindex)
            self.multi_names: frozenset[str] = frozenset(self.names)
            self.invertible = False
            return
        self.tokens = parse(text)
        names: list[str] = []
        multi: set[str] = set()
        for t in self.tokens:
            if isinstance(t, Placeholder):
                if t.name not in names:
                    names.append(t.name)
                if t.multi:
                    multi.add(t.name)
        self.names = tuple(names)
        self.multi_names = frozenset(multi)
        self.invertible = not any(isinstance(t, Wildcard) for t in self.tokens)
        self.regex_source = self.to_regex()
        self.regex = re.compile(self.regex_source)

    def to_regex(self, group_prefix: str = "", *, lines: bool = False) -> str:
        """Regex source; capture groups are named ``group_prefix + name``. ``lines``: segments never
        span a newline, so the regex can run over many keys joined by newlines."""
        if not self.tokens:
            return self.regex_source
        one, many = (_LINE_SEGMENT, _LINE_SEGMENTS) if lines else (_SEGMENT, _SEGMENTS)
        out: list[str] = []
        seen: set[str] = set()
        for t in self.tokens:
            if isinstance(t, str):
                out.append(re.escape(t))
            elif isinstance(t, Wildcard):
                out.append(f"(?:{many})" if t.multi else one)
            elif t.name in seen:
                out.append(f"(?P={group_prefix}{t.name})")
            else:
                seen.add(t.name)
                body = _INT if t.name in self.int_names else many if t.multi else one
                out.append(f"(?P<{group_prefix}{t.name}>{body})")
        return "".join(out)

    @cached_property
    def line_regex(self) -> re.Pattern[str]:
        """This pattern anchored to whole lines (``re.MULTILINE``), for keys joined by newlines."""
        return re.compile(f"^{self.to_regex(lines=True)}$", re.MULTILINE)

    def skeleton(self) -> tuple[int, dict[int, str]] | None:
        """``(segment count, {position: literal segment})`` when every key this pattern matches
        has a fixed number of segments; ``None`` otherwise. Used to index rules."""
        if not self.tokens or any(
            (isinstance(t, Wildcard) and t.multi) or (isinstance(t, Placeholder) and t.multi) for t in self.tokens
        ):
            return None
        segments: list[list[Token]] = [[]]
        for t in self.tokens:
            if isinstance(t, str):
                pieces = t.split(".")
                for k, piece in enumerate(pieces):
                    if k:
                        segments.append([])
                    if piece:
                        segments[-1].append(piece)
            else:
                segments[-1].append(t)
        literal = {i: seg[0] for i, seg in enumerate(segments) if len(seg) == 1 and isinstance(seg[0], str)}
        return len(segments), literal

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        return None if m is None else captures(m)

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


def captures(m: re.Match[str]) -> dict[str, str]:
    """The placeholder values of a pattern's match."""
    return {k: v for k, v in m.groupdict().items() if v is not None}


class Template:
    """A key template: literals and placeholders, some shifted (``{i+1}``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        # parse(template=True) rejects wildcards, so a template holds literals and placeholders only.
        self.tokens: tuple[str | Placeholder, ...] = tuple(
            t for t in parse(text, template=True) if not isinstance(t, Wildcard)
        )
        self.names = tuple(dict.fromkeys(t.name for t in self.tokens if isinstance(t, Placeholder)))
        self.int_names = frozenset(t.name for t in self.tokens if isinstance(t, Placeholder) and t.offset)

    def check_against(self, pattern: Pattern, where: str) -> None:
        """Every placeholder must be captured by ``pattern``; raise otherwise."""
        missing = [n for n in self.names if n not in pattern.names]
        if missing:
            raise MappingError(
                f"{where}: template {self.text!r} uses {', '.join('{' + n + '}' for n in missing)} "
                f"which pattern {pattern.text!r} does not capture"
            )

    def render(self, captures: dict[str, str], where: str | Callable[[], str] = "") -> str:
        """The key for ``captures``; ``where`` (text, or a function giving it: formatted only on error)
        prefixes error messages."""
        out: list[str] = []
        for t in self.tokens:
            if isinstance(t, str):
                out.append(t)
                continue
            value = captures[t.name]
            if t.offset:
                shifted = int(value) + t.offset
                if shifted < 0:
                    place = where() if callable(where) else where
                    raise MappingError(f"{place}: {{{t.name}{t.offset:+d}}} gives {shifted} for {t.name}={value}")
                value = str(shifted)
            out.append(value)
        return "".join(out)

    def positional_format(self) -> tuple[str, tuple[str, ...]] | None:
        """This template as a :meth:`str.format` string with ``{}`` fields, and the captures that
        fill them in order; ``None`` when it shifts a capture (``{i+1}``)."""
        parts, names = [], []
        for t in self.tokens:
            if isinstance(t, str):
                parts.append(t.replace("{", "{{").replace("}", "}}"))
            elif t.offset:
                return None
            else:
                parts.append("{}")
                names.append(t.name)
        return "".join(parts), tuple(names)

    def inverse_pattern_text(self, multi_names: frozenset[str]) -> str:
        """The pattern that matches what this template renders (``multi_names``: captures that
        span several segments in the forward pattern)."""
        parts = []
        for t in self.tokens:
            if isinstance(t, str):
                parts.append(t.replace("{", "{{").replace("}", "}}"))
            else:
                parts.append("{" + t.name + ("*" if t.name in multi_names else "") + "}")
        return "".join(parts)

    def inverse_text(self, pattern: Pattern) -> str:
        """A template that rebuilds what ``pattern`` matched, undoing this template's offsets."""
        offsets = {t.name: t.offset for t in self.tokens if isinstance(t, Placeholder) and t.offset}
        parts = []
        for t in pattern.tokens:
            if isinstance(t, str):
                parts.append(t.replace("{", "{{").replace("}", "}}"))
            elif isinstance(t, Placeholder):
                k = -offsets.get(t.name, 0)
                parts.append("{" + t.name + (f"{k:+d}" if k else "") + "}")
        return "".join(parts)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"
