"""Pairing tensor by tensor: what module pairing leaves over, and siblings that concatenate (fuse/split)."""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

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
# Words with two senses: a projection shortcut is what other zoos call ``downsample``.
_SENSES = {"proj": ("proj", "down"), "shortcut": ("down",)}
_FUSE_ORDERS = (("q", "k", "v"), ("query", "key", "value"), ("k", "v"), ("key", "value"), ("gate", "up"))
_MAX_PAIRS = 1_000_000  # candidate pairs scored per group of equal element count


def squeezed(shape: Shape) -> Shape:
    """``shape`` without its size-1 dimensions: what a reshape may change."""
    return tuple(d for d in shape if d != 1)


# -- pairing one to one --------------------------------------------------------------------------


def pair_by_shape(src: dict[str, Shape], tgt: dict[str, Shape]) -> dict[str, str]:
    """Target -> source, within groups of equal shape up to size-1 dimensions (equal shapes preferred;
    ``(C, 1, 1)`` can feed ``(C,)`` through a reshape, a linear layer a 1x1 convolution; a transpose
    is never guessed)."""
    by_numel: dict[Shape, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for k, shape in src.items():
        by_numel[squeezed(shape)][0].append(k)
    for k, shape in tgt.items():
        by_numel[squeezed(shape)][1].append(k)
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
        s_by[tuple(ints(n))].append(n)
    for n in t_names:
        t_by[tuple(ints(n))].append(n)
    out: dict[str, str] = {}
    for key, ts in t_by.items():
        ss = s_by.get(key, [])
        if ss and len(ss) * len(ts) <= _MAX_PAIRS:
            out.update(_greedy(ss, ts, src, tgt, ordered))
    return out


def _score(s: str, t: str, s_rank: float, t_rank: float, same_slot: bool) -> float:
    ints_s, ints_t = ints(s), ints(t)
    same = common_prefix(ints_s, ints_t) / len(ints_s) if ints_s and len(ints_s) == len(ints_t) else 0.0
    order = 1.0 if same_slot else max(0.0, 1.0 - 4 * abs(s_rank - t_rank))
    if s_rank < 0:  # the source's order says nothing (a safetensors file lists its names sorted)
        order = 0.0
    last = 2.0 if words(s.rsplit(".", 1)[-1]) == words(t.rsplit(".", 1)[-1]) else 0.0
    return 2.0 * same + order + last + 2.0 * similarity(s, t)


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@functools.lru_cache(maxsize=1 << 16)
def ints(name: str) -> list[str]:
    return _DIGITS.findall(name)


@functools.lru_cache(maxsize=1 << 16)
def words(name: str) -> Counter[str]:
    found = [_SYNONYMS.get(w, w) for w in _WORDS.findall(name.lower())]
    return Counter(sense for w in found for sense in _SENSES.get(w, (w,)))


def similarity(a: str, b: str) -> float:
    """Dice coefficient of the two names' words (digits left out, synonyms folded)."""
    wa, wb = words(a), words(b)
    total = wa.total() + wb.total()
    return 2 * (wa & wb).total() / total if total else 0.0


# -- pairing many to one (fuse) ------------------------------------------------------------------


def pair_fused(parts: dict[str, Shape], whole: dict[str, Shape]) -> dict[str, tuple[str, ...]]:
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
    prefix = min(common_prefix(list(segs[0]), list(x)) for x in segs)
    suffix = min(common_prefix(list(segs[0][::-1]), list(x[::-1])) for x in segs)
    out = {}
    for seg, name in by_segment.items():
        core = seg[prefix : len(seg) - suffix if suffix else None].strip("_")
        out[core.lower()] = name
    return out if all(out) and len(out) == len(by_segment) else by_segment


def _best_whole(pattern: str, shape: Shape, whole: dict[str, Shape], taken: dict[str, Any]) -> str | None:
    cands = [t for t, s in whole.items() if s == shape and t not in taken]
    if not cands:
        return None
    runs = ints(pattern)
    return max(cands, key=lambda t: (2.0 if ints(t) == runs else 0.0) + similarity(pattern, t))
