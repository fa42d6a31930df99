"""Deciding: one loop over the target tensors, in the model's order, that gives each its recipe
or the reason it stays fresh.

Each target first tries the cheap branch: one candidate, taken as it is (no op, no fuse), an
untied target, equal shapes. Such a target is loaded as it is and appended to the plan's
columns (:class:`~weightport.planning.data.LoadedLane`): nearly every tensor of a large model.
Everything else falls through to the general decision in the same loop: ties, fuses and
their parts, collisions, ops, shape inference, the mismatch policy and adapters. The cheap
branch is the general decision's answer for the case it covers, taken without building
the objects the general decision needs.
"""

from __future__ import annotations

from collections import abc
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from weightport.errors import Collision, CollisionError, Mismatch, OpError, ShapeMismatchError
from weightport.mapping.ops import OpCall, get_op
from weightport.mapping.rules import Rule, Tie
from weightport.options import OnMismatch
from weightport.planning.data import Input, LoadedLane, Recipe, Target, infer_shape
from weightport.planning.route import Candidate, Routes
from weightport.sources.base import Source, TensorMeta

__all__ = ["Decisions", "decide"]

Fresh = tuple[str, "tuple[int, ...] | None"]  # (reason, source shape)
Cheap = tuple[str, "Rule | None", tuple[int, ...]]  # (key, rule, source shape)


@dataclass
class Decisions:
    """What the loop decided.

    Attributes:
        lane: Targets loaded as they are, as columns, in the model's order.
        recipes: The other loaded or adapted targets' recipes, by canonical name.
        fresh: Why each canonical target that loads nothing stays fresh, and the source's shape
            when one was refused.
        unused: Source keys fed somewhere but not used after all, with the reason.
        warnings: Things worth a look.
    """

    lane: LoadedLane
    recipes: dict[str, Recipe] = field(default_factory=dict)
    fresh: dict[str, Fresh] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def decide(
    source: Source,
    targets: dict[str, Target],
    ties: dict[str, list[str]],
    routes: Routes,
    on_mismatch: OnMismatch,
    scope: nn.Module,
    adapters: tuple[tuple[str, dict[str, Any]], ...] = (),
    fallbacks: abc.Mapping[str, Tie] | None = None,
) -> Decisions:
    """Every canonical target's recipe or fresh reason; ``adapters`` (name, fixed params) are
    tried in order on a shape mismatch.

    Raises:
        CollisionError: several source tensors would write one target (all are listed).
        ShapeMismatchError: ``on_mismatch='error'`` and shapes differ (all are listed).
    """
    out = Decisions(LoadedLane([], [], [], []))
    cheap = _as_is(source, routes.single, set(ties).union(*ties.values()) if ties else set())
    general = _General(source, targets, ties, routes, on_mismatch, scope, out, adapters, dict(fallbacks or {}))
    loaded: list[str] = []
    taken: list[Cheap] = []
    for name, target in targets.items():
        c = cheap.get(name)
        if c is not None and c[2] == target.tensor.shape:
            loaded.append(name)
            taken.append(c)
        elif target.canonical == name:  # a tied name is decided with its canonical name
            general.decide(name)
    general.raise_errors()
    if taken:
        keys, rules, shapes = map(list, zip(*taken))
        out.lane = LoadedLane(loaded, keys, rules, shapes)
    return out


def _as_is(source: Source, single: dict[str, Candidate], tied: set[str]) -> dict[str, Cheap]:
    """``(key, rule, source shape)`` of every untied target's single candidate taken as it is; the
    shapes come from one bulk lookup."""
    names = [n for n, c in single.items() if not c.output.ops and c.output.part is None and n not in tied]
    cands = list(map(single.__getitem__, names))
    keys = [c.key for c in cands]
    return dict(zip(names, zip(keys, [c.rule for c in cands], source.shapes(keys))))


