"""Pairing modules, not tensors: a module's weight, bias, statistics and counters move together.

Tensors are grouped into *units* (the tensors one module holds directly). Source and target units are
aligned in module order by a weighted common-subsequence alignment: two units can pair when they hold the
same shapes (or shapes that differ only in size-1 dimensions, through a reshape); among alignments with
as many pairs, names decide, each word weighed by where it stands (the module's own segment counts more
than its parents, and its place among its siblings more than a word it shares with a sibling). A second
alignment pass pairs what the first left over (modules the two architectures declare in another order),
an unordered pass the rest.

A first round of those passes tells which source layer corresponds to which target layer; the second
round pairs modules only within corresponding layers, so a layer whose modules come in another order (a
sorted file lists them alphabetically) cannot lend a module to its neighbour.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from weightport.mapping.suggest._tensors import common_prefix, ints, similarity, squeezed, words

Shape = tuple[int, ...]
_SEGMENT = re.compile(r"(\d+)")
_DIGIT = re.compile(r"\d")
_MAX_CELLS = 1_500_000  # alignment table size; beyond it units pair without the order
_MAX_CANDIDATES = 1000  # units of one shape beyond which names and order cannot tell them apart


@dataclass
class Unit:
    """The tensors one module holds directly (``leaves``: the last name segment -> shape)."""

    prefix: str
    leaves: dict[str, Shape]
    place: float = 0.0  # position among the units of the same parent, 0..1
    position: float = 0.0  # position among all units, 0..1

    def key(self, leaf: str) -> str:
        return f"{self.prefix}.{leaf}" if self.prefix else leaf

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return tuple(sorted(s for s in self.leaves.values() if s))

    @property
    def loose_shapes(self) -> tuple[Shape, ...]:
        """The shapes up to size-1 dimensions (what a reshape may change; never a transpose)."""
        return tuple(sorted(squeezed(s) for s in self.leaves.values() if s))


def natural_key(name: str) -> tuple[tuple[tuple[int, int, str], ...], ...]:
    """Sort key that puts ``blocks.2`` before ``blocks.10`` and ``layer2`` before ``layer10``, segment by
    segment (so a module's tensors stay together)."""
    return tuple(
        tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _SEGMENT.split(seg) if p)
        for seg in name.split(".")
    )


def in_module_order(names: list[str]) -> list[str]:
    """``names`` in module order: a list sorted alphabetically (a safetensors file) is re-sorted by its
    layer indices; any other order is taken as the module order it is."""
    if len(names) >= 3 and names == sorted(names):
        return sorted(names, key=natural_key)
    return names


def units(shapes: dict[str, Shape]) -> list[Unit]:
    """Group tensor names by the module that holds them, in order of first appearance."""
    by_prefix: dict[str, Unit] = {}
    for name, shape in shapes.items():
        prefix, _, leaf = name.rpartition(".")
        by_prefix.setdefault(prefix, Unit(prefix, {})).leaves[leaf] = shape
    out = [u for u in by_prefix.values() if u.shapes]
    siblings: dict[str, list[Unit]] = defaultdict(list)
    for u in out:
        siblings[u.prefix.rpartition(".")[0]].append(u)
    for group in siblings.values():
        for i, u in enumerate(group):
            u.place = i / max(1, len(group) - 1)
    for i, u in enumerate(out):
        u.position = i / max(1, len(out) - 1)
    return out


Allowed = Callable[[Unit, Unit], bool]


def score(s: Unit, t: Unit, allowed: Allowed | None = None) -> float | None:
    """How well ``s`` fits ``t`` (names left out: see :func:`name_fit`); ``None`` when their tensors
    cannot pair one to one, or ``allowed`` says their layers do not correspond."""
    if allowed is not None and not allowed(s, t):
        return None
    if s.shapes == t.shapes:
        base = 10.0
    elif s.loose_shapes == t.loose_shapes:
        base = 8.0
    else:
        return None
    runs_s, runs_t = ints(s.prefix), ints(t.prefix)
    same_runs = 1.0 if runs_s == runs_t else (common_prefix(runs_s, runs_t) / max(len(runs_s), len(runs_t), 1))
    place = 1.0 - abs(s.place - t.place)
    near = max(0.0, 1.0 - 4 * abs(s.position - t.position))
    return base + same_runs + 1.5 * place + 0.5 * near


