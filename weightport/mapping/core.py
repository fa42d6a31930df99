"""The :class:`Mapping`: an ordered list of rules, compiled once into an index.

The first rule whose pattern matches a key decides it; keys no rule matches
keep their name. Resolving is pure (names in, names and ops out) and fast: rules
are indexed by their literal segments, so each key tries only the few rules that
could match it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from typing import Any

from weightport.errors import MappingError
from weightport.mapping._bulk import Group, resolve_all, resolve_groups, shape_regex
from weightport.mapping.pattern import captures
from weightport.mapping.rules import Output, Resolution, Rule, Tie

__all__ = ["Mapping", "Resolution"]


class _Index:
    """Candidate lookup by fixed segment count and literal segments.

    Patterns with a fixed segment count are found by their literal segments; patterns of
    variable length that start with a literal segment (``strip_prefix("model.")``) by that
    first segment; only the rest (``**.bias``, ``re:``) are tried for every key.
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.alternatives: list[tuple[int, int, Rule]] = []  # (pattern index in rule, rule order, rule)
        self.fixed: dict[int, dict[tuple[int, ...], dict[tuple[str, ...], list[int]]]] = {}
        self.by_head: dict[str, list[int]] = {}
        self.variable: list[int] = []
        for order, rule in enumerate(rules):
            for index, pattern in enumerate(rule.patterns):
                alt = len(self.alternatives)
                self.alternatives.append((index, order, rule))
                skeleton = pattern.skeleton()
                if skeleton is None:
                    head = _head(pattern.tokens)
                    if head is None:
                        self.variable.append(alt)
                    else:
                        self.by_head.setdefault(head, []).append(alt)
                    continue
                count, literal = skeleton
                positions = tuple(sorted(literal))
                table = self.fixed.setdefault(count, {}).setdefault(positions, {})
                table.setdefault(tuple(literal[p] for p in positions), []).append(alt)

    def candidates(self, key: str) -> Iterable[int]:
        segments = key.split(".")
        found: list[int] = []
        for positions, table in self.fixed.get(len(segments), _EMPTY).items():
            hit = table.get(tuple([segments[p] for p in positions]))
            if hit:
                found.extend(hit)
        hit = self.by_head.get(segments[0])
        if hit:
            found.extend(hit)
        if self.variable:
            found.extend(self.variable)
        if len(found) > 1:
            found.sort()
        return found


_EMPTY: dict = {}


def _head(tokens: Sequence[object]) -> str | None:
    """The literal first segment every key matching ``tokens`` starts with, if the pattern fixes one."""
    if not tokens or not isinstance(tokens[0], str) or "." not in tokens[0]:
        return None
    head = tokens[0].split(".", 1)[0]
    return head or None


