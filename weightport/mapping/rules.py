"""Rules: how source names (and tensors) become target names (and tensors).

Rules are frozen values, validated when they are built: a template placeholder
the pattern does not capture, or an unknown op, fails right away. Build them
with :func:`rename`, :func:`drop`, :func:`strip_prefix`, :func:`add_prefix`,
:func:`split`, :func:`fuse` and :func:`transform`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple

from weightport.errors import MappingError
from weightport.mapping import facts as _facts
from weightport.mapping.ops import OpCall
from weightport.mapping.pattern import Pattern, Template

__all__ = [
    "UNSTACK_MARK",
    "Drop",
    "Fuse",
    "Output",
    "Rename",
    "Resolution",
    "Rule",
    "Split",
    "Stack",
    "Tie",
    "Unstack",
    "compile_rule_pattern",
    "dropped_captures",
]


class Output(NamedTuple):
    """One target a source key feeds (a named tuple: planning makes one per source key).

    Attributes:
        target: Target key.
        ops: Ops applied to the source tensor, in order.
        part: For fuse rules: ``(index, count)`` of this source among the fused inputs.
        dim: For fuse rules: the concatenation dimension.
        groups: For fuse rules: the blocks the fused dimension interleaves (1: plain concatenation).
    """

    target: str
    ops: tuple[OpCall, ...] = ()
    part: tuple[int, int] | None = None
    dim: int = 0
    groups: int = 1


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
    """Base of all rules. ``origin`` says where the rule was written (file and number).

    ``per_key``: the outputs depend on the values of integer captures (a stack's expert index),
    so keys of one shape cannot be resolved in bulk.
    """

    origin: str | None = field(default=None, kw_only=True)
    per_key: ClassVar[bool] = False

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

    def facts(self) -> frozenset[str]:
        """The model facts (``"$heads"`` …) its parameters name; bound by :meth:`bind` when planning."""
        return frozenset()

    def bind(self, facts: Mapping[str, int]) -> Rule:
        """This rule with every fact in its parameters replaced by its value (itself when it names none)."""
        return self

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

    def _need_invertible(
        self, pattern: Pattern, templates: Sequence[Template], ignore: frozenset[str] | set[str] = frozenset()
    ) -> None:
        if not pattern.invertible:
            raise MappingError(
                f"{self._where()}: cannot invert {pattern.text!r}: anonymous wildcards and 're:' "
                "patterns lose what they matched; name the parts, e.g. '{rest*}' instead of '**'"
            )
        for t, unused in dropped_captures(pattern, templates, ignore):
            raise MappingError(
                f"{self._where()}: cannot invert: template {t.text!r} drops "
                f"{', '.join('{' + n + '}' for n in unused)} captured by {pattern.text!r}"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.described()}>"


def _chain_facts(ops: Sequence[OpCall]) -> frozenset[str]:
    return frozenset().union(*(op.facts() for op in ops)) if ops else frozenset()


def _bind_chain(ops: tuple[OpCall, ...], facts: Mapping[str, int]) -> tuple[OpCall, ...]:
    return tuple(op.bind(facts) for op in ops)


def _via(ops: Sequence[OpCall]) -> str:
    return f" via {', '.join(op.label() for op in ops)}" if ops else ""


def compile_rule_pattern(
    pattern: str, templates: Sequence[Template], where: str, ints: frozenset[str] = frozenset()
) -> Pattern:
    """``pattern`` compiled, its placeholders in ``ints`` or offset by a template (``{i+1}``) matching
    integers only; each template checked to use only what it captures."""
    ints = ints.union(*(t.int_names for t in templates)) if templates else ints
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

    def facts(self) -> frozenset[str]:
        return _chain_facts(self.ops)

    def bind(self, facts: Mapping[str, int]) -> Rule:
        return replace(self, ops=_bind_chain(self.ops, facts)) if self.facts() else self

    def inverse(self) -> Rule:
        self._need_invertible(self.pattern, [self.template])
        ops = self._inverse_ops(self.ops)
        pattern = self.template.inverse_pattern_text(self.pattern.multi_names)
        return Rename(
            compile_rule_pattern(pattern, [Template(self.template.inverse_text(self.pattern))], self._where()),
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
    sizes: tuple[int | str, ...] | None = None
    ops: tuple[OpCall, ...] = ()
    groups: int | str = 1

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    @property
    def output_templates(self) -> tuple[Template, ...]:
        return self.templates

    @property
    def text(self) -> str:
        sizes = f", sizes={list(self.sizes)}" if self.sizes else ""
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        targets = ", ".join(repr(t.text) for t in self.templates)
        return f"split {self.pattern.text!r} -> [{targets}] (dim={self.dim}{sizes}{groups}){_via(self.ops)}"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        n = len(self.templates)
        sizes = list(self.sizes) if self.sizes else None
        params: dict[str, Any] = {"count": n, "dim": self.dim, "sizes": sizes}
        if self.groups != 1:
            params["groups"] = self.groups
        return tuple(
            Output(t.render(captures, self._where), (OpCall("split", {"index": i, **params}), *self.ops))
            for i, t in enumerate(self.templates)
        )

    def fit(
        self, outputs: tuple[Output, ...], shape: Sequence[int], target_shapes: Sequence[Sequence[int] | None]
    ) -> tuple[Output, ...]:
        """``outputs`` of a ``shape``-d tensor, split by the targets' sizes along ``dim`` when this split
        gives none and they are uneven and add up; not with an op chain after the split (the targets'
        shapes are then the chain's, not the parts')."""
        dim = self.dim
        if self.sizes is not None or self.ops or dim >= len(shape):
            return outputs
        if any(s is None or dim >= len(s) for s in target_shapes):
            return outputs
        sizes = [s[dim] for s in target_shapes if s is not None]
        if sum(sizes) != shape[dim] or len(set(sizes)) == 1:
            return outputs
        return tuple(
            o._replace(ops=tuple(OpCall(op.op, {**op.params, "sizes": sizes}) for op in o.ops)) for o in outputs
        )

    def facts(self) -> frozenset[str]:
        return _chain_facts(self.ops) | _facts.refs(self.sizes or ()) | _facts.refs(self.groups)

    def bind(self, facts: Mapping[str, int]) -> Rule:
        if not self.facts():
            return self
        sizes = _facts.bind(self.sizes, facts)
        return replace(self, sizes=sizes, groups=_facts.bind(self.groups, facts), ops=_bind_chain(self.ops, facts))

    def inverse(self) -> Rule:
        self._need_invertible(self.pattern, self.templates)
        patterns = tuple(t.inverse_pattern_text(self.pattern.multi_names) for t in self.templates)
        template = Template(self.templates[0].inverse_text(self.pattern))
        ops = self._inverse_ops(self.ops)
        sources = tuple(compile_rule_pattern(p, [template], self._where()) for p in patterns)
        return Fuse(sources, template, self.dim, ops, self.groups, origin=self.origin)


@dataclass(frozen=True, eq=False)
class Fuse(Rule):
    """Several source tensors concatenated along ``dim`` into one target."""

    sources: tuple[Pattern, ...]
    template: Template
    dim: int = 0
    ops: tuple[OpCall, ...] = ()  # applied to each input before the fuse
    groups: int | str = 1

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return self.sources

    @property
    def output_templates(self) -> tuple[Template, ...]:
        return (self.template,)

    @property
    def text(self) -> str:
        sources = ", ".join(repr(p.text) for p in self.sources)
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        return f"fuse [{sources}] -> {self.template.text!r} (dim={self.dim}{groups}){_via(self.ops)}"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        target = self.template.render(captures, self._where)
        return (Output(target, self.ops, (index, len(self.sources)), self.dim, self.groups),)  # type: ignore[arg-type]

    def facts(self) -> frozenset[str]:
        return _chain_facts(self.ops) | _facts.refs(self.groups)

    def bind(self, facts: Mapping[str, int]) -> Rule:
        if not self.facts():
            return self
        return replace(self, groups=_facts.bind(self.groups, facts), ops=_bind_chain(self.ops, facts))

    def inverse(self) -> Rule:
        for p in self.sources:
            self._need_invertible(p, [self.template])
        templates = tuple(Template(self.template.inverse_text(p)) for p in self.sources)
        ops = self._inverse_ops(self.ops)
        pattern = self.template.inverse_pattern_text(self.sources[0].multi_names)
        return Split(
            compile_rule_pattern(pattern, templates, self._where()),
            templates,
            self.dim,
            None,
            ops,
            self.groups,
            origin=self.origin,
        )


UNSTACK_MARK = "\ue001"  # stands for the index in an unstack's target names until routing knows the count


@dataclass(frozen=True, eq=False)
class _OverIndex(Rule):
    """What :class:`Stack` and :class:`Unstack` share: a pattern, a template, the integer placeholder
    ``over`` that indexes the parts (only on the per-part side), the stacked dimension and an op chain."""

    pattern: Pattern
    template: Template
    over: str
    dim: int = 0
    ops: tuple[OpCall, ...] = ()  # on each part: before a stack, after an unstack
    kind: ClassVar[str] = ""

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    @property
    def output_templates(self) -> tuple[Template, ...]:
        return (self.template,)

    @property
    def text(self) -> str:
        over = "{" + self.over + "}"
        return (
            f"{self.kind} {self.pattern.text!r} over {over} -> {self.template.text!r} (dim={self.dim}){_via(self.ops)}"
        )

    def facts(self) -> frozenset[str]:
        return _chain_facts(self.ops)

    def bind(self, facts: Mapping[str, int]) -> Rule:
        return replace(self, ops=_bind_chain(self.ops, facts)) if self.facts() else self

    def _inverted(self, kind: type[_OverIndex], ints: frozenset[str]) -> Rule:
        self._need_invertible(self.pattern, [self.template], ignore={self.over})
        back = Template(self.template.inverse_text(self.pattern))
        pattern = self.template.inverse_pattern_text(self.pattern.multi_names)
        templates = [back] if ints else []  # a stack's pattern checks its template; an unstack's names {over}
        compiled = compile_rule_pattern(pattern, templates, self._where(), ints)
        return kind(compiled, back, self.over, self.dim, self._inverse_ops(self.ops), origin=self.origin)


@dataclass(frozen=True, eq=False)
class Stack(_OverIndex):
    """Keys that differ only in the integer placeholder ``over`` (``experts.{e}.w1``), stacked in its
    order along a new dimension ``dim`` into one target; every index from 0 up must be present."""

    kind: ClassVar[str] = "stack"
    per_key: ClassVar[bool] = True

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        target = self.template.render(captures, self._where)
        ops = (*self.ops, OpCall("unsqueeze", {"dim": self.dim}))
        return (Output(target, ops, (int(captures[self.over]), 0), self.dim),)

    def inverse(self) -> Rule:
        return self._inverted(Unstack, frozenset())


@dataclass(frozen=True, eq=False)
class Unstack(_OverIndex):
    """One tensor into one target per index along ``dim``, named by the placeholder ``over`` of the
    template (``experts.{e}.w1``): the inverse of :class:`Stack`. The count is the tensor's size."""

    kind: ClassVar[str] = "unstack"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        """One output whose name holds :data:`UNSTACK_MARK` for the index: routing makes one per
        index once it knows the tensor's size (:meth:`expand`)."""
        return (Output(self.template.render({**captures, self.over: UNSTACK_MARK}, self._where), self.ops),)

    def expand(self, output: Output, count: int) -> tuple[Output, ...]:
        take = [OpCall("take", {"index": i, "dim": self.dim}) for i in range(count)]
        return tuple(Output(output.target.replace(UNSTACK_MARK, str(i)), (t, *self.ops)) for i, t in enumerate(take))

    def inverse(self) -> Rule:
        return self._inverted(Stack, frozenset({self.over}))


@dataclass(frozen=True, eq=False)
class Tie(Rule):
    """Target ``target``, when nothing in the source feeds it, takes what feeds target ``like``:
    a tied ``lm_head`` that a checkpoint omits, filled from the embeddings. Both are target names."""

    target: str
    like: str

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return ()

    @property
    def text(self) -> str:
        return f"tie {self.target!r} like {self.like!r} (absent from the source)"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        return ()

    def inverse(self) -> None:
        return None


def dropped_captures(
    pattern: Pattern, templates: Sequence[Template], ignore: frozenset[str] | set[str] = frozenset()
) -> list[tuple[Template, list[str]]]:
    """Each template that leaves out placeholders ``pattern`` captures (but those in ``ignore``: a
    stack's index), with them: such a rule sends many keys to one name, and its inverse could not
    restore them."""
    found = [(t, [n for n in pattern.names if n not in t.names and n not in ignore]) for t in templates]
    return [(t, names) for t, names in found if names]
