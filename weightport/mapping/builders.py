"""The rule builders: ``wp.rename``, ``wp.drop``, ``wp.strip_prefix``, ``wp.add_prefix``, ``wp.split``,
``wp.fuse``, ``wp.transform`` and ``wp.tie``. Each validates what it is given where it is written:
a template placeholder the pattern does not capture, an unknown op, a malformed model fact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from weightport.errors import MappingError
from weightport.mapping import facts as _facts
from weightport.mapping.ops import OpCall
from weightport.mapping.pattern import Pattern, Template
from weightport.mapping.rules import Drop, Fuse, Rename, Split, Stack, Tie, Unstack
from weightport.mapping.rules import compile_rule_pattern as _compile

__all__ = [
    "OpLike",
    "add_prefix",
    "drop",
    "fuse",
    "op_chain",
    "rename",
    "split",
    "stack",
    "strip_prefix",
    "tie",
    "transform",
    "unstack",
]


def _check_prefix(prefix: str, what: str) -> str:
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "{}*"):
        raise MappingError(
            f"{what}: the prefix must be a non-empty literal string without '{{', '}}' or '*', got {prefix!r}"
        )
    return prefix


OpLike = str | Callable[[torch.Tensor], torch.Tensor] | tuple[str, Mapping[str, Any]] | Mapping[str, Any]


def op_chain(ops: Sequence[OpLike] | None, where: str) -> tuple[OpCall, ...]:
    """Validate an op chain: each op a registered name, a callable, ``(name, params)`` or
    ``{"op": name, **params}`` (the form TOML files write), applied in order."""
    if ops is None:
        return ()
    if isinstance(ops, (str, Mapping)) or callable(ops) or not isinstance(ops, Sequence):
        raise MappingError(f"{where}: ops must be a list of ops, e.g. ops=['transpose'], not {ops!r}")
    out = []
    for n, item in enumerate(ops, 1):
        at = f"{where}: ops[{n}]"
        if isinstance(item, Mapping):
            params = dict(item)
            out.append(OpCall.make(params.pop("op", None), params, at))  # type: ignore[arg-type]
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping):
            out.append(OpCall.make(item[0], item[1], at))
        else:
            out.append(OpCall.make(item, {}, at))  # type: ignore[arg-type]
    return tuple(out)


def rename(pattern: str, template: str, *, ops: Sequence[OpLike] | None = None, origin: str | None = None) -> Rename:
    """Rename keys matching ``pattern`` to ``template``, optionally through an op chain.

    Example:
        >>> wp.rename("encoder.layers.encoder_layer_{i}.ln_{n}.{p}", "blocks.{i}.norm{n}.{p}")
        >>> wp.rename("h.{i}.mlp.c_fc.weight", "blocks.{i}.fc1.weight", ops=["transpose"])
    """
    where = origin or f"rename({pattern!r}, {template!r})"
    t = Template(template)
    return Rename(_compile(pattern, [t], where), t, op_chain(ops, where), origin=origin)


def drop(pattern: str, *, origin: str | None = None) -> Drop:
    """Do not use source keys matching ``pattern`` (reported as dropped, not unused)."""
    return Drop(Pattern(pattern), origin=origin)


def strip_prefix(prefix: str, *, origin: str | None = None) -> Rename:
    """Remove a literal ``prefix`` from keys that start with it."""
    p = _check_prefix(prefix, "strip_prefix")
    return rename(f"{p}{{rest*}}", "{rest}", origin=origin)


def add_prefix(prefix: str, *, origin: str | None = None) -> Rename:
    """Prepend a literal ``prefix`` to every key (place it last: it matches everything)."""
    p = _check_prefix(prefix, "add_prefix")
    return rename("{rest*}", f"{p}{{rest}}", origin=origin)


def split(
    pattern: str,
    templates: Sequence[str],
    dim: int = 0,
    sizes: Sequence[int | str] | None = None,
    *,
    ops: Sequence[OpLike] | None = None,
    groups: int | str = 1,
    origin: str | None = None,
) -> Split:
    """Split one tensor into ``len(templates)`` targets along ``dim``.

    Args:
        pattern: Source keys to split, e.g. ``"blocks.{i}.attn.qkv.{p}"``.
        templates: One target template per part, in order.
        dim: The dimension to split.
        sizes: Part sizes for uneven splits (grouped-query attention): integers or model facts
            (``"$kv_heads * $head_dim"``). ``None``: the target tensors' sizes when they add up,
            else equal parts (with ``ops``: equal parts).
        ops: An op chain applied to each part after the split, e.g. ``["transpose"]`` to turn
            the parts of GPT-2's fused Conv1D ``c_attn`` (split along ``dim=1``) into Linear weights.
        groups: The dimension is this many equal blocks, each holding every part's share in order
            (torchtitan's fused ``wqkv``, GPT-NeoX ``query_key_value``: ``groups="$kv_heads"``);
            ``sizes`` are then the parts' totals.
    """
    where = origin or f"split({pattern!r})"
    if isinstance(templates, str) or len(templates) < 2:
        raise MappingError(f"{where}: split needs a list of at least two target templates")
    ts = tuple(Template(t) for t in templates)
    if sizes is not None and (
        isinstance(sizes, str)
        or len(sizes) != len(ts)
        or not all(_facts.is_fact(s) or (isinstance(s, int) and s > 0) for s in sizes)
    ):
        raise MappingError(f"{where}: sizes must be {len(ts)} positive integers or model facts, got {sizes!r}")
    _facts.check(list(sizes or ()), f"{where}: sizes")
    chain = op_chain(ops, where)
    return Split(
        _compile(pattern, ts, where),
        ts,
        int(dim),
        tuple(sizes) if sizes else None,
        chain,
        _groups(groups, where),
        origin=origin,
    )


def _groups(groups: int | str, where: str) -> int | str:
    if _facts.is_fact(groups):
        _facts.check(groups, f"{where}: groups")
        return groups
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise MappingError(f"{where}: groups must be a positive integer or a model fact ('$kv_heads'), not {groups!r}")
    return groups


def fuse(
    patterns: Sequence[str],
    template: str,
    dim: int = 0,
    *,
    ops: Sequence[OpLike] | None = None,
    groups: int | str = 1,
    origin: str | None = None,
) -> Fuse:
    """Concatenate the tensors matching ``patterns`` (in order) into one target.

    Every pattern must capture the placeholders the template uses, so the parts of one
    target are found by their common captures. ``ops`` is an op chain applied to each
    input before the fuse (the inverse of a split's ``ops``). With ``groups`` (an integer or a
    model fact such as ``"$kv_heads"``) each input is cut into that many equal blocks and the
    target holds, block by block, every input's block in order: torchtitan's fused ``wqkv``
    holds per kv group its q heads, its k head and its v head.
    """
    where = origin or f"fuse({template!r})"
    if isinstance(patterns, str) or len(patterns) < 2:
        raise MappingError(f"{where}: fuse needs a list of at least two source patterns")
    t = Template(template)
    chain = op_chain(ops, where)
    compiled = tuple(_compile(p, [t], where) for p in patterns)
    return Fuse(compiled, t, int(dim), chain, _groups(groups, where), origin=origin)


def tie(target: str, *, like: str, origin: str | None = None) -> Tie:
    """Fill target ``target``, when nothing in the source feeds it, with what feeds target ``like``
    (same source tensor, same ops); the report names the tie. Both are target names, literal.

    Example:
        >>> wp.tie("lm_head.weight", like="transformer.wte.weight")  # a tied head the checkpoint omits
    """
    where = origin or f"tie({target!r})"
    for name in (target, like):
        if not isinstance(name, str) or not name or any(c in name for c in "{}*"):
            raise MappingError(f"{where}: tie takes literal target names, not {name!r}")
    if target == like:
        raise MappingError(f"{where}: a tensor cannot be tied to itself")
    return Tie(target, like, origin=origin)


def transform(
    pattern: str,
    template: str,
    op: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    ops: Sequence[OpLike] | None = None,
    origin: str | None = None,
    **params: Any,
) -> Rename:
    """Rename and change the tensor with ``op`` (a registered op or adapter name, or a callable)
    and its ``params``, or with an op chain ``ops``.

    Example:
        >>> wp.transform("head.weight", "fc.weight", "select", index=[0, 5, 9])
        >>> wp.transform("w", "v", ops=["transpose", ("reshape", {"shape": [-1]})])
    """
    where = origin or f"transform({pattern!r}, {template!r})"
    t = Template(template)
    if (op is None) == (ops is None) or (ops is not None and params):
        raise MappingError(f"{where}: give either one op (with its parameters) or ops=[...], a chain")
    chain = (OpCall.make(op, params, where),) if op is not None else op_chain(ops, where)
    if not chain:
        raise MappingError(f"{where}: ops=[] is empty; use wp.rename for a plain rename")
    return Rename(_compile(pattern, [t], where), t, chain, origin=origin)


def stack(
    pattern: str,
    template: str,
    *,
    over: str,
    dim: int = 0,
    ops: Sequence[OpLike] | None = None,
    origin: str | None = None,
) -> Stack:
    """Stack the tensors whose keys differ only in the integer placeholder ``over`` into one target,
    in index order along a new dimension ``dim`` (experts stored one by one → one stacked weight).
    Every index from 0 to the largest must be present. ``ops`` apply to each input first.

    Example:
        >>> wp.stack("layers.{i}.experts.{e}.w1.weight", "layers.{i}.moe.w1", over="e")
    """
    where = origin or f"stack({pattern!r})"
    t = Template(template)
    if over in t.names:
        raise MappingError(f"{where}: the template must not use {{{over}}}: the stacked index becomes a dimension")
    compiled = _compile(pattern, [t], where, frozenset({over}))
    if over not in compiled.names:
        raise MappingError(f"{where}: the pattern has no placeholder {{{over}}} to stack over")
    return Stack(compiled, t, over, int(dim), op_chain(ops, where), origin=origin)


def unstack(
    pattern: str,
    template: str,
    *,
    over: str,
    dim: int = 0,
    ops: Sequence[OpLike] | None = None,
    origin: str | None = None,
) -> Unstack:
    """Cut one tensor along ``dim`` into one target per index, named by the template's placeholder
    ``over`` (a stacked expert weight → one tensor per expert); the inverse of :func:`stack`.

    Example:
        >>> wp.unstack("layers.{i}.moe.w1", "layers.{i}.experts.{e}.w1.weight", over="e")
    """
    where = origin or f"unstack({pattern!r})"
    t = Template(template)
    if over not in t.names:
        raise MappingError(f"{where}: the template has no placeholder {{{over}}} to name each part")
    compiled = Pattern(pattern)
    if over in compiled.names:
        raise MappingError(f"{where}: the pattern must not capture {{{over}}}: it names the parts")
    extra = sorted(set(t.names) - set(compiled.names) - {over})
    if extra:
        raise MappingError(
            f"{where}: the template uses {', '.join('{' + n + '}' for n in extra)}, which the pattern does not capture"
        )
    return Unstack(compiled, t, over, int(dim), op_chain(ops, where), origin=origin)