def name_fit(s: Unit, t: Unit) -> float:
    """Shared words, weighed by where they stand: the last two segments (``proj.0``, ``downsample.conv``)
    count in full, the rest of the name a third."""
    tail_s, tail_t = s.prefix.split(".")[-2:], t.prefix.split(".")[-2:]
    head_s, head_t = s.prefix.split(".")[:-2], t.prefix.split(".")[:-2]
    return similarity(".".join(tail_s), ".".join(tail_t)) + similarity(".".join(head_s), ".".join(head_t)) / 3


def _gains(src: list[Unit], tgt: list[Unit], allowed: Allowed | None) -> list[dict[int, float]]:
    """For each source unit, target index -> :func:`score` plus :func:`name_fit`, less the *regrets*:
    how much better the source's name fits its best candidate, and the target's its best (``proj.1``
    pairs with ``downsample.bn`` rather than with ``conv3.bn``, even where all norms have one shape and
    the order would allow either)."""
    by_loose: dict[tuple[Shape, ...], list[int]] = defaultdict(list)
    for j, t in enumerate(tgt):
        by_loose[t.loose_shapes].append(j)
    fits: list[dict[int, tuple[float, float]]] = []
    for s in src:
        cands = by_loose.get(s.loose_shapes, [])
        row = {}
        if len(cands) <= _MAX_CANDIDATES:
            for j in cands:
                got = score(s, tgt[j], allowed)
                if got is not None:
                    row[j] = (got, name_fit(s, tgt[j]))
        fits.append(row)
    top_t: dict[int, float] = defaultdict(float)
    for row in fits:
        for j, (_, fit) in row.items():
            top_t[j] = max(top_t[j], fit)
    out = []
    for row in fits:
        top_s = max((fit for _, fit in row.values()), default=0.0)
        out.append({j: got + 2 * fit - (top_s - fit) - (top_t[j] - fit) for j, (got, fit) in row.items()})
    return out


