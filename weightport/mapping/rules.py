"""Rules: how source names (and tensors) become target names (and tensors).

Rules are frozen values, validated when they are built: a template placeholder
the pattern does not capture, or an unknown op, fails right away. Build them
with :func:`rename`, :func:`drop`, :func:`strip_prefix`, :func:`add_prefix`,
:func:`split`, :func:`fuse` and :func:`transform`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from weightport.errors import MappingError
from weightport.mapping.ops import OpCall
from weightport.mapping.pattern import Pattern, Template

__all__ = [
    "Drop",
    "Fuse",
    "Output",
    "Rename",
    "Resolution",
    "Rule",
    "Split",
    "add_prefix",
    "drop",
    "fuse",
    "rename",
    "split",
    "strip_prefix",
    "transform",
]


class Output(NamedTuple):
    """One target a source key feeds (a named tuple: planning makes one per source key).

    Attributes:
        target: Target key.
        ops: Ops applied to the source tensor, in order.
        part: For fuse rules: ``(index, count)`` of this source among the fused inputs.
        dim: For fuse rules: the concatenation dimension.
    """

    target: str
    ops: tuple[OpCall, ...] = ()
    part: tuple[int, int] | None = None
    dim: int = 0


class Resolution(NamedTuple):
    """What a mapping does with one source key.

    Attributes:
        rule: The rule that matched, or ``None`` (the key keeps its name).
        outputs: The targets fed; empty for a dropped key.
    """

    rule: Rule | None
    outputs: tuple[Output, ...]

    @property
    def dropped(self) -> bool:
        return isinstance(self.rule, Drop)


@dataclass(frozen=True, eq=False)
class Rule:
    """Base of all rules. ``origin`` says where the rule was written (file and number)."""

    origin: str | None = field(default=None, kw_only=True)

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        raise NotImplementedError

    @property
    def text(self) -> str:
        raise NotImplementedError

    @property
    def output_templates(self) -> tuple[Template, ...]:
        """The templates that name this rule's targets."""
        return ()

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        """The targets of a key that pattern ``index`` matched with ``captures``."""
        raise NotImplementedError

    def inverse(self) -> Rule | None:
        """The rule that undoes this one, ``None`` for rules with nothing to undo (drop).

        Raises:
            MappingError: the rule cannot be inverted.
        """
        raise NotImplementedError

    def described(self) -> str:
        return f"{self.origin}: {self.text}" if self.origin else self.text

    def _where(self) -> str:
        return self.origin or self.text

    def _inverse_ops(self, ops: Sequence[OpCall]) -> tuple[OpCall, ...]:
        """The inverse of an op chain: the ops' inverses in reverse order."""
        out = []
        for op in reversed(ops):
            inv = op.inverse()
            if inv is None:
                raise MappingError(
                    f"{self._where()}: cannot invert: op {op.label()} has no inverse; "
                    "write the reverse rule by hand or use an invertible op"
                )
            out.append(inv)
        return tuple(out)

    def _need_invertible(self, pattern: Pattern, templates: Sequence[Template]) -> None:
        if not pattern.invertible:
            raise MappingError(
                f"{self._where()}: cannot invert {pattern.text!r}: anonymous wildcards and 're:' "
                "patterns lose what they matched; name the parts, e.g. '{rest*}' instead of '**'"
            )
        for t, unused in dropped_captures(pattern, templates):
            raise MappingError(
                f"{self._where()}: cannot invert: template {t.text!r} drops "
                f"{', '.join('{' + n + '}' for n in unused)} captured by {pattern.text!r}"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.described()}>"


def _via(ops: Sequence[OpCall]) -> str:
    return f" via {', '.join(op.label() for op in ops)}" if ops else ""


def _compile(pattern: str, templates: Sequence[Template], where: str) -> Pattern:
    ints = frozenset().union(*(t.int_names for t in templates)) if templates else frozenset()
    compiled = Pattern(pattern, int_names=ints)
    for t in templates:
        t.check_against(compiled, where)
    return compiled


@dataclass(frozen=True, eq=False)
class Rename(Rule):
    """``pattern -> template``, optionally through ops (then it is a transform)."""

    pattern: Pattern
    template: Template
    ops: tuple[OpCall, ...] = ()

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    @property
    def output_templates(self) -> tuple[Template, ...]:
        return (self.template,)

    @property
    def text(self) -> str:
        return f"{self.pattern.text!r} -> {self.template.text!r}{_via(self.ops)}"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        return (Output(self.template.render(captures, self._where), self.ops),)

    def inverse(self) -> Rule:
        self._need_invertible(self.pattern, [self.template])
        ops = self._inverse_ops(self.ops)
        pattern = self.template.inverse_pattern_text(self.pattern.multi_names)
        return Rename(
            _compile(pattern, [Template(self.template.inverse_text(self.pattern))], self._where()),
            Template(self.template.inverse_text(self.pattern)),
            ops,
            origin=self.origin,
        )


@dataclass(frozen=True, eq=False)
class Drop(Rule):
    """Source keys matching ``pattern`` are deliberately not used."""

    pattern: Pattern

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    @property
    def text(self) -> str:
        return f"drop {self.pattern.text!r}"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        return ()

    def inverse(self) -> None:
        return None


