"""Compress pairs into a few readable rules and check the rules route every key where the pairs say.

``layer{a}.{b}.conv1.{p}`` rather than hundreds of literal renames: digit runs a target shares with its
source become placeholders, the last segment ``{p}`` where both end alike; where generalising would make
two rules write one target, the pairs stay literal.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from weightport.errors import MappingError
from weightport.mapping.core import Mapping

Shape = tuple[int, ...]
_DIGITS = re.compile(r"\d+")
_PLACEHOLDERS = "abcdefghijklmnoqrstuvwxyz"  # no {p}: it names the last segment


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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


def make_rules(
    src: dict[str, Shape],
    pairs: dict[str, str],
    reshaped: dict[str, str],
    fused: dict[str, tuple[str, ...]],
    split: dict[str, tuple[str, ...]],
) -> tuple[list[dict[str, Any]], set[str]]:
    """Rules for the pairs (all target -> source), and the targets no valid rule could route (dropped).

    General rules first; literal ones where the general ones fail to parse or misroute a key. Never raises:
    a pair that even a literal rule cannot route is dropped and listed by the caller.
    """
    one = {**pairs, **reshaped}
    for level in ("general", "literal"):
        if level == "general":
            rules = _compress(pairs, reshaped) + _compress_many(fused, "fuse") + _compress_split(split)
        else:
            rules = _literal(pairs, reshaped, fused, split)
        rules = _repair(rules, src, one, fused, split)
        mapping = _try_build(rules)
        if mapping is not None and not _misrouted(mapping, src, one, fused, split):
            return rules, set()
    # Literal rules that still fail: keep the ones that parse and route, drop the rest.
    kept: list[dict[str, Any]] = []
    for rule in _literal(pairs, reshaped, fused, split):
        if _try_build([*kept, rule]) is not None:
            kept.append(rule)
    mapping = _try_build(kept)
    if mapping is None:  # pragma: no cover - an empty rule list always parses
        return [], {*one, *fused, *(t for ts in split.values() for t in ts)}
    return kept, _misrouted(mapping, src, one, fused, split)


def _literal(
    pairs: dict[str, str],
    reshaped: dict[str, str],
    fused: dict[str, tuple[str, ...]],
    split: dict[str, tuple[str, ...]],
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"rename": _escape(s), "to": _escape(t)} for t, s in pairs.items() if s != t]
    out += [{"transform": _escape(s), "to": _escape(t), "op": "reshape"} for t, s in reshaped.items()]
    out += [{"fuse": [_escape(p) for p in ps], "to": _escape(t)} for t, ps in fused.items()]
    out += [{"split": _escape(s), "to": [_escape(t) for t in ts], "dim": 0} for s, ts in split.items()]
    return out


def _wanted(src: dict[str, Shape], one: dict[str, str], split: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    want: dict[str, tuple[str, ...] | None] = dict.fromkeys(src)
    for t, s in one.items():
        want[s] = (t,)
    for s, ts in split.items():
        want[s] = tuple(ts)
    return want


def _misrouted(
    mapping: Mapping,
    src: dict[str, Shape],
    one: dict[str, str],
    fused: dict[str, tuple[str, ...]],
    split: dict[str, tuple[str, ...]],
) -> set[str]:
    """Targets whose source the rules send elsewhere (or that a stray source would overwrite)."""
    bad: set[str] = set()
    sent: dict[str, list[str]] = defaultdict(list)
    in_fuse = {s for parts in fused.values() for s in parts}
    for key, goal in _wanted(src, one, split).items():
        try:
            got = tuple(o.target for o in mapping.resolve(key).outputs)
        except Exception:  # noqa: BLE001 - a rule that cannot resolve a key routes nothing
            got = ()
        for t in got:
            sent[t].append(key)
        if key in in_fuse:
            continue
        if goal is not None and got != goal:
            bad.update(goal)
    bad.update(t for t, keys in sent.items() if len(keys) > 1 and t not in fused)
    return bad


def _repair(
    rules: list[dict[str, Any]],
    src: dict[str, Shape],
    pairs: dict[str, str],
    fused: dict[str, tuple[str, ...]],
    split: dict[str, tuple[str, ...]],
) -> list[dict[str, Any]]:
    """Prepend literal rules for every source key the general rules would send elsewhere."""
    want = _wanted(src, pairs, split)
    in_fuse = {s for parts in fused.values() for s in parts}
    for _ in range(3):
        mapping = _try_build(rules)
        if mapping is None:
            return rules
        fixes: list[dict[str, Any]] = []
        for key, goal in want.items():
            if key in in_fuse:
                continue
            try:
                got = tuple(o.target for o in mapping.resolve(key).outputs)
            except Exception:  # noqa: BLE001
                return rules
            if goal is not None and got != goal and len(goal) == 1:
                fixes.append({"rename": _escape(key), "to": _escape(goal[0])})
            elif goal is None and got != (key,) and got:
                fixes.append({"rename": _escape(key), "to": _escape(key)})
        if not fixes:
            return rules
        rules = fixes + rules
    return rules


def _try_build(rules: list[dict[str, Any]]) -> Mapping | None:
    from weightport.mapping.files import parse_mapping

    try:
        return parse_mapping({"rule": rules}, "<suggested>")
    except MappingError:
        return None


def _escape(name: str) -> str:
    return name.replace("{", "{{").replace("}", "}}")


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)
