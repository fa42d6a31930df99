"""The plan as data: :class:`Target`, :class:`Input`, :class:`Recipe`, :class:`TransferPlan`, and
the one recipe evaluator, :func:`evaluate`.

Planning (:mod:`weightport.planning`) builds these; applying (:mod:`weightport.apply`) consumes
them. The same evaluator infers a recipe's shape on meta tensors while planning
(:func:`infer_shape`) and computes its values while applying, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
from collections import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, NamedTuple

import torch
from torch import nn

from weightport._html import render
from weightport._tuples import rows
from weightport.mapping.ops import OpCall, fuse
from weightport.mapping.rules import Rule
from weightport.options import ApplyOptions, PlanOptions, split_options, takes_options
from weightport.report import Entry, TransferReport
from weightport.sources.base import Source

__all__ = ["Input", "LoadedLane", "Recipe", "Recipes", "Target", "TransferPlan", "evaluate", "infer_shape"]


class Target(NamedTuple):
    """One target tensor in scope.

    Attributes:
        name: Its key relative to the scope.
        tensor: The parameter or buffer object itself.
        is_parameter: Parameter (not buffer).
        canonical: The first key of its group of tied names (itself when not tied).
    """

    name: str
    tensor: torch.Tensor
    is_parameter: bool
    canonical: str


class Input(NamedTuple):
    """One source tensor feeding a recipe, with the ops applied to it alone."""

    key: str
    ops: tuple[OpCall, ...] = ()


class Recipe(NamedTuple):
    """How to compute one target tensor from the source.

    The value is ``post(fuse(ops_i(source[key_i]) for each input))``, or without the fuse
    for a single input (see :func:`evaluate`).
    """

    target: str
    inputs: tuple[Input, ...]
    fuse_dim: int | None
    post: tuple[OpCall, ...]
    rule: Rule | None
    shape: tuple[int, ...] | None  # None: produced by a callable that could not run on meta
    fuse_groups: int = 1  # the fuse interleaves this many blocks of each input (grouped-query layouts)

    @property
    def ops(self) -> tuple[OpCall, ...]:
        return tuple(op for i in self.inputs for op in i.ops) + self.post

    @property
    def plain(self) -> bool:
        """One input, no ops, no fuse: the value is the source tensor itself."""
        return self.fuse_dim is None and not self.post and len(self.inputs) == 1 and not self.inputs[0].ops

    @property
    def adapted(self) -> bool:
        """Some op changes values to fit (an adapter, ``pad``, ``scale``, a callable): the report's
        ``adapted``. Exact layout ops and fuses re-lay out the source's values: ``loaded``."""
        return not all(op.exact for op in self.ops)

    def labels(self) -> tuple[str, ...]:
        """The report's description of the ops, in order."""
        chains = [[op.label() for op in i.ops] for i in self.inputs]
        if all(c == chains[0] for c in chains):  # one input, or a fuse rule's chain on every input
            labels = chains[0]
        else:  # inputs with chains of their own (parts a module's loading hook merges): numbered
            labels = [f"[{n}] {label}" for n, chain in enumerate(chains, 1) for label in chain]
        if self.fuse_dim is not None:
            groups = f", groups={self.fuse_groups}" if self.fuse_groups != 1 else ""
            labels.append(f"fuse[{len(self.inputs)}{groups}]")
        labels.extend(op.label() for op in self.post)
        return tuple(labels)

    def source_shape(self, source: Source) -> tuple[int, ...]:
        """The source's shape as the report shows it: the input's, or the fused inputs' together."""
        shapes = [tuple(source.meta(i.key).shape) for i in self.inputs]
        first = list(shapes[0])
        if self.fuse_dim is not None and len(shapes) > 1 and self.fuse_dim < len(first):
            first[self.fuse_dim] = sum(s[self.fuse_dim] for s in shapes if self.fuse_dim < len(s))
        return tuple(first)


