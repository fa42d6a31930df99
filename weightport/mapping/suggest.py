"""Propose a mapping between two sets of tensor names, from names and shapes alone.

:func:`suggest` pairs every target tensor with the source tensor most likely to feed it, then compresses
the pairs into a few readable rules (``layer{a}.{b}.conv1.{p}`` rather than hundreds of literal renames),
checks that the rules route every key where the pairing says, and renders a mapping file. It is a
starting point for a human: ``weightport suggest SOURCE TARGET -o my.toml``, read the file, then prove it
with a parity check.

How pairs are chosen (no tensor data is read):

1. Same name and shape: nothing to do.
2. Within each group of equal shapes, candidates are scored by (a) equal layer indices (the digit runs in
   the names), (b) the same position among the tensors of that shape on both sides (architectures that
   correspond list their tensors in the same order), and (c) similar words in the names. The best
   pairs are taken greedily.
3. Left-over targets whose first dimension is the sum of 2-4 left-over sibling sources (names that differ in
   one segment, e.g. ``query``/``key``/``value``) become ``fuse`` rules; the mirror case becomes ``split``.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any

from weightport.errors import MappingError
from weightport.mapping.core import Mapping

__all__ = ["Suggestion", "suggest"]

Shape = tuple[int, ...]
_DIGITS = re.compile(r"\d+")
_WORDS = re.compile(r"[A-Za-z]+")
_SYNONYMS = {
    "fc": "head",
    "classifier": "head",
    "heads": "head",
    "bn": "norm",
    "ln": "norm",
    "layernorm": "norm",
    "layer_norm": "norm",
    "kernel": "weight",
    "embeddings": "embed",
    "embedding": "embed",
    "proj": "proj",
    "projection": "proj",
    "attention": "attn",
    "self": "attn",
    "layers": "layer",
    "blocks": "layer",
    "block": "layer",
    "stages": "layer",
    "stage": "layer",
    "downsample": "down",
}
_FUSE_ORDERS = (("q", "k", "v"), ("query", "key", "value"), ("k", "v"), ("key", "value"), ("gate", "up"))
_MAX_PAIRS = 1_000_000  # candidate pairs scored per group of equal element count
_PLACEHOLDERS = "abcdefghijklmnoqrstuvwxyz"  # no {p}: it names the last segment


@dataclass
class Suggestion:
    """What :func:`suggest` proposes.

    Attributes:
        rules: Rule tables as a mapping file holds them (``{"rename": ..., "to": ...}``), in order.
        pairs: Target name -> the source name(s) the rules route to it.
        unmatched_targets: Target tensors nothing was found for (they would stay fresh).
        unmatched_sources: Source tensors no target needs (they would be unused).
    """

    rules: list[dict[str, Any]]
    pairs: dict[str, tuple[str, ...]]
    unmatched_targets: list[str] = field(default_factory=list)
    unmatched_sources: list[str] = field(default_factory=list)

    def mapping(self) -> Mapping:
        """The rules as a :class:`~weightport.Mapping`."""
        from weightport.mapping.files import parse_mapping

        return parse_mapping({"rule": self.rules}, "<suggested>")

    def to_toml(self, *, name: str = "suggested", source: str | None = None, target: str | None = None) -> str:
        """The suggestion as a mapping file (``weightport suggest -o``)."""
        total = len(self.pairs) + len(self.unmatched_targets)
        lines = [
            f"name = {_toml(name)}",
            f"description = {_toml(f'suggested by weightport: {len(self.pairs)} of {total} target tensors paired')}",
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in (("source", source), ("target", target)) if v]
        lines.append("# Generated from names and shapes only: read it, then prove it with a parity check.")
        for rule in self.rules:
            lines.append("\n[[rule]]")
            lines += [f"{k} = {_toml(v)}" for k, v in rule.items()]
        for title, names in (
            ("target tensors with no source (they keep their init)", self.unmatched_targets),
            ("source tensors no target uses (add drop rules to silence them)", self.unmatched_sources),
        ):
            if names:
                lines.append(f"\n# {len(names)} {title}:")
                lines += [f"#   {n}" for n in names]
        return "\n".join(lines) + "\n"


def suggest(source: Any, target: Any, *, into: str | None = None, checkpoint_key: str | None = None) -> Suggestion:
    """Propose rules that route ``source`` names onto ``target`` names, reading no tensor data.

    Args:
        source: Anything :func:`weightport.open_source` accepts (a file, folder, spec, state dict, module),
            or a mapping of name -> shape.
        target: The model to load into (an ``nn.Module``, meta-built is fine), or a mapping of name -> shape.
        into: Suggest for this submodule of ``target`` only.
        checkpoint_key: Key of the weights inside a nested checkpoint.

    Returns:
        A :class:`Suggestion` whose rules were checked to route every paired source key to its target.
    """
    src = _source_shapes(source, checkpoint_key)
    tgt = _target_shapes(target, into)
    exact = {t: t for t in tgt if src.get(t) == tgt[t]}
    left_src = {k: v for k, v in src.items() if k not in exact}
    left_tgt = {k: v for k, v in tgt.items() if k not in exact}
    # Many-to-one first: one-to-one pairing would otherwise spend q/k/v on look-alike tensors.
    fused = _pair_fused(left_src, left_tgt)
    split = _pair_fused(left_tgt, left_src)  # source -> the targets it splits into
    taken_src = {s for parts in fused.values() for s in parts} | set(split)
    taken_tgt = set(fused) | {t for ts in split.values() for t in ts}
    pairs = _pair_by_shape(
        {k: v for k, v in left_src.items() if k not in taken_src},
        {k: v for k, v in left_tgt.items() if k not in taken_tgt},
    )
    reshaped = {t: s for t, s in pairs.items() if src[s] != tgt[t]}
    pairs = {t: s for t, s in pairs.items() if t not in reshaped}
    rules = _compress(pairs, reshaped) + _compress_many(fused, "fuse") + _compress_split(split)
    rules = _repair(rules, src, {**exact, **pairs, **reshaped}, fused, split)
    routed: dict[str, tuple[str, ...]] = {t: (s,) for t, s in {**exact, **pairs, **reshaped}.items()}
    routed.update(fused)
    for s, ts in split.items():
        routed.update({t: (s,) for t in ts})
    used = {s for ss in routed.values() for s in ss}
    return Suggestion(
        rules=rules,
        pairs=routed,
        unmatched_targets=[t for t in tgt if t not in routed],
        unmatched_sources=[s for s in src if s not in used],
    )


def _is_shapes(obj: Any) -> bool:
    return isinstance(obj, MappingABC) and all(
        isinstance(v, (tuple, list)) and all(isinstance(d, int) for d in v) for v in obj.values()
    )


def _source_shapes(source: Any, checkpoint_key: str | None) -> dict[str, Shape]:
    if _is_shapes(source):
        return {k: tuple(v) for k, v in source.items()}
    from weightport.sources import open_source

    src = open_source(source, checkpoint_key=checkpoint_key)
    return {k: tuple(src.meta(k).shape) for k in src}


def _target_shapes(target: Any, into: str | None) -> dict[str, Shape]:
    if _is_shapes(target):
        return {k: tuple(v) for k, v in target.items()}
    from weightport.planning.targets import collect_targets, scope_of

    found = collect_targets(scope_of(target, into))
    return {n: tuple(t.tensor.shape) for n, t in found.items() if t.canonical == n}


# -- pairing one to one --------------------------------------------------------------------------


def _pair_by_shape(src: dict[str, Shape], tgt: dict[str, Shape]) -> dict[str, str]:
    """Target -> source, within groups of equal element count (equal shapes preferred; ``(C, 1, 1)`` can
    feed ``(C,)`` through a reshape, a linear layer a 1x1 convolution)."""
    by_numel: dict[int, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for k, shape in src.items():
        by_numel[math.prod(shape)][0].append(k)
    for k, shape in tgt.items():
        by_numel[math.prod(shape)][1].append(k)
    # A safetensors file lists names sorted: then the source's order carries no signal.
    ordered = len(src) < 3 or list(src) != sorted(src)
    out: dict[str, str] = {}
    for s_names, t_names in by_numel.values():
        if s_names and t_names:
            out.update(_greedy(s_names, t_names, src, tgt, ordered))
    return out


def _greedy(
    s_names: list[str], t_names: list[str], src: dict[str, Shape], tgt: dict[str, Shape], ordered: bool
) -> dict[str, str]:
    if len(s_names) * len(t_names) > _MAX_PAIRS:  # LLM / MoE scale: compare only names with equal indices
        return _greedy_by_index(s_names, t_names, src, tgt, ordered)
    scored = []
    for j, t in enumerate(t_names):
        for i, s in enumerate(s_names):
            same_slot = ordered and len(s_names) == len(t_names) and i == j
            score = _score(s, t, i / len(s_names) if ordered else -1.0, j / len(t_names), same_slot)
            scored.append((-(score + (1.0 if src[s] == tgt[t] else 0.0)), j, i))
    scored.sort()
    out: dict[str, str] = {}
    taken: set[int] = set()
    for _, j, i in scored:
        if t_names[j] not in out and i not in taken:
            out[t_names[j]] = s_names[i]
            taken.add(i)
    return out


def _greedy_by_index(
    s_names: list[str], t_names: list[str], src: dict[str, Shape], tgt: dict[str, Shape], ordered: bool
) -> dict[str, str]:
    s_by: dict[tuple[str, ...], list[str]] = defaultdict(list)
    t_by: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for n in s_names:
        s_by[tuple(_ints(n))].append(n)
    for n in t_names:
        t_by[tuple(_ints(n))].append(n)
    out: dict[str, str] = {}
    for key, ts in t_by.items():
        ss = s_by.get(key, [])
        if ss and len(ss) * len(ts) <= _MAX_PAIRS:
            out.update(_greedy(ss, ts, src, tgt, ordered))
    return out


def _score(s: str, t: str, s_rank: float, t_rank: float, same_slot: bool) -> float:
    ints_s, ints_t = _ints(s), _ints(t)
    ints = _common_prefix(ints_s, ints_t) / len(ints_s) if ints_s and len(ints_s) == len(ints_t) else 0.0
    order = 1.0 if same_slot else max(0.0, 1.0 - 4 * abs(s_rank - t_rank))
    if s_rank < 0:  # the source's order says nothing (a safetensors file lists its names sorted)
        order = 0.0
    last = 2.0 if _words(s.rsplit(".", 1)[-1]) == _words(t.rsplit(".", 1)[-1]) else 0.0
    return 2.0 * ints + order + last + 2.0 * _similarity(s, t)


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@functools.lru_cache(maxsize=1 << 16)
def _ints(name: str) -> list[str]:
    return _DIGITS.findall(name)


@functools.lru_cache(maxsize=1 << 16)
def _words(name: str) -> Counter[str]:
    return Counter(_SYNONYMS.get(w, w) for w in _WORDS.findall(name.lower()))


def _similarity(a: str, b: str) -> float:
    """Dice coefficient of the two names' words (digits left out, synonyms folded)."""
    wa, wb = _words(a), _words(b)
    total = wa.total() + wb.total()
    return 2 * (wa & wb).total() / total if total else 0.0


