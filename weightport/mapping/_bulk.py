"""Resolving many keys at once: one resolution per key *shape*, renaming in bulk.

A 100k-key checkpoint (an LLM, a mixture of experts) has a few dozen key shapes:
``model.layers.#.mlp.experts.#.proj_3.weight``, where ``#`` stands for a whole
integer segment. Under a *digit-blind* mapping, every key of one shape is decided
by the same rule in the same way, so each shape is resolved once, on its first key,
and the rest of its keys are renamed in bulk: one regex ``findall`` over all of them,
joined by newlines, for the captures, and one ``str.format`` for the new names (C speed,
no Python per key).

Why it is exact. A mapping is digit-blind when none of its patterns is a ``re:``
pattern, repeats a placeholder (a back-reference), or puts two placeholders or
wildcards side by side without a literal between them. Then an integer segment of a
key can only be consumed whole by one placeholder or wildcard (a literal that could
touch it would have to consist of digits, and segments containing such a digit
literal are not abstracted: see ``guard``), and every placeholder matches any
canonical integer (``0``, ``17``; never ``007``, which stays literal). So whether a
pattern matches, and which segments each capture spans, does not depend on the
integers' values: keys of one shape take the same rule, and their captures are
their own integer segments where the first key's were. The renaming is still
checked (it must match every key, and name the first one exactly as :meth:`Mapping.resolve`
did); anything else falls back to resolving each key on its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import chain, repeat
from typing import NamedTuple, Protocol

from weightport._tuples import rows
from weightport.mapping.pattern import Pattern, Placeholder, Wildcard, captures
from weightport.mapping.rules import Drop, Output, Resolution, Rule

_MARK = "\ue000"  # stands for an integer segment in a key's shape (private-use character)
_INT = r"(?:0|[1-9][0-9]*)"
_SMALL = 64  # below this many keys, resolving each key costs less than analysing the mapping


class _Mapping(Protocol):
    """What bulk resolution needs of a :class:`~weightport.mapping.core.Mapping` (which calls it)."""

    source_prefix: str | None

    @property
    def shape_regex(self) -> tuple[re.Pattern[str], re.Pattern[str]] | None: ...

    def strip_source_prefix(self, key: str) -> str: ...

    def resolve_stripped(self, key: str) -> Resolution: ...

    def match(self, key: str) -> tuple[int, Rule, re.Match[str]] | None: ...


class Group(NamedTuple):
    """Keys resolved alike.

    Attributes:
        positions: The keys' indices in the list given.
        rule: The rule that decided them (``None``: no rule matched, the keys keep their names).
        names: When each key feeds exactly one target by ``output`` (same ops for all): each key's
            target name, in order; else ``None``.
        output: The representative output (its ``target`` is the first key's) when ``names`` is given.
        resolutions: Otherwise, each key's :class:`Resolution`, in order.
    """

    positions: list[int]
    rule: Rule | None
    names: list[str] | None
    output: Output | None
    resolutions: list[Resolution] | None


def resolve_groups(mapping: _Mapping, keys: Sequence[str]) -> list[Group]:
    """The keys resolved group by group: one group per key shape where bulk resolution applies,
    else one group of per-key resolutions (module docstring)."""
    stripped = [mapping.strip_source_prefix(k) for k in keys] if mapping.source_prefix else list(keys)
    shapes = _shapes(mapping, stripped) if len(stripped) >= _SMALL else None
    if shapes is None:
        return [Group(list(range(len(stripped))), None, None, None, [mapping.resolve_stripped(k) for k in stripped])]
    by_shape: dict[str, list[int]] = {}
    for i, shape in enumerate(shapes):
        positions = by_shape.get(shape)
        if positions is None:
            by_shape[shape] = [i]
        else:
            positions.append(i)
    return [_resolve_group(mapping, positions, [stripped[i] for i in positions]) for positions in by_shape.values()]


def resolve_all(mapping: _Mapping, keys: Sequence[str]) -> list[Resolution]:
    """``[mapping.resolve(k) for k in keys]``, in bulk where that is exact (module docstring)."""
    out: list[Resolution] = [None] * len(keys)  # type: ignore[list-item]
    for group in resolve_groups(mapping, keys):
        if group.resolutions is not None:
            resolutions: Sequence[Resolution] = group.resolutions
        else:
            rule, o = group.rule, group.output
            assert group.names is not None and o is not None
            outputs = rows(Output, group.names, repeat(o.ops), repeat(o.part), repeat(o.dim), repeat(o.groups))
            resolutions = list(rows(Resolution, repeat(rule), zip(outputs)))
        for i, res in zip(group.positions, resolutions):
            out[i] = res
    return out


def _shapes(mapping: _Mapping, keys: list[str]) -> list[str] | None:
    """Each key with its integer segments replaced by a mark; ``None`` when bulk resolution does not
    apply (a mapping that is not digit-blind, a key holding a newline or the mark)."""
    blind = mapping.shape_regex
    if blind is None:
        return None
    text = "\n" + "\n".join(keys) + "\n"
    if text.count("\n") != len(keys) + 1 or _MARK in text:
        return None
    inner, first = blind
    return first.sub("\n" + _MARK, inner.sub("." + _MARK, text))[1:-1].split("\n")


def shape_regex(rules: Sequence[Rule]) -> tuple[re.Pattern[str], re.Pattern[str]] | None:
    """The regexes that find the integer segments a key's shape abstracts, inside and at the start
    of newline-delimited keys (a literal first character keeps the scan fast); ``None`` when the
    rules are not digit-blind (module docstring)."""
    digit_literals: set[str] = set()
    for rule in rules:
        for pattern in rule.patterns:
            if not _blind(pattern, digit_literals):
                return None
    # an integer segment that contains a digit literal of some pattern stays literal in the shape
    guard = "(?![0-9]*(?:" + "|".join(sorted(map(re.escape, digit_literals))) + "))" if digit_literals else ""
    return re.compile(rf"\.{guard}{_INT}(?=[.\n])"), re.compile(rf"\n{guard}{_INT}(?=[.\n])")


def _blind(pattern: Pattern, digit_literals: set[str]) -> bool:
    if not pattern.tokens:
        return False  # re: patterns can test digits any way they like
    names = [t.name for t in pattern.tokens if isinstance(t, Placeholder)]
    if len(names) != len(set(names)):
        return False  # a back-reference compares two captures
    after_literal = True
    for t in pattern.tokens:
        if isinstance(t, str):
            if "\n" in t:
                return False
            digit_literals.update(p for p in t.split(".") if p and p.isascii() and p.isdigit())
            after_literal = True
        elif isinstance(t, (Placeholder, Wildcard)):
            if not after_literal:
                return False  # '{a}{b}': how the two split a segment depends on its length
            after_literal = False
    return True


def _resolve_group(mapping: _Mapping, positions: list[int], keys: list[str]) -> Group:
    """The group of keys of one shape (source prefix removed)."""
    first = keys[0]
    hit = mapping.match(first)
    if hit is None:
        return Group(positions, None, keys, Output(first), None)
    index, rule, m = hit
    if isinstance(rule, Drop):
        return Group(positions, rule, None, None, [Resolution(rule, ())] * len(keys))
    if rule.per_key:
        return Group(positions, rule, None, None, [mapping.resolve_stripped(k) for k in keys])
    outputs = rule.outputs(index, captures(m))
    if len(keys) > 1:
        targets = _renamed(rule.patterns[index], rule, outputs, keys)
        if targets is not None and len(outputs) == 1:
            return Group(positions, rule, targets[0], outputs[0], None)
        if targets is not None:
            resolutions = [
                Resolution(rule, tuple(o._replace(target=t[j]) for j, o in enumerate(outputs))) for t in zip(*targets)
            ]
            return Group(positions, rule, None, None, resolutions)
    rest = [mapping.resolve_stripped(k) for k in keys[1:]]
    return Group(positions, rule, None, None, [Resolution(rule, outputs), *rest])


def _renamed(pattern: Pattern, rule: Rule, outputs: tuple[Output, ...], keys: list[str]) -> list[list[str]] | None:
    """Per output of ``rule``, the target name of every key: the captures of all keys by one
    ``findall`` over the joined keys, the names by one ``str.format``. ``None`` when a template
    shifts a capture or the result does not check out."""
    templates = rule.output_templates
    if len(templates) != len(outputs):
        return None
    regex = pattern.line_regex
    rows = regex.findall("\n".join(keys))
    if len(rows) != len(keys):
        return None
    columns: list[Sequence[str]] = [rows] if regex.groups == 1 else list(zip(*rows)) if regex.groups else []
    names_of = []
    for template, output in zip(templates, outputs):
        spec = template.positional_format()
        if spec is None:
            return None
        fmt, fields = spec
        picked = [columns[regex.groupindex[f] - 1] for f in fields]
        args = picked[0] if len(picked) == 1 else chain.from_iterable(zip(*picked))
        names = "\n".join([fmt] * len(keys)).format(*args).split("\n")
        if len(names) != len(keys) or names[0] != output.target:
            return None
        names_of.append(names)
    return names_of