def evaluate(recipe: Recipe, read: Callable[[str], torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """The recipe's value from ``read(key)`` for each input: source views to compute values,
    meta tensors to infer the shape (:func:`infer_shape`)."""
    xs = []
    for inp in recipe.inputs:
        x = read(inp.key)
        for op in inp.ops:
            x = op.run(x, target)
        xs.append(x)
    out = fuse(xs, recipe.fuse_dim, recipe.fuse_groups) if recipe.fuse_dim is not None else xs[0]
    for op in recipe.post:
        out = op.run(out, target)
    return out


def infer_shape(recipe: Recipe, source: Source, target: torch.Tensor) -> tuple[int, ...]:
    """The shape the recipe produces, by :func:`evaluate` on meta tensors (no data read).

    Raises:
        OpError: an op cannot run on the inputs' shapes.
    """
    if recipe.plain:
        return tuple(source.meta(recipe.inputs[0].key).shape)

    def meta(key: str) -> torch.Tensor:
        m = source.meta(key)
        return torch.empty(m.shape, dtype=m.dtype, device="meta")

    return tuple(evaluate(recipe, meta, torch.empty(target.shape, dtype=target.dtype, device="meta")).shape)


class LoadedLane(NamedTuple):
    """Targets loaded from one source tensor as it is, as columns (the bulk of a large model):
    ``Recipe(names[i], (Input(keys[i]),), None, (), rules[i], shapes[i])`` each."""

    names: list[str]
    keys: list[str]
    rules: list[Rule | None]
    shapes: list[tuple[int, ...]]

    def recipe(self, i: int) -> Recipe:
        return Recipe(self.names[i], (Input(self.keys[i]),), None, (), self.rules[i], self.shapes[i])

    def recipes(self) -> Iterator[Recipe]:
        inputs = zip(rows(Input, self.keys, repeat(())))
        return rows(Recipe, self.names, inputs, repeat(None), repeat(()), self.rules, self.shapes, repeat(1))


class Recipes(abc.Mapping):  # type: ignore[type-arg]  # Mapping[str, Recipe]
    """A plan's recipes by canonical target name: those with ops or several inputs, then the plain
    loads, each of those made only when asked for (a 100k-key model would otherwise cost 100k
    recipes up front)."""

    def __init__(self, decided: dict[str, Recipe], lane: LoadedLane) -> None:
        self._decided = decided
        self.lane = lane
        self._index: dict[str, int] | None = None

    def __getitem__(self, name: str) -> Recipe:
        recipe = self._decided.get(name)
        if recipe is not None:
            return recipe
        if self._index is None:
            self._index = dict(zip(self.lane.names, range(len(self.lane.names))))
        return self.lane.recipe(self._index[name])

    def __iter__(self) -> Iterator[str]:
        return chain(self._decided, self.lane.names)

    def __len__(self) -> int:
        return len(self._decided) + len(self.lane.names)

    def values(self) -> Iterator[Recipe]:  # type: ignore[override]
        return chain(self._decided.values(), self.lane.recipes())

    def items(self) -> Iterator[tuple[str, Recipe]]:  # type: ignore[override]
        return ((r.target, r) for r in self.values())


Applier = Callable[["TransferPlan", ApplyOptions], TransferReport]


@dataclass(eq=False)
class TransferPlan:
    """A decided transfer, not yet applied: ``plan.apply()`` performs it.

    Attributes:
        source: The opened source.
        scope: The module tensors are loaded into (``into`` resolved).
        targets: Every target tensor in scope by name.
        recipes: How each loaded or adapted target (canonical names) is computed.
        report: The preview :class:`TransferReport` (``applied=False``).
        options: The planning options it was made with.
        apply_options: The options :meth:`apply` uses unless told otherwise.
        applier: What performs it (:func:`weightport.apply.apply_plan`, handed over by the builder
            so that the plan's data never imports the code that applies it).
        applied: Set once it has been applied: a plan applies once.
        model: The whole model (``scope`` is part of it, or it).
        materialise: Meta tensors of the model outside the targets that applying makes real
            (outside ``into=``; non-persistent buffers), so nothing stays on meta.
    """

    source: Source
    scope: nn.Module
    targets: dict[str, Target]
    recipes: Recipes
    report: TransferReport
    options: PlanOptions
    apply_options: ApplyOptions
    applier: Applier
    applied: bool = False
    model: nn.Module | None = None
    materialise: Any = None  # planning.targets.Materialise (data imports nothing from planning)

    @property
    def into(self) -> str | None:
        return self.options.into

    @property
    def entries(self) -> Sequence[Entry]:
        return self.report.entries

    @takes_options(ApplyOptions)
    def apply(self, **options: Any) -> TransferReport:
        """Perform the transfer: all or nothing.

        Args:
            {options}

        Options not given keep the values the plan was made with.

        Raises:
            PlanError: the plan was applied already, or the model changed since planning.
            WeightportError: reading, an op, or a check failed; the model is unchanged.
        """
        split_options(options, (ApplyOptions,), where="TransferPlan.apply")  # names and values checked
        return self.applier(self, dataclasses.replace(self.apply_options, **options))

    def summary(self) -> str:
        return self.report.summary()

    def to_html(self) -> str:
        """The preview as HTML for notebooks (:meth:`TransferReport.to_html`), saying that nothing is
        applied until :meth:`apply`."""
        if self.applied:
            return render(self.report, "weightport plan, applied: its preview (apply() returned the report)")
        return render(self.report, "weightport plan: a preview, nothing applied yet (plan.apply() performs it)")

    def _repr_html_(self) -> str:
        return self.to_html()

    def __str__(self) -> str:
        return str(self.report)

    def __repr__(self) -> str:
        return f"<TransferPlan {len(self.recipes)} to load, {len(self.report.fresh)} fresh>"