# -- pairing many to one (fuse) ------------------------------------------------------------------


def _pair_fused(parts: dict[str, Shape], whole: dict[str, Shape]) -> dict[str, tuple[str, ...]]:
    """``whole`` name -> the 2-4 sibling ``parts`` names that concatenate (dim 0) into it, in order."""
    siblings: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for name in parts:
        segs = name.split(".")
        for i in range(len(segs)):
            siblings[(*segs[:i], "*", *segs[i + 1 :])].append(name)
    out: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for key, names in sorted(siblings.items(), key=lambda kv: -len(kv[1])):
        group = _ordered(key, names)
        if group is None or used & set(group):
            continue
        shapes = [parts[n] for n in group]
        if len({s[1:] for s in shapes}) != 1 or any(not s for s in shapes):
            continue
        fused_shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        best = _best_whole(".".join(key), fused_shape, whole, out)
        if best is not None:
            out[best] = group
            used.update(group)
    return out


def _ordered(key: tuple[str, ...], names: list[str]) -> tuple[str, ...] | None:
    if not 2 <= len(names) <= 8:
        return None
    slot = key.index("*")
    by_part = _distinct_parts({n.split(".")[slot]: n for n in names})
    for order in _FUSE_ORDERS:
        if set(order) <= set(by_part):
            return tuple(by_part[p] for p in order)
    return None