class Mapping:
    """An ordered set of rules that renames (and transforms) source keys.

    Args:
        rules: Rules in priority order; the first that matches a key decides it.
        name: Registry name (mapping files).
        description: One line for humans.
        source: The architecture the source side was verified on (a spec such as ``timm:resnet50``).
        source_file: The weights file a suggested mapping was made from, when the source was a file
            rather than an architecture (``weightport suggest w.safetensors TARGET``).
        atol: The largest output difference ``weightport verify`` accepts for this mapping (default 1e-4).
        target: The architecture the target side was verified on.
        verified: Every variant the shipped parity test checks (mapping files' ``verified``).
        source_prefix: Removed from source keys that start with it before the rules apply
            (``"vit."``: one mapping reads both Hugging Face base-model and task-model files).
        path: The file it was loaded from.

    Example:
        >>> m = wp.Mapping([wp.strip_prefix("backbone."), wp.drop("head.**")])
        >>> m.resolve("backbone.conv1.weight").outputs[0].target
        'conv1.weight'
    """

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        name: str | None = None,
        description: str | None = None,
        source: str | None = None,
        target: str | None = None,
        verified: Sequence[str] = (),
        source_prefix: str | None = None,
        path: str | None = None,
        source_file: str | None = None,
        atol: float | None = None,
    ) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        for r in self.rules:
            if not isinstance(r, Rule):
                raise MappingError(f"a mapping holds rules (wp.rename, wp.drop …), not {r!r}")
        if source_prefix is not None and (
            not isinstance(source_prefix, str) or not source_prefix or any(c in source_prefix for c in "{}*")
        ):
            raise MappingError(f"source_prefix must be a non-empty literal string, not {source_prefix!r}")
        self.name = name
        self.description = description
        self.source = source
        self.target = target
        self.verified = tuple(verified)
        self.source_prefix = source_prefix
        self.path = path
        self.source_file = source_file
        self.atol = atol
        self._index = _Index(self.rules)

    def _fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "target": self.target,
            "verified": self.verified,
            "source_prefix": self.source_prefix,
            "path": self.path,
            "source_file": self.source_file,
            "atol": self.atol,
        }

    def resolve(self, key: str) -> Resolution:
        """Where ``key`` goes. Pure: names in, names and ops out.

        A ``source_prefix`` is removed from keys that carry it before the rules see them.
        """
        return self.resolve_stripped(self.strip_source_prefix(key))

    def resolve_all(self, keys: Sequence[str]) -> list[Resolution]:
        """``[self.resolve(k) for k in keys]``, computed once per key shape where that is exact.

        Keys that differ only in integer segments (``layers.3.mlp``, ``layers.17.mlp``) are
        decided by the same rule in the same way, so a 100k-key checkpoint costs a few
        resolutions plus one regex substitution per shape (see :mod:`weightport.mapping._bulk`).
        """
        return resolve_all(self, keys)

    @cached_property
    def shape_regex(self) -> tuple[re.Pattern[str], re.Pattern[str]] | None:
        """Finds the integer segments that bulk resolution abstracts; ``None`` when it does not apply."""
        return shape_regex(self.rules)

    def resolve_groups(self, keys: Sequence[str]) -> list[Group]:
        """:meth:`resolve_all`, grouped: keys resolved alike, with their target names in one list
        where each feeds one target the same way (what planning 100k keys works with)."""
        return resolve_groups(self, keys)

    def strip_source_prefix(self, key: str) -> str:
        if self.source_prefix and key.startswith(self.source_prefix):
            return key[len(self.source_prefix) :]
        return key

    def resolve_stripped(self, key: str) -> Resolution:
        """:meth:`resolve` for a key whose ``source_prefix`` is already removed."""
        hit = self.match(key)
        if hit is None:
            return Resolution(None, (Output(key),))
        index, rule, m = hit
        return Resolution(rule, rule.outputs(index, captures(m)))

    def match(self, key: str) -> tuple[int, Rule, re.Match[str]] | None:
        """The first rule matching ``key`` (source prefix removed): ``(pattern index, rule, match)``."""
        for alt in self._index.candidates(key):
            index, _order, rule = self._index.alternatives[alt]
            m = rule.patterns[index].regex.fullmatch(key)
            if m is not None:
                return index, rule, m
        return None

    @cached_property
    def ties(self) -> dict[str, Tie]:
        """The tie rules by the target they fill (the first for a target wins)."""
        out: dict[str, Tie] = {}
        for r in self.rules:
            if isinstance(r, Tie):
                out.setdefault(r.target, r)
        return out

    def facts(self) -> frozenset[str]:
        """The model facts (``"$heads"`` …) the rules' parameters name."""
        return frozenset().union(*(r.facts() for r in self.rules)) if self.rules else frozenset()

    def bind(self, facts: dict[str, int]) -> Mapping:
        """This mapping with every model fact in its rules replaced by its value."""
        if not self.facts():
            return self
        return Mapping([r.bind(facts) for r in self.rules], **self._fields())

    def with_rules(self, rules: Iterable[Rule]) -> Mapping:
        """A mapping whose ``rules`` come before this mapping's own."""
        extra = tuple(rules)
        if not extra:
            return self
        return Mapping(extra + self.rules, **self._fields())

    def inverse(self) -> Mapping:
        """The mapping from target names back to source names.

        Renames invert with their ops, splits become fuses and fuses splits; drops have
        nothing to undo and are left out. A ``source_prefix`` is optional on the way in, so
        the inverse writes names without it (Hugging Face loaders accept both forms).

        Raises:
            MappingError: a rule cannot be inverted (anonymous wildcards, ``re:``, an op
                without inverse, a capture the template does not use); the message names it.
        """
        inverted = [inv for r in self.rules if (inv := r.inverse()) is not None]
        fields = self._fields()
        fields.update(
            name=_swap_name(self.name),
            source=self.target,
            target=self.source,
            source_prefix=None,
            path=None,
        )
        return Mapping(inverted, **fields)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"<Mapping {self.name or ''} {len(self.rules)} rules>".replace("  ", " ")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "target": self.target,
            "verified": list(self.verified),
            "source_prefix": self.source_prefix,
            "source_file": self.source_file,
            "atol": self.atol,
            "rules": [r.described() for r in self.rules],
        }


def _swap_name(name: str | None) -> str | None:
    if name and "->" in name:
        a, b = name.split("->", 1)
        return f"{b}->{a}"
    return name
