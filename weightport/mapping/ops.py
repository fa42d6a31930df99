"""Tensor ops that rules apply on the way from source to target, in a registry.

An op is a function ``fn(x, **params) -> Tensor``. Ops that need to know the
target tensor declare ``target="shape"`` (they receive a meta tensor of the
target's shape and dtype) or ``target="value"`` (they receive the target's
current values, e.g. to keep its initialisation in new rows). Every op must
also work on meta tensors: the planner runs op chains on meta tensors to learn
output shapes without reading data.

Shape adapters (``in_channels``, ``pos_embed`` …) are ops with an ``applies``
predicate that lets ``on_mismatch="adapt"`` choose them automatically.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from weightport.errors import MappingError, OpError
from weightport.mapping import facts as _facts

__all__ = ["OpCall", "OpSpec", "get_op", "list_adapters", "list_ops", "register_op"]

TargetUse = str  # "none" | "shape" | "value"


@dataclass(frozen=True)
class OpSpec:
    """A registered op.

    Attributes:
        name: Registry name, used in rules and shown in reports.
        fn: ``fn(x, **params)``; with ``target=...`` when ``target`` is not ``"none"``.
        target: What the op needs of the target tensor: ``"none"``, ``"shape"`` or ``"value"``.
        label: Renders the op and its parameters for the report.
        inverse: Maps params to ``(op name, params)`` of the inverse op, or ``None``.
        applies: For adapters: ``applies(name, source_shape, target_shape) -> params | None``.
        exact: The op only re-lays out or selects values (split, transpose, reshape, cast …):
            a target it produces is reported ``loaded``. Otherwise (adapters, ``pad``, ``scale``,
            user ops) values change to fit and the target is reported ``adapted``.
        auto: For adapters: ``on_mismatch='adapt'`` tries it unless the caller names the
            adapters to use. Only adapters that keep the weights' meaning are automatic
            (``in_channels``, ``pos_embed``, ``patch_embed``); ``head`` and ``vocab`` must be asked for.
        params: Parameter names ``fn`` accepts (checked when a rule names the op).
        required: Parameter names without a default.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    target: TargetUse = "none"
    label: Callable[[Mapping[str, Any]], str] | None = None
    inverse: Callable[[Mapping[str, Any]], tuple[str, dict[str, Any]] | None] | None = None
    applies: Callable[..., dict[str, Any] | None] | None = None
    params: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    exact: bool = False
    auto: bool = False

    @property
    def is_adapter(self) -> bool:
        return self.applies is not None


_OPS: dict[str, OpSpec] = {}