def _distinct_parts(by_segment: dict[str, str]) -> dict[str, str]:
    """``{"q_proj": .., "k_proj": ..}`` -> ``{"q": .., "k": ..}``: drop the text all segments share."""
    segs = list(by_segment)
    prefix = min(_common_prefix(list(segs[0]), list(x)) for x in segs)
    suffix = min(_common_prefix(list(segs[0][::-1]), list(x[::-1])) for x in segs)
    out = {}
    for seg, name in by_segment.items():
        core = seg[prefix : len(seg) - suffix if suffix else None].strip("_")
        out[core.lower()] = name
    return out if all(out) and len(out) == len(by_segment) else by_segment


def _best_whole(pattern: str, shape: Shape, whole: dict[str, Shape], taken: dict[str, Any]) -> str | None:
    cands = [t for t, s in whole.items() if s == shape and t not in taken]
    if not cands:
        return None
    ints = _ints(pattern)
    return max(cands, key=lambda t: (2.0 if _ints(t) == ints else 0.0) + _similarity(pattern, t))


# -- compressing pairs into rules -----------------------------------------------------------------


def _abstract(src: Sequence[str], tgt: str, level: str = "all") -> tuple[tuple[str, ...], str, dict[str, str]]:
    """Replace the digit runs ``tgt`` shares with ``src`` (and a shared last segment) by placeholders.

    Each digit run of the first source gets its own placeholder; a target run takes the first unused
    source run of equal value, in order, so ``encoder_layer_3.ln_1`` -> ``blocks.3.norm1`` becomes
    ``encoder_layer_{a}.ln_{b}`` -> ``blocks.{a}.norm{b}``.
    """
    if level == "literal":
        return tuple(_escape(s) for s in src), _escape(tgt), {}
    runs = [m.group() for m in _DIGITS.finditer(src[0])][: len(_PLACEHOLDERS)]
    chosen: dict[int, str] = {}  # source run index -> placeholder
    t_parts: list[str] = []
    pos = 0
    for m in _DIGITS.finditer(tgt):
        t_parts.append(_escape(tgt[pos : m.start()]))
        pos = m.end()
        free = [i for i, v in enumerate(runs) if v == m.group() and i not in chosen]
        later = [i for i in free if i > max(chosen, default=-1)]
        if free:
            i = (later or free)[0]
            chosen[i] = _PLACEHOLDERS[i]
            t_parts.append("{" + chosen[i] + "}")
        else:
            t_parts.append(m.group())
    t_tpl = "".join(t_parts) + _escape(tgt[pos:])
    s_tpls = tuple(_substitute(s, runs, chosen) for s in src)
    last_s = {s.rsplit(".", 1)[-1] for s in src}
    last_t = tgt.rsplit(".", 1)[-1]
    if (
        level == "all"
        and last_s == {last_t}
        and not _DIGITS.search(last_t)
        and "." in tgt
        and all("." in s for s in src)
    ):
        s_tpls = tuple(t.rsplit(".", 1)[0] + ".{p}" for t in s_tpls)
        t_tpl = t_tpl.rsplit(".", 1)[0] + ".{p}"
    return s_tpls, t_tpl, {chosen[i]: runs[i] for i in chosen}