@dataclass
class _General:
    """The general decision for one canonical target (and the names tied to it)."""

    source: Source
    targets: dict[str, Target]
    ties: dict[str, list[str]]
    routes: Routes
    on_mismatch: OnMismatch
    scope: nn.Module
    out: Decisions
    adapters: tuple[tuple[str, dict[str, Any]], ...] = ()
    fallbacks: dict[str, Tie] = field(default_factory=dict)  # tie rules by target name
    collisions: list[Collision] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dropped = set(self.routes.dropped)

    def decide(self, canonical: str) -> None:
        group = [canonical, *self.ties.get(canonical, ())]
        found = [(n, c) for n in group if (c := self.routes.candidates(n)) is not None]
        if not found:
            found = self._tied_by_rule(group)
        if not found:
            reason = "dropped" if any(n in self.dropped for n in group) else "missing"
            self.out.fresh[canonical] = (reason, None)
            return
        chosen, cands = found[0]
        for other, other_cands in found[1:]:
            self._tied(chosen, cands[0].key, other, other_cands)
        recipe = self._recipe(chosen, cands)
        tie = self.fallbacks.get(chosen)
        if recipe is not None and tie is not None and self.routes.candidates(chosen) is None:
            recipe = recipe._replace(rule=tie)  # the report names the tie that filled it
        if recipe is None:
            self.out.fresh[canonical] = ("missing", None)
            return
        fitted = self._fit(recipe, self.targets[chosen])
        if fitted is None:
            self.out.fresh[canonical] = ("shape mismatch", recipe.source_shape(self.source))
            for inp in recipe.inputs:
                self.out.unused[inp.key] = f"shape mismatch with {chosen!r}"
            return
        self.out.recipes[canonical] = fitted._replace(target=canonical)

    def _tied_by_rule(self, group: list[str]) -> list[tuple[str, list[Candidate]]]:
        """For a target the source does not feed: the candidates of the target a tie rule names."""
        for name in group:
            tie = self.fallbacks.get(name)
            like = self.routes.candidates(tie.like) if tie is not None else None
            if like:
                return [(name, like)]
        return []

    def _tied(self, chosen: str, chosen_key: str, other: str, cands: list[Candidate]) -> None:
        keys = [c.key for c in cands if not self.source.same_tensor(c.key, chosen_key)]
        if not keys:
            return  # the source ties them too
        self.out.warnings.append(
            f"{chosen!r} and {other!r} are one tied tensor: loaded from {chosen_key!r}, "
            f"ignored {', '.join(map(repr, keys))}"
        )
        for k in keys:
            self.out.unused[k] = f"{other!r} is tied to {chosen!r}, which was loaded"

    def _recipe(self, name: str, cands: list[Candidate]) -> Recipe | None:
        """The recipe the candidates make, or ``None`` (a collision, or an incomplete fuse)."""
        first = cands[0]
        part = first.output.part
        if part is not None and all(c.output.part is not None and c.rule is first.rule for c in cands):
            return self._fused(name, cands, part[1])
        if len(cands) > 1:
            self.collisions.append(Collision(name, tuple(c.key for c in cands), tuple(_text(c) for c in cands)))
            return None
        return Recipe(name, (Input(first.key, first.output.ops),), None, (), first.rule, None)

    def _fused(self, name: str, cands: list[Candidate], count: int) -> Recipe | None:
        """A fuse of ``count`` parts, or a stack (``count`` 0) of as many as its indices say."""
        if count == 0:
            count = 1 + max(c.output.part[0] for c in cands)  # type: ignore[index]
        slots: dict[int, Candidate] = {}
        for c in cands:
            index = c.output.part[0]  # type: ignore[index]
            if index in slots:
                self.collisions.append(
                    Collision(name, (slots[index].key, c.key), (_text(c), _text(c)), f"both part {index + 1}")
                )
            slots[index] = c
        missing = [i + 1 for i in range(count) if i not in slots]
        if missing:
            keys = [c.key for c in slots.values()]
            self.out.warnings.append(
                f"fuse into {name!r} is incomplete: part(s) {missing} of {count} not in the "
                f"source (have {', '.join(map(repr, keys))})"
            )
            for k in keys:
                self.out.unused[k] = f"incomplete fuse into {name!r}"
            return None
        inputs = tuple(Input(slots[i].key, slots[i].output.ops) for i in range(count))
        out = cands[0].output
        # ops on the fused tensor: a module's own loading hook merging the parts (HookFuse), or
        # transformers' stacked-then-concatenated experts (mapping.hf_conversion)
        post = getattr(cands[0].rule, "post", ())
        return Recipe(name, inputs, out.dim, post, cands[0].rule, None, out.groups)

    def _fit(self, recipe: Recipe, target: Target) -> Recipe | None:
        """The recipe with its shape inferred; the mismatch policy where it is not the target's."""
        want = tuple(target.tensor.shape)
        try:
            shape = infer_shape(recipe, self.source, target.tensor)
        except OpError as e:
            if any(op.fn is not None for op in recipe.ops):
                return recipe  # a callable that cannot run on meta: checked when applied
            self._mismatch(Mismatch(recipe.target, _keys(recipe), None, want, str(e)))
            return None
        if shape == want:
            return recipe._replace(shape=shape)
        if self.adapters:
            adapted = self._adapt(recipe, target, shape)
            if adapted is not None:
                return adapted
        self._mismatch(Mismatch(recipe.target, _keys(recipe), shape, want))
        return None

    def _mismatch(self, mismatch: Mismatch) -> None:
        if self.on_mismatch == "error":
            self.mismatches.append(mismatch)
        elif mismatch.detail is not None:
            self.out.warnings.append(f"skipped {mismatch}")

    def _adapt(self, recipe: Recipe, target: Target, shape: tuple[int, ...]) -> Recipe | None:
        """The recipe with the first of :attr:`adapters` that fits appended, or ``None``.

        Each adapter's ``applies`` sees the target name, the shape the rule's ops produce, the
        target tensor (maybe on meta) and its owner module; the adapter is then checked on meta
        tensors to give exactly the target's shape.
        """
        owner = _owner(self.scope, target.name)
        meta = TensorMeta(shape, self.source.meta(recipe.inputs[0].key).dtype)
        want = tuple(target.tensor.shape)
        for name, fixed in self.adapters:
            params = _adapter_params(name, target, meta, owner)
            if params is None:
                continue
            params.update(fixed)
            candidate = recipe._replace(post=recipe.post + (OpCall(name, params),))
            try:
                got = infer_shape(candidate, self.source, target.tensor)
            except OpError:
                continue
            if got == want:
                return candidate._replace(shape=got)
        return None

    def raise_errors(self) -> None:
        if self.collisions:
            raise CollisionError(self.collisions)
        if self.mismatches:
            raise ShapeMismatchError(self.mismatches)


def _text(c: Candidate) -> str | None:
    return c.rule.described() if c.rule is not None else None


def _keys(recipe: Recipe) -> tuple[str, ...]:
    return tuple(i.key for i in recipe.inputs)


def _adapter_params(name: str, target: Target, meta: TensorMeta, owner: nn.Module | None) -> dict[str, Any] | None:
    applies = get_op(name).applies
    if applies is None:
        return None
    try:
        return applies(name=target.name, source=meta, target=target.tensor, module=owner)
    except OpError:
        return None


def _owner(scope: nn.Module, name: str) -> nn.Module | None:
    path = name.rpartition(".")[0]
    try:
        return scope.get_submodule(path) if path else scope
    except AttributeError:
        return None