def register_op(
    name: str,
    *,
    target: TargetUse = "none",
    label: Callable[[Mapping[str, Any]], str] | None = None,
    inverse: Callable[[Mapping[str, Any]], tuple[str, dict[str, Any]] | None] | None = None,
    applies: Callable[..., dict[str, Any] | None] | None = None,
    exact: bool = False,
    auto: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn`` as op ``name`` (a decorator). Re-registering a name replaces it.

    ``exact`` and ``auto`` are described on :class:`OpSpec`; both default to the honest answer
    for an op weightport does not know: values may change, and adapt only when asked.
    """
    if target not in ("none", "shape", "value"):
        raise MappingError(f"register_op({name!r}): target must be 'none', 'shape' or 'value', not {target!r}")

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        sig = inspect.signature(fn)
        params = [p for p in list(sig.parameters.values())[1:] if p.name != "target"]
        names = frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        required = frozenset(p.name for p in params if p.default is p.empty and p.name in names)
        _OPS[name] = OpSpec(name, fn, target, label, inverse, applies, names, required, exact, auto)
        return fn

    return decorate


def get_op(name: str) -> OpSpec:
    try:
        return _OPS[name]
    except KeyError:
        raise MappingError(f"unknown op {name!r}; registered ops: {', '.join(sorted(_OPS))}") from None


def list_ops() -> list[str]:
    """Names of registered ops that are not shape adapters."""
    return sorted(n for n, s in _OPS.items() if not s.is_adapter)


def list_adapters(*, auto: bool | None = None) -> list[str]:
    """Names of registered shape adapters, in the order ``on_mismatch='adapt'`` tries them;
    ``auto=True`` only those it tries by default (see :attr:`OpSpec.auto`)."""
    return [n for n, s in _OPS.items() if s.is_adapter and (auto is None or s.auto == auto)]


@dataclass(frozen=True)
class OpCall:
    """One op with its parameters, as a rule names it.

    Attributes:
        op: The registered op name, or the callable's name for a user callable.
        params: Keyword parameters.
        fn: The user callable, when ``op`` is not a registered name.
    """

    op: str
    params: Mapping[str, Any] = field(default_factory=dict)
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def make(cls, op: str | Callable[[torch.Tensor], torch.Tensor], params: Mapping[str, Any], where: str) -> OpCall:
        """Validate ``op`` and ``params`` now, so a bad rule fails where it is written."""
        if callable(op) and not isinstance(op, str):
            if params:
                raise MappingError(f"{where}: a callable op takes no parameters (bind them with functools.partial)")
            return cls(getattr(op, "__name__", type(op).__name__), {}, op)
        if not isinstance(op, str):
            raise MappingError(f"{where}: op must be a registered name or a callable, not {op!r}")
        try:
            spec = get_op(op)
        except MappingError as e:
            raise MappingError(f"{where}: {e}") from None
        unknown = sorted(set(params) - spec.params)
        if unknown:
            raise MappingError(
                f"{where}: op {op!r} has no parameter {', '.join(map(repr, unknown))} "
                f"(it takes: {', '.join(sorted(spec.params)) or 'none'})"
            )
        missing = sorted(spec.required - set(params))
        if missing:
            raise MappingError(f"{where}: op {op!r} needs parameter(s) {', '.join(map(repr, missing))}")
        for name, value in params.items():
            _facts.check(value, f"{where}: op {op!r} parameter {name!r}")
        return cls(op, dict(params))

    def facts(self) -> frozenset[str]:
        """The model facts (``"$heads"`` …) its parameters name."""
        return _facts.refs(self.params)

    def bind(self, facts: Mapping[str, int]) -> OpCall:
        """This op with every fact in its parameters replaced by its value."""
        if not self.facts():
            return self
        return OpCall(self.op, _facts.bind(dict(self.params), facts), self.fn)

    @property
    def spec(self) -> OpSpec | None:
        return None if self.fn is not None else get_op(self.op)

    @property
    def target_use(self) -> TargetUse:
        spec = self.spec
        return "none" if spec is None else spec.target

    @property
    def is_adapter(self) -> bool:
        spec = self.spec
        return spec is not None and spec.is_adapter

    @property
    def exact(self) -> bool:
        """Values pass unchanged (a user callable is not known to: it counts as adapting)."""
        spec = self.spec
        return spec is not None and spec.exact

    def label(self) -> str:
        spec = self.spec
        if spec is not None and spec.label is not None:
            return spec.label(self.params)
        if not self.params:
            return self.op
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.op}({args})"

    def inverse(self) -> OpCall | None:
        spec = self.spec
        if spec is None or spec.inverse is None:
            return None
        inv = spec.inverse(self.params)
        return None if inv is None else OpCall(inv[0], inv[1])

    def run(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the op. Errors become :class:`OpError` naming the op."""
        try:
            if self.fn is not None:
                out = self.fn(x)
            else:
                spec = get_op(self.op)
                if spec.target != "none":
                    out = spec.fn(x, target=target, **self.params)
                else:
                    out = spec.fn(x, **self.params)
        except (OpError, MappingError):
            raise
        except Exception as e:
            raise OpError(
                f"op {self.label()} failed on a tensor of shape {tuple(x.shape)}: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(out, torch.Tensor):
            raise OpError(f"op {self.label()} returned a {type(out).__name__}, not a tensor")
        return out


# -- the built-in ops ------------------------------------------------------------------------------


def split_bounds(length: int, count: int, index: int, sizes: list[int] | None) -> tuple[int, int]:
    """Start and length of part ``index`` of ``count`` along a dimension of ``length``."""
    if sizes is not None:
        if len(sizes) != count or sum(sizes) != length:
            raise OpError(f"split sizes {sizes} do not add up to {length} in {count} parts")
        return sum(sizes[:index]), sizes[index]
    if length % count:
        raise OpError(f"cannot split a dimension of {length} into {count} equal parts; give sizes=[...]")
    step = length // count
    return index * step, step


def _split_label(p: Mapping[str, Any]) -> str:
    groups = p.get("groups", 1)
    return f"split[{p['index'] + 1}/{p['count']}" + (f", groups={groups}]" if groups != 1 else "]")


@register_op("split", label=_split_label, exact=True)
def _split(
    x: torch.Tensor, *, index: int, count: int, dim: int = 0, sizes: list[int] | None = None, groups: int = 1
) -> torch.Tensor:
    """Part ``index`` of ``count`` along ``dim`` (equal parts, or ``sizes``). With ``groups``, the
    dimension is ``groups`` equal blocks, each holding every part's share in order (a fused
    grouped-query ``wqkv``: per kv group, its q heads, its k head, its v head); ``sizes`` are then
    the parts' totals, and each block holds ``size // groups`` of each."""
    if groups == 1:
        start, length = split_bounds(x.shape[dim], count, index, sizes)
        return x.narrow(dim, start, length)
    dim = dim % max(x.dim(), 1)
    blocks = _grouped(x, dim, groups, "split")
    shares = None if sizes is None else [_share(s, groups, "split") for s in sizes]
    start, length = split_bounds(blocks.shape[dim + 1], count, index, shares)
    return blocks.narrow(dim + 1, start, length).flatten(dim, dim + 1)


def _grouped(x: torch.Tensor, dim: int, groups: int, what: str) -> torch.Tensor:
    """``x`` with ``dim`` unflattened into ``(groups, -1)``."""
    dim = dim % max(x.dim(), 1)
    if not isinstance(groups, int) or groups < 1 or x.dim() == 0 or x.shape[dim] % groups:
        raise OpError(
            f"{what} by groups={groups}: a dimension of {x.shape[dim] if x.dim() else 0} is not {groups} equal groups"
        )
    return x.unflatten(dim, (groups, -1))


def _share(size: int, groups: int, what: str) -> int:
    if size % groups:
        raise OpError(f"{what} by groups={groups}: a part of {size} is not {groups} equal shares")
    return size // groups


@register_op(
    "transpose",
    label=lambda p: f"transpose({p.get('dim0', 0)},{p.get('dim1', 1)})",
    inverse=lambda p: ("transpose", dict(p)),
    exact=True,
)
def _transpose(x: torch.Tensor, *, dim0: int = 0, dim1: int = 1) -> torch.Tensor:
    return x.transpose(dim0, dim1)


def _invert_permutation(dims: list[int]) -> list[int]:
    out = [0] * len(dims)
    for i, d in enumerate(dims):
        out[d] = i
    return out


@register_op(
    "permute",
    label=lambda p: f"permute{tuple(p['dims'])}",
    inverse=lambda p: ("permute", {"dims": _invert_permutation(list(p["dims"]))}),
    exact=True,
)
def _permute(x: torch.Tensor, *, dims: list[int]) -> torch.Tensor:
    if sorted(dims) != list(range(x.dim())):
        raise OpError(f"permute dims {dims} are not a permutation of the {x.dim()} dimensions")
    return x.permute(*dims)


@register_op(
    "reshape",
    target="shape",
    label=lambda p: f"reshape{tuple(p['shape'])}" if p.get("shape") else "reshape(target)",
    inverse=lambda p: ("reshape", {}),
    exact=True,
)
def _reshape(x: torch.Tensor, *, target: torch.Tensor | None, shape: list[int] | None = None) -> torch.Tensor:
    """Reshape to ``shape``, or to the target's shape when ``shape`` is not given."""
    if shape is not None:
        want = tuple(shape)
    elif target is not None:
        want = tuple(target.shape)
    else:
        raise OpError("reshape needs shape=[...] when there is no target tensor")
    if math.prod(want) != x.numel() and -1 not in want:
        raise OpError(f"reshape cannot turn {tuple(x.shape)} ({x.numel()} elements) into {want}")
    return x.reshape(want)


@register_op("select", label=lambda p: f"select[{len(p['index'])} along {p.get('dim', 0)}]", exact=True)
def _select(x: torch.Tensor, *, index: list[int], dim: int = 0) -> torch.Tensor:
    n = x.shape[dim]
    bad = [i for i in index if not -n <= i < n]
    if bad:
        raise OpError(f"select: index {bad[:5]} out of range for a dimension of {n}")
    return x.index_select(dim, torch.tensor([i % n for i in index], dtype=torch.long, device=x.device))


@register_op(
    "unsqueeze",
    label=lambda p: f"unsqueeze({p.get('dim', 0)})",
    inverse=lambda p: ("squeeze", dict(p)),
    exact=True,
)
def _unsqueeze(x: torch.Tensor, *, dim: int = 0) -> torch.Tensor:
    return x.unsqueeze(dim)


@register_op(
    "squeeze",
    label=lambda p: f"squeeze({p.get('dim', 0)})",
    inverse=lambda p: ("unsqueeze", dict(p)),
    exact=True,
)
def _squeeze(x: torch.Tensor, *, dim: int = 0) -> torch.Tensor:
    if x.dim() == 0 or x.shape[dim] != 1:
        raise OpError(f"squeeze: dimension {dim} of {tuple(x.shape)} is not of size 1")
    return x.squeeze(dim)


@register_op(
    "take", label=lambda p: f"take[{p['index']}]" + (f"(dim={p['dim']})" if p.get("dim", 0) else ""), exact=True
)
def _take(x: torch.Tensor, *, index: int, dim: int = 0) -> torch.Tensor:
    """Entry ``index`` along ``dim``, which goes away (one expert of a stacked weight)."""
    if x.dim() == 0 or not -x.shape[dim] <= index < x.shape[dim]:
        raise OpError(f"take: index {index} out of range for {tuple(x.shape)} along dim {dim}")
    return x.select(dim, index)


@register_op("narrow", label=lambda p: f"narrow(dim={p.get('dim', 0)},{p['start']}:+{p['length']})", exact=True)
def _narrow(x: torch.Tensor, *, start: int, length: int, dim: int = 0) -> torch.Tensor:
    return x.narrow(dim, start, length)


@register_op(
    "pad", target="value", label=lambda p: "pad(keep init)" if p.get("keep_init") else f"pad({p.get('value', 0)})"
)
def _pad(x: torch.Tensor, *, target: torch.Tensor, value: float = 0.0, keep_init: bool = False) -> torch.Tensor:
    """Place ``x`` at the start of every dimension of a target-shaped tensor; the rest is
    ``value`` or, with ``keep_init``, the target's own initialisation."""
    if x.dim() != target.dim() or any(a > b for a, b in zip(x.shape, target.shape)):
        raise OpError(f"pad cannot fit {tuple(x.shape)} into {tuple(target.shape)}")
    if keep_init:
        out = target.detach().to(dtype=x.dtype, copy=True)
    else:
        out = torch.full(target.shape, value, dtype=x.dtype, device=x.device)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


@register_op("cast", label=lambda p: f"cast({p['dtype']})", exact=True)
def _cast(x: torch.Tensor, *, dtype: str) -> torch.Tensor:
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise OpError(f"cast: unknown dtype {dtype!r}")
    return x.to(resolved)


@register_op(
    "scale",
    label=lambda p: f"scale({p['factor']})",
    inverse=lambda p: ("scale", {"factor": 1.0 / p["factor"]}) if p["factor"] else None,
)
def _scale(x: torch.Tensor, *, factor: float) -> torch.Tensor:
    return x * factor


_ROPE_LAYOUTS = ("interleaved", "half")


def _rope_head_dim(x: torch.Tensor, heads: int, head_dim: int | None) -> int:
    """Rows per head of a q or k weight (or bias) of ``heads`` heads, checked against ``head_dim``."""
    if x.dim() == 0 or heads <= 0 or x.shape[0] % heads:
        raise OpError(
            f"rope_permute: {tuple(x.shape)} has {x.shape[0] if x.dim() else 0} rows, not a multiple of heads={heads}; "
            "give the head count of this projection (kv heads for k under GQA)"
        )
    rows = x.shape[0] // heads
    if head_dim is not None and head_dim != rows:
        raise OpError(f"rope_permute: {x.shape[0]} rows in {heads} heads are {rows} per head, not head_dim={head_dim}")
    return rows


def _rope_label(p: Mapping[str, Any]) -> str:
    return f"rope_permute(heads={p['heads']}, ->{p.get('to', 'interleaved')})"


def _rope_inverse(p: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    to = "half" if p.get("to", "interleaved") == "interleaved" else "interleaved"
    return "rope_permute", {**p, "to": to}


@register_op("rope_permute", label=_rope_label, inverse=_rope_inverse, exact=True)
def _rope_permute(x: torch.Tensor, *, heads: int, to: str = "interleaved", head_dim: int | None = None) -> torch.Tensor:
    """Reorder the rows of each head of a q or k projection (weight or bias) between the two
    rotary layouts: ``"half"`` (Hugging Face ``rotate_half``: a head's first half of rows pairs
    with its second half) and ``"interleaved"`` (Meta, torchtune, torchtitan: rows 2i and 2i+1
    pair). Equals torchtune's ``_permute`` in ``convert_weights.py``; k takes its own ``heads``."""
    if to not in _ROPE_LAYOUTS:
        raise OpError(f"rope_permute: to={to!r} is not one of {', '.join(map(repr, _ROPE_LAYOUTS))}")
    rows = _rope_head_dim(x, heads, head_dim)
    if rows % 2:
        raise OpError(f"rope_permute: {rows} rows per head is odd; rotary pairs need an even head_dim")
    rest = tuple(x.shape[1:])
    pairs = (2, rows // 2) if to == "interleaved" else (rows // 2, 2)
    return x.reshape(heads, *pairs, *rest).transpose(1, 2).reshape(x.shape)


_GQA_PARTS = ("q", "k", "v")


@register_op(
    "gqa_split",
    label=lambda p: f"gqa_split({p['part']}, heads={p['heads']}, kv_heads={p['kv_heads']})",
    exact=True,
)
def _gqa_split(x: torch.Tensor, *, heads: int, kv_heads: int, head_dim: int, part: str) -> torch.Tensor:
    """Part ``part`` of a fused qkv weight (or bias) laid out per kv group: for each of the
    ``kv_heads`` groups, its ``heads // kv_heads`` q heads, then its k head, then its v head
    (GPT-NeoX / Falcon ``query_key_value``, litgpt before 0.5; MHA is ``kv_heads == heads``).
    Returns q (``heads * head_dim`` rows) or k / v (``kv_heads * head_dim`` rows) in the plain
    layout. A split alone has no single-tensor inverse (fusing needs all three parts)."""
    if part not in _GQA_PARTS:
        raise OpError(f"gqa_split: part={part!r} is not one of 'q', 'k', 'v'")
    if kv_heads <= 0 or heads % kv_heads:
        raise OpError(f"gqa_split: heads={heads} is not a multiple of kv_heads={kv_heads}")
    per_group = heads // kv_heads + 2
    rows = kv_heads * per_group * head_dim
    if x.dim() == 0 or x.shape[0] != rows:
        raise OpError(
            f"gqa_split: {tuple(x.shape)} is not a fused qkv of {rows} rows "
            f"(kv_heads={kv_heads} groups of {per_group - 2} q + 1 k + 1 v heads of head_dim={head_dim}); "
            "check heads, kv_heads and head_dim"
        )
    rest = tuple(x.shape[1:])
    groups = x.reshape(kv_heads, per_group, head_dim, *rest)
    start, count = {"q": (0, per_group - 2), "k": (per_group - 2, 1), "v": (per_group - 1, 1)}[part]
    return groups.narrow(1, start, count).reshape(kv_heads * count * head_dim, *rest)


def fuse(parts: list[torch.Tensor], dim: int, groups: int = 1) -> torch.Tensor:
    """Concatenate ``parts`` along ``dim`` (the op behind ``fuse`` rules). With ``groups``, each part is
    cut into ``groups`` equal blocks along ``dim`` and the result holds, block by block, every
    part's block in order: the inverse of :func:`_split` with ``groups``."""
    try:
        if groups == 1:
            return torch.cat(parts, dim)
        dim = dim % max(parts[0].dim(), 1)
        return torch.cat([_grouped(p, dim, groups, "fuse") for p in parts], dim + 1).flatten(dim, dim + 1)
    except OpError:
        raise
    except Exception as e:
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        raise OpError(f"fuse along dim {dim} failed for parts of shapes {shapes}: {e}") from e