def _substitute(name: str, runs: list[str], chosen: dict[int, str]) -> str:
    out: list[str] = []
    pos = 0
    for i, m in enumerate(_DIGITS.finditer(name)):
        out.append(_escape(name[pos : m.start()]))
        pos = m.end()
        same = i < len(runs) and runs[i] == m.group()
        out.append("{" + chosen[i] + "}" if same and i in chosen else m.group())
    return "".join(out) + _escape(name[pos:])


def _generalise(groups: dict[tuple[tuple[str, ...], str], list[dict[str, str]]]) -> list[tuple[tuple[str, ...], str]]:
    """Inline placeholders that take one value only across their group; keep the rest."""
    out = []
    for (s_tpls, t_tpl), bindings in groups.items():
        fixed = {n for n in bindings[0] if len({b[n] for b in bindings}) == 1}

        def inline(tpl: str, b: dict[str, str] = bindings[0], fixed: set[str] = fixed) -> str:
            return re.sub(r"\{([a-z])\}", lambda m: b[m.group(1)] if m.group(1) in fixed else m.group(0), tpl)

        out.append((tuple(inline(s) for s in s_tpls), inline(t_tpl)))
    return out


def _grouped(pairs: Iterable[tuple[Sequence[str], str]]) -> list[tuple[tuple[str, ...], str]]:
    """Rules for ``(sources, target)`` pairs: general where pairs share a shape of name, literal where
    generalising would make two rules write one target."""
    todo = list(pairs)
    rules: list[tuple[tuple[str, ...], str]] = []
    for level in ("all", "no-p", "literal"):
        groups: dict[tuple[tuple[str, ...], str], list[dict[str, str]]] = defaultdict(list)
        members: dict[tuple[tuple[str, ...], str], list[tuple[Sequence[str], str]]] = defaultdict(list)
        for srcs, tgt in todo:
            s_tpls, t_tpl, values = _abstract(srcs, tgt, level)
            groups[(s_tpls, t_tpl)].append(values)
            members[(s_tpls, t_tpl)].append((srcs, tgt))
        made = _generalise(groups)
        writers: dict[str, list[int]] = defaultdict(list)
        for i, (_, t_tpl) in enumerate(rules + made):
            writers[_shape_of(t_tpl)].append(i)
        clash = {i - len(rules) for ids in writers.values() if len(ids) > 1 for i in ids if i >= len(rules)}
        if level == "literal":
            clash = set()
        keys = list(groups)
        rules += [r for i, r in enumerate(made) if i not in clash]
        todo = [p for i in sorted(clash) for p in members[keys[i]]]
    # The most specific rules first: fewer placeholders, then longer literal text.
    return sorted(dict.fromkeys(rules), key=lambda r: (r[1].count("{"), -len(r[1])))


