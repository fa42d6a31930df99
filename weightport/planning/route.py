"""Routing: where each source key goes, by names alone (no shape, no tensor).

Every source key is resolved by the mapping (in bulk, once per key shape: see
:mod:`weightport.mapping._bulk`) into the target names it feeds. The result is a
:class:`Routes`: every target name's candidates in source order, the keys dropped by a
rule, and why keys that feed no target tensor are unused. Modules that rename keys in
their own loading hooks are replayed here (:mod:`weightport._hooks`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter
from typing import Any, NamedTuple

from torch import nn

from weightport._hooks import HookConsumed, replay
from weightport._tuples import rows
from weightport.mapping._bulk import Group
from weightport.mapping.core import Mapping as WeightMapping
from weightport.mapping.rules import Drop, Output, Rule, Split, Unstack
from weightport.planning.data import Target
from weightport.sources.base import Source

__all__ = ["Candidate", "Routes", "route"]


class Candidate(NamedTuple):
    """One source key feeding one target name.

    Attributes:
        key: The source key.
        rule: The rule that routed it (``None``: same name).
        output: The target name, with the ops for this key alone and its part of a fuse.
        position: The key's index in the source (candidates are kept in source order).
    """

    key: str
    rule: Rule | None
    output: Output
    position: int


@dataclass
class Routes:
    """Every source key's destination.

    Attributes:
        single: Target names fed by exactly one candidate.
        multi: Target names fed by several, in source order (a fuse, or a collision).
        dropped: Keys a drop rule removed, in source order.
        nowhere: Keys that feed no target tensor, with the first name they would have fed.
        hits: How many keys each rule decided, by ``id(rule)``.
        consumed: Keys a target module's own loading code consumes (:class:`HookConsumed`), with
            which module: used, though they feed no target tensor.
    """

    single: dict[str, Candidate]
    multi: dict[str, list[Candidate]]
    dropped: list[str]
    nowhere: dict[str, str]
    hits: Counter[int] = field(default_factory=Counter)
    consumed: dict[str, str] = field(default_factory=dict)

    def candidates(self, name: str) -> list[Candidate] | None:
        one = self.single.get(name)
        return [one] if one is not None else self.multi.get(name)

    def fed(self) -> Iterator[str]:
        """Every source key that feeds some target tensor (a key feeding several: once each)."""
        yield from map(attrgetter("key"), self.single.values())
        for cands in self.multi.values():
            yield from (c.key for c in cands)


def route(
    source: Source,
    keys: list[str],
    mapping: WeightMapping,
    targets: Mapping[str, Target],
    scope: nn.Module,
    hooks: bool,
) -> Routes:
    """Resolve every key and sort the candidates by target name."""
    groups = mapping.resolve_groups(keys)
    cands: list[Candidate] = []
    dropped: list[tuple[int, str]] = []
    for g in groups:
        _candidates(source, keys, g, targets, cands, dropped)
    consumed: dict[str, str] = {}
    if hooks:
        cands = _replayed(source, scope, sorted(cands, key=attrgetter("position")), targets)
        consumed = {c.key: c.rule.text for c in cands if isinstance(c.rule, HookConsumed)}
        if consumed:
            cands = [c for c in cands if not isinstance(c.rule, HookConsumed)]
    names = [c.output.target for c in cands]
    present = list(map(targets.__contains__, names))
    nowhere: dict[str, str] = {}
    if not all(present):
        for c, ok in zip(cands, present):
            if not ok:
                nowhere.setdefault(c.key, c.output.target)
        cands, names = list(compress(cands, present)), list(compress(names, present))
        for c in cands:
            nowhere.pop(c.key, None)
    single = dict(zip(names, cands))
    multi: dict[str, list[Candidate]] = {}
    if len(single) != len(cands):
        for name, n in Counter(names).items():
            if n > 1:
                multi[name] = []
                del single[name]
        for c in sorted((c for c in cands if c.output.target in multi), key=attrgetter("position")):
            multi[c.output.target].append(c)
    dropped.sort()
    return Routes(single, multi, [k for _, k in dropped], nowhere, _hits(groups), consumed)


def _candidates(
    source: Source,
    keys: list[str],
    g: Group,
    targets: Mapping[str, Target],
    out: list[Candidate],
    dropped: list[tuple[int, str]],
) -> None:
    """Append the candidates of one group of keys resolved alike (in C where they feed one
    target each the same way)."""
    if g.names is not None:
        o = g.output
        assert o is not None
        outs = rows(Output, g.names, repeat(o.ops), repeat(o.part), repeat(o.dim), repeat(o.groups))
        out.extend(rows(Candidate, map(keys.__getitem__, g.positions), repeat(g.rule), outs, g.positions))
        return
    assert g.resolutions is not None
    for position, (rule, outputs) in zip(g.positions, g.resolutions):
        key = keys[position]
        if isinstance(rule, Drop):
            dropped.append((position, key))
            continue
        if isinstance(rule, Split):
            outputs = _split_sizes(source, key, rule, outputs, targets)
        elif isinstance(rule, Unstack):
            shape = source.meta(key).shape
            outputs = rule.expand(outputs[0], shape[rule.dim] if rule.dim < len(shape) else 0)
        out.extend(Candidate(key, rule, o, position) for o in outputs)


def _split_sizes(
    source: Source, key: str, rule: Split, outputs: tuple[Output, ...], targets: Mapping[str, Target]
) -> tuple[Output, ...]:
    """For a split without sizes, uneven sizes from the targets when they add up (:meth:`Split.fit`)."""
    shapes = [targets[o.target].tensor.shape if o.target in targets else None for o in outputs]
    return rule.fit(outputs, source.meta(key).shape, shapes)


def _replayed(
    source: Source, scope: nn.Module, cands: list[Candidate], targets: Mapping[str, Target]
) -> list[Candidate]:
    """The candidates with the renames that modules' own loading hooks perform."""
    routed = replay(
        scope,
        [(c.key, c.rule, c.output) for c in cands],
        _LazyMeta(source, "shape"),
        _LazyMeta(source, "dtype"),
        source.state_dict_metadata,
        targets,
    )
    return [Candidate(key, rule, out, c.position) for (key, rule, out), c in zip(routed, cands)]


class _LazyMeta(Mapping):  # type: ignore[type-arg]
    """``{key: source.meta(key).<attr>}`` computed on access: hooks look at the few keys under
    their module, so other shards stay closed."""

    def __init__(self, source: Source, attr: str) -> None:
        self._source = source
        self._attr = attr

    def __getitem__(self, key: str) -> Any:
        return getattr(self._source.meta(key), self._attr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def _hits(groups: list[Group]) -> Counter[int]:
    """How many keys each rule decided, by ``id(rule)``."""
    hits: Counter[int] = Counter()
    for g in groups:
        if g.resolutions is not None:
            hits.update(id(r.rule) for r in g.resolutions if r.rule is not None)
        elif g.rule is not None:
            hits[id(g.rule)] += len(g.positions)
    return hits