def align(src: list[Unit], tgt: list[Unit], allowed: Allowed | None = None) -> list[tuple[Unit, Unit]]:
    """The order-preserving pairing of ``src`` with ``tgt`` of greatest total :func:`score`."""
    n, m = len(src), len(tgt)
    if not n or not m:
        return []
    if n * m > _MAX_CELLS:
        return unordered(src, tgt, allowed)
    gain = _gains(src, tgt, allowed)
    best = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        prev, cur, row = best[i - 1], best[i], gain[i - 1]
        for j in range(1, m + 1):
            v = prev[j] if prev[j] > cur[j - 1] else cur[j - 1]
            g = row.get(j - 1)
            if g is not None and prev[j - 1] + g > v:
                v = prev[j - 1] + g
            cur[j] = v
    out: list[tuple[Unit, Unit]] = []
    i, j = n, m
    while i and j:
        g = gain[i - 1].get(j - 1)
        if g is not None and best[i][j] == best[i - 1][j - 1] + g:
            out.append((src[i - 1], tgt[j - 1]))
            i, j = i - 1, j - 1
        elif best[i][j] == best[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def unordered(src: list[Unit], tgt: list[Unit], allowed: Allowed | None = None) -> list[tuple[Unit, Unit]]:
    """Best-first pairing, order ignored (what the alignments could not place)."""
    scored = [(-got, i, j) for i, row in enumerate(_gains(src, tgt, allowed)) for j, got in row.items()]
    scored.sort(key=lambda x: x[:3])
    out: list[tuple[Unit, Unit]] = []
    used_s: set[str] = set()
    used_t: set[str] = set()
    for _, i, j in scored:
        s, t = src[i], tgt[j]
        if s.prefix not in used_s and t.prefix not in used_t:
            out.append((s, t))
            used_s.add(s.prefix)
            used_t.add(t.prefix)
    return out


def pair_units(src: list[Unit], tgt: list[Unit]) -> list[tuple[Unit, Unit]]:
    """Module pairs: a first round of passes finds which source layer corresponds to which target layer
    (by majority); a second round pairs modules only within corresponding layers; a last unordered pass
    pairs what is left wherever it fits."""
    first = _passes(src, tgt, None)
    layer_s, layer_t = layers(src), layers(tgt)
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for s, t in first:
        votes[layer_s[s.prefix]][layer_t[t.prefix]] += 1
    mapped = {layer: counts.most_common(1)[0][0] for layer, counts in votes.items()}

    def allowed(s: Unit, t: Unit) -> bool:
        return mapped.get(layer_s[s.prefix], layer_t[t.prefix]) == layer_t[t.prefix]

    out = _passes(src, tgt, allowed)
    return out + _passes(*_left(src, tgt, out), None, steps=(unordered,))


def _left(src: list[Unit], tgt: list[Unit], done: list[tuple[Unit, Unit]]) -> tuple[list[Unit], list[Unit]]:
    taken_s = {s.prefix for s, _ in done}
    taken_t = {t.prefix for _, t in done}
    return [u for u in src if u.prefix not in taken_s], [u for u in tgt if u.prefix not in taken_t]


def _passes(
    src: list[Unit],
    tgt: list[Unit],
    allowed: Allowed | None,
    steps: tuple[Callable[[list[Unit], list[Unit], Allowed | None], list[tuple[Unit, Unit]]], ...] = (
        align,
        align,
        unordered,
    ),
) -> list[tuple[Unit, Unit]]:
    """Two alignments, then an unordered pass, each on what the previous left."""
    out: list[tuple[Unit, Unit]] = []
    for step in steps:
        out += step(*_left(src, tgt, out), allowed)
    return out


def layers(us: list[Unit]) -> dict[str, str]:
    """Unit prefix -> the layer it belongs to: its deepest ancestor (or itself) whose name carries an index
    and whose subtree holds modules of three kinds or more (``blocks.3``, ``s2.b1``, ``block2-0``;
    not ``conv1``, which holds a convolution and its norm); ``""`` outside any layer."""
    kinds: dict[str, set[tuple[Shape, ...]]] = defaultdict(set)
    for u in us:
        segs = u.prefix.split(".")
        for i in range(1, len(segs) + 1):
            kinds[".".join(segs[:i])].add(u.shapes)
    out: dict[str, str] = {}
    for u in us:
        segs = u.prefix.split(".")
        heads = (".".join(segs[:i]) for i in range(len(segs), 0, -1) if _DIGIT.search(segs[i - 1]))
        out[u.prefix] = next((h for h in heads if len(kinds[h]) >= 3), "")
    return out


def pair_leaves(s: Unit, t: Unit) -> dict[str, str]:
    """Target key -> source key within one module pair: equal leaf names first, then equal shapes (the
    leaf whose words match best), then equal element counts; scalars only by equal leaf name."""
    out: dict[str, str] = {}
    free = dict(s.leaves)
    for same_shape in (True, False):
        for leaf, shape in t.leaves.items():
            if t.key(leaf) in out:
                continue
            if not shape:
                cands = [leaf] if free.get(leaf) == shape else []
            elif same_shape:
                cands = [x for x, sh in free.items() if sh == shape]
            else:
                cands = [x for x, sh in free.items() if sh and squeezed(sh) == squeezed(shape)]
            if cands:
                pick = max(cands, key=lambda x: (x == leaf, similarity(x, leaf), words(x) == words(leaf)))
                out[t.key(leaf)] = s.key(pick)
                del free[pick]
    return out