@dataclass(frozen=True, eq=False)
class Split(Rule):
    """One source tensor into several targets along ``dim``.

    ``sizes=None`` takes the sizes from the target tensors when they add up, else equal parts.
    """

    pattern: Pattern
    templates: tuple[Template, ...]
    dim: int = 0
    sizes: tuple[int, ...] | None = None
    ops: tuple[OpCall, ...] = ()

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    @property
    def output_templates(self) -> tuple[Template, ...]:
        return self.templates

    @property
    def text(self) -> str:
        sizes = f", sizes={list(self.sizes)}" if self.sizes else ""
        targets = ", ".join(repr(t.text) for t in self.templates)
        return f"split {self.pattern.text!r} -> [{targets}] (dim={self.dim}{sizes}){_via(self.ops)}"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        n = len(self.templates)
        sizes = list(self.sizes) if self.sizes else None
        return tuple(
            Output(
                t.render(captures, self._where),
                (OpCall("split", {"index": i, "count": n, "dim": self.dim, "sizes": sizes}), *self.ops),
            )
            for i, t in enumerate(self.templates)
        )

    def inverse(self) -> Rule:
        self._need_invertible(self.pattern, self.templates)
        patterns = tuple(t.inverse_pattern_text(self.pattern.multi_names) for t in self.templates)
        template = Template(self.templates[0].inverse_text(self.pattern))
        ops = self._inverse_ops(self.ops)
        sources = tuple(_compile(p, [template], self._where()) for p in patterns)
        return Fuse(sources, template, self.dim, ops, origin=self.origin)


@dataclass(frozen=True, eq=False)
class Fuse(Rule):
    """Several source tensors concatenated along ``dim`` into one target."""

    sources: tuple[Pattern, ...]
    template: Template
    dim: int = 0
    ops: tuple[OpCall, ...] = ()  # applied to each input before the fuse

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return self.sources

    @property
    def output_templates(self) -> tuple[Template, ...]:
        return (self.template,)

    @property
    def text(self) -> str:
        sources = ", ".join(repr(p.text) for p in self.sources)
        return f"fuse [{sources}] -> {self.template.text!r} (dim={self.dim}){_via(self.ops)}"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        target = self.template.render(captures, self._where)
        return (Output(target, self.ops, (index, len(self.sources)), self.dim),)

    def inverse(self) -> Rule:
        for p in self.sources:
            self._need_invertible(p, [self.template])
        templates = tuple(Template(self.template.inverse_text(p)) for p in self.sources)
        ops = self._inverse_ops(self.ops)
        pattern = self.template.inverse_pattern_text(self.sources[0].multi_names)
        return Split(_compile(pattern, templates, self._where()), templates, self.dim, None, ops, origin=self.origin)


# -- builders -------------------------------------------------------------------------------------


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
    sizes: Sequence[int] | None = None,
    *,
    ops: Sequence[OpLike] | None = None,
    origin: str | None = None,
) -> Split:
    """Split one tensor into ``len(templates)`` targets along ``dim``.

    Args:
        pattern: Source keys to split, e.g. ``"blocks.{i}.attn.qkv.{p}"``.
        templates: One target template per part, in order.
        dim: The dimension to split.
        sizes: Part sizes for uneven splits (grouped-query attention). ``None``: the target
            tensors' sizes when they add up, else equal parts (with ``ops``: equal parts).
        ops: An op chain applied to each part after the split, e.g. ``["transpose"]`` to turn
            the parts of GPT-2's fused Conv1D ``c_attn`` (split along ``dim=1``) into Linear weights.
    """
    where = origin or f"split({pattern!r})"
    if isinstance(templates, str) or len(templates) < 2:
        raise MappingError(f"{where}: split needs a list of at least two target templates")
    ts = tuple(Template(t) for t in templates)
    if sizes is not None and (len(sizes) != len(ts) or not all(isinstance(s, int) and s > 0 for s in sizes)):
        raise MappingError(f"{where}: sizes must be {len(ts)} positive integers, got {sizes!r}")
    chain = op_chain(ops, where)
    return Split(_compile(pattern, ts, where), ts, int(dim), tuple(sizes) if sizes else None, chain, origin=origin)


def fuse(
    patterns: Sequence[str],
    template: str,
    dim: int = 0,
    *,
    ops: Sequence[OpLike] | None = None,
    origin: str | None = None,
) -> Fuse:
    """Concatenate the tensors matching ``patterns`` (in order) into one target.

    Every pattern must capture the placeholders the template uses, so the parts of one
    target are found by their common captures. ``ops`` is an op chain applied to each
    input before the fuse (the inverse of a split's ``ops``).
    """
    where = origin or f"fuse({template!r})"
    if isinstance(patterns, str) or len(patterns) < 2:
        raise MappingError(f"{where}: fuse needs a list of at least two source patterns")
    t = Template(template)
    chain = op_chain(ops, where)
    return Fuse(tuple(_compile(p, [t], where) for p in patterns), t, int(dim), chain, origin=origin)


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


def dropped_captures(pattern: Pattern, templates: Sequence[Template]) -> list[tuple[Template, list[str]]]:
    """Each template that leaves out placeholders ``pattern`` captures, with them: such a rule
    sends many keys to one name, and its inverse could not restore them."""
    found = [(t, [n for n in pattern.names if n not in t.names]) for t in templates]
    return [(t, names) for t, names in found if names]