def _shape_of(template: str) -> str:
    return re.sub(r"\{[a-z]\}", "{}", template.rstrip("\x00"))


def _compress(renamed: dict[str, str], reshaped: dict[str, str]) -> list[dict[str, Any]]:
    """Rename rules for ``renamed``, reshape transforms for ``reshaped`` (both target -> source)."""
    marker = "\x00"  # keeps the two kinds in separate groups; never part of a tensor name
    pairs = [((s,), t) for t, s in renamed.items()] + [((s,), t + marker) for t, s in reshaped.items()]
    out: list[dict[str, Any]] = []
    for (s,), t in _grouped(pairs):
        if t.endswith(marker):
            out.append({"transform": s, "to": t[: -len(marker)], "op": "reshape"})
        elif s != t:
            out.append({"rename": s, "to": t})
    return out


def _compress_many(fused: dict[str, tuple[str, ...]], kind: str) -> list[dict[str, Any]]:
    return [{kind: list(s), "to": t} for s, t in _grouped((s, t) for t, s in fused.items())]


def _compress_split(split: dict[str, tuple[str, ...]]) -> list[dict[str, Any]]:
    # Abstract from the parts' side (they carry the indices), then swap roles back.
    grouped = _grouped((ts, s) for s, ts in split.items())
    return [{"split": whole, "to": list(parts), "dim": 0} for parts, whole in grouped]


# -- checking the rules route what the pairing says -------------------------------------------------


def _repair(
    rules: list[dict[str, Any]],
    src: dict[str, Shape],
    pairs: dict[str, str],
    fused: dict[str, tuple[str, ...]],
    split: dict[str, tuple[str, ...]],
) -> list[dict[str, Any]]:
    """Prepend literal rules for every source key the general rules would send elsewhere."""
    want: dict[str, tuple[str, ...] | None] = dict.fromkeys(src)
    for t, s in pairs.items():
        want[s] = (t,)
    for s, ts in split.items():
        want[s] = tuple(ts)
    in_fuse = {s for parts in fused.values() for s in parts}
    for _ in range(3):
        mapping = _build(rules)
        fixes: list[dict[str, Any]] = []
        for key, goal in want.items():
            if key in in_fuse:
                continue
            got = tuple(o.target for o in mapping.resolve(key).outputs)
            if goal is not None and got != goal:
                fixes.append({"rename": _escape(key), "to": _escape(goal[0])} if len(goal) == 1 else {})
            elif goal is None and got != (key,) and got:
                fixes.append({"rename": _escape(key), "to": _escape(key)})
        fixes = [f for f in fixes if f]
        if not fixes:
            return rules
        rules = fixes + rules
    return rules


def _build(rules: list[dict[str, Any]]) -> Mapping:
    from weightport.mapping.files import parse_mapping

    try:
        return parse_mapping({"rule": rules}, "<suggested>")
    except MappingError as e:  # pragma: no cover - a bug in the generator, not in the user's input
        raise MappingError(f"weightport suggest produced an invalid mapping ({e}); please report it") from e


def _escape(name: str) -> str:
    return name.replace("{", "{{").replace("}", "}}")


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)
