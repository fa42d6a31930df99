"""Planning: match source names against the target, decide every tensor's fate, read no data.

:func:`build_plan` routes every source key through the mapping, matches the
results against the target's parameters and persistent buffers, infers the
shape each op chain produces by running it on meta tensors, applies the
mismatch policy and the strictness checks, and returns a :class:`TransferPlan`.
Nothing is written and no tensor data is read until :meth:`TransferPlan.apply`.

Two paths decide the same way (a differential test holds them to it): the *plain
lane* takes the keys loaded as they are into an untied target of the same shape
that no other key feeds, and decides them column by column, with the loops in C;
the *general path* decides the rest one key at a time (collisions, ties, fuses,
splits, ops, adapters, the mismatch policy, modules with loading hooks).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections import Counter, abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, filterfalse, repeat
from operator import attrgetter, eq, itemgetter
from typing import Any, NamedTuple

import torch
from torch import nn

from weightport._gc import gc_paused
from weightport._hooks import has_custom_loading, replay
from weightport.errors import (
    CollisionError,
    OpError,
    PlanError,
    ShapeMismatchError,
    StrictnessError,
    TargetError,
)
from weightport.mapping._bulk import Group
from weightport.mapping.core import Mapping, Resolution
from weightport.mapping.files import shipped_dir
from weightport.mapping.ops import OpCall, fuse, get_op, list_adapters
from weightport.mapping.rules import Drop, Output, Rename, Rule, Split
from weightport.report import FIELDS, Entry, EntryTable, LoadedColumns, TransferReport, group_names
from weightport.sources.base import Source, TensorMeta

ON_MISMATCH = ("skip", "adapt", "error")
_tuple = tuple.__new__  # builds a named tuple from a tuple of all its fields, in C
_STATUS, _REASON = FIELDS.index("status"), FIELDS.index("reason")


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
    for a single input.
    """

    target: str
    inputs: tuple[Input, ...]
    fuse_dim: int | None
    post: tuple[OpCall, ...]
    rule: Rule | None
    shape: tuple[int, ...] | None  # None: produced by a callable we could not run on meta

    @property
    def ops(self) -> tuple[OpCall, ...]:
        if len(self.inputs) == 1:
            return self.inputs[0].ops + self.post
        return tuple(op for i in self.inputs for op in i.ops) + self.post

    @property
    def plain(self) -> bool:
        """One input, no ops, no fuse: the value is the source tensor itself."""
        return self.fuse_dim is None and not self.post and len(self.inputs) == 1 and not self.inputs[0].ops

    def labels(self) -> tuple[str, ...]:
        if self.plain:
            return ()
        labels = [op.label() for op in (self.inputs[0].ops if len(self.inputs) == 1 else ())]
        if self.fuse_dim is not None:
            labels.append(f"fuse[{len(self.inputs)}]")
        labels.extend(op.label() for op in self.post)
        return tuple(labels)

    @property
    def adapted(self) -> bool:
        return not self.plain and (bool(self.ops) or self.fuse_dim is not None)


class Recipes(abc.Mapping):  # type: ignore[type-arg]  # Mapping[str, Recipe]
    """A plan's recipes by canonical target name: those decided one by one, then the plain lane's,
    each made when it is asked for (a 100k-key lane would otherwise cost 100k recipes up front)."""

    def __init__(self, decided: dict[str, Recipe], lane: _Lane) -> None:
        self._decided = decided
        self._lane = lane
        self._index: dict[str, int] | None = None

    def _position(self, name: str) -> int | None:
        if self._index is None:
            self._index = dict(zip(self._lane.names, range(len(self._lane.names))))
        return self._index.get(name)

    def __getitem__(self, name: str) -> Recipe:
        recipe = self._decided.get(name)
        if recipe is not None:
            return recipe
        i = self._position(name)
        if i is None:
            raise KeyError(name)
        return self._lane.recipe(i)

    def __contains__(self, name: object) -> bool:
        return name in self._decided or (isinstance(name, str) and self._position(name) is not None)

    def __iter__(self) -> Iterator[str]:
        return chain(self._decided, self._lane.names)

    def __len__(self) -> int:
        return len(self._decided) + len(self._lane.names)

    def items(self) -> Iterator[tuple[str, Recipe]]:  # type: ignore[override]
        return chain(self._decided.items(), self._lane.recipes())

    def values(self) -> Iterator[Recipe]:  # type: ignore[override]
        return map(itemgetter(1), self.items())


class TransferPlan:
    """A decided transfer, not yet applied. ``plan.apply()`` performs it.

    Attributes:
        source: The opened source.
        scope: The module tensors are loaded into (``into`` resolved).
        targets: Every target tensor in scope by name.
        recipes: How each loaded or adapted target (canonical names) is computed.
        report: The preview :class:`TransferReport` (``applied=False``).
        zero_copy: Assign read-only memory-mapped views to meta targets where dtype and layout
            already match (see :func:`weightport.transfer`).
        progress: Progress bar: ``None`` automatic (terminal and large), ``True`` always, ``False`` never.
    """

    def __init__(
        self,
        *,
        source: Source,
        scope: nn.Module,
        into: str | None,
        targets: dict[str, Target],
        recipes: abc.Mapping[str, Recipe],
        report: TransferReport,
        dtype: torch.dtype | None,
        device: torch.device | None,
        check_finite: bool | str,
    ) -> None:
        self.source = source
        self.scope = scope
        self.into = into
        self.targets = targets
        self.recipes = recipes
        self.report = report
        self.dtype = dtype
        self.device = device
        self.check_finite = check_finite
        self.zero_copy = False
        self.progress: bool | None = None
        self._applied = False

    @property
    def entries(self) -> Sequence[Entry]:
        return self.report.entries

    def apply(self) -> TransferReport:
        """Perform the transfer: all or nothing.

        Raises:
            PlanError: the plan was applied already, or the model changed since planning.
            WeightportError: reading, an op, or a check failed; the model is unchanged.
        """
        from weightport.apply import apply_plan

        return apply_plan(self)

    def summary(self) -> str:
        return self.report.summary()

    def __str__(self) -> str:
        return str(self.report)

    def __repr__(self) -> str:
        return f"<TransferPlan {len(self.recipes)} to load, {len(self.report.fresh)} fresh>"


# -- entry point ----------------------------------------------------------------------------------


def build_plan(
    source: Source,
    model: nn.Module,
    mapping: Mapping,
    *,
    into: str | None = None,
    on_mismatch: str = "skip",
    strict: bool = False,
    require: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    check_finite: bool | str = False,
) -> TransferPlan:
    """Decide the fate of every target and source tensor; read no tensor data."""
    with gc_paused():
        return _build_plan(source, model, mapping, into, on_mismatch, strict, require, dtype, device, check_finite)


def _build_plan(
    source: Source,
    model: nn.Module,
    mapping: Mapping,
    into: str | None,
    on_mismatch: str,
    strict: bool,
    require: Sequence[str],
    dtype: torch.dtype | None,
    device: torch.device | None,
    check_finite: bool | str,
) -> TransferPlan:
    if on_mismatch not in ON_MISMATCH:
        raise PlanError(f"on_mismatch must be one of {', '.join(map(repr, ON_MISMATCH))}, not {on_mismatch!r}")
    if check_finite not in (True, False, "report"):
        raise PlanError(f"check_finite must be True, False or 'report', not {check_finite!r}")
    if isinstance(require, str):
        require = (require,)
    scope = scope_of(model, into)
    targets = collect_targets(scope)
    modules = list(scope.modules())
    _check_meta_buffers(scope, modules, targets, into)
    keys = list(source)
    groups = mapping.resolve_groups(keys)
    hooks = any(map(has_custom_loading, modules))
    ties = _ties(targets)
    lane, rest = _plain_lane(keys, groups, targets, ties, hooks)
    routing = _route(source, rest, targets, scope, hooks, _hits(groups))
    lane = _settle(lane, source, targets, routing)
    recipes, fresh_reasons, warnings = _decide(source, targets, ties, routing, on_mismatch, scope, set(lane.names))
    warnings += [f"rule {r.described()} matched no source tensor" for r in _idle_rules(mapping, routing)]
    loaded = lane.columns()
    rows = _rows(source, targets, recipes, fresh_reasons, loaded.names)
    table = EntryTable.from_parts(list(targets), rows, loaded)
    dropped = set(routing.dropped)
    used = routing.used
    unused = [k for k in filterfalse(used.__contains__, keys) if k not in dropped]
    reasons = {k: routing.unused_reasons.get(k, "no target tensor with this name") for k in unused}
    missing = sum(1 for r in rows if r[_REASON] == "missing")
    if unused and missing and len(unused) >= 0.5 * len(source):
        warnings.append(
            f"{len(unused)} source tensors unused and {missing} target tensors missing: the names "
            "probably differ; try a mapping (weightport mappings) or `weightport suggest SOURCE TARGET`"
        )
    _check_strictness(table, unused, strict, require)
    report = TransferReport(
        table,
        tuple(unused),
        tuple(routing.dropped),
        tuple(warnings),
        source.info,
        applied=False,
        into=into,
        unused_reasons=reasons,
    )
    return TransferPlan(
        source=source,
        scope=scope,
        into=into,
        targets=targets,
        recipes=Recipes(recipes, lane),
        report=report,
        dtype=dtype,
        device=device,
        check_finite=check_finite,
    )


def _idle_rules(mapping: Mapping, routing: _Routing) -> list[Rule]:
    """Rules that matched nothing and deserve a warning: not drop rules (nothing to drop is fine), and
    not rules of shipped mappings, which cover a family of variants (a ViT without ``pre_logits``)."""
    shipped = str(shipped_dir())
    return [
        r
        for r in mapping.rules
        if routing.hits[id(r)] == 0 and not isinstance(r, Drop) and not (r.origin or "").startswith(shipped)
    ]


def scope_of(model: nn.Module, into: str | None) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TargetError(f"the target must be an nn.Module, not {type(model).__name__}")
    if not into:
        return model
    try:
        return model.get_submodule(into)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(into, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise TargetError(f"into={into!r}: the model has no submodule of that name{hint}") from None


def state_tensors(scope: nn.Module) -> dict[str, Any]:
    """``scope.state_dict(keep_vars=True)``, without its per-module calls where no module changes
    what it would give: no module overrides ``state_dict``, ``_save_to_state_dict`` or
    ``get_extra_state``, nor has a state-dict hook (a 100k-parameter model: 0.06 s instead of
    0.13 s here). Anything else takes ``state_dict`` itself."""
    plain: dict[type, bool] = {}
    out: dict[str, Any] = {}
    stack: list[tuple[str, nn.Module]] = [("", scope)]
    pop, push = stack.pop, stack.extend
    while stack:
        prefix, module = pop()
        kind = type(module)
        ok = plain.get(kind)
        if ok is None:
            ok = plain[kind] = (
                kind.state_dict is nn.Module.state_dict
                and kind._save_to_state_dict is nn.Module._save_to_state_dict
                and getattr(kind, "get_extra_state", nn.Module.get_extra_state) is nn.Module.get_extra_state
            )
        if not ok or module._state_dict_hooks or module._state_dict_pre_hooks:
            return scope.state_dict(keep_vars=True)
        for name, param in module._parameters.items():
            if param is not None:
                out[prefix + name] = param
        if module._buffers:
            skip = module._non_persistent_buffers_set
            for name, buf in module._buffers.items():
                if buf is not None and name not in skip:
                    out[prefix + name] = buf
        if module._modules:  # children in order: pushed last to first
            push((f"{prefix}{name}.", child) for name, child in reversed(module._modules.items()) if child is not None)
    return out


def collect_targets(scope: nn.Module) -> dict[str, Target]:
    """Parameters and persistent buffers by state-dict name, tied names grouped."""
    state = state_tensors(scope)
    names, tensors = list(state), list(state.values())
    # isinstance(t, torch.Tensor) goes through torch's metaclass (0.35 us a call here): test the few
    # distinct types instead
    types = list(map(type, tensors))
    if not all(issubclass(k, torch.Tensor) for k in set(types)):  # _extra_state and the like
        keep = [issubclass(k, torch.Tensor) for k in types]
        names, tensors = list(compress(names, keep)), list(compress(tensors, keep))
    ids = list(map(id, tensors))
    if len(set(ids)) == len(ids):  # nothing tied: every name is its own canonical name
        canonical: list[str] = names
    else:
        first: dict[int, str] = {}
        canonical = [first.setdefault(i, n) for i, n in zip(ids, names)]
    parameters = map(isinstance, tensors, repeat(nn.Parameter))  # fast for exact Parameters
    # in bulk, in C: a 100k-parameter model's targets in a few hundredths of a second
    return dict(zip(names, map(_tuple, repeat(Target), zip(names, tensors, parameters, canonical))))


def _check_meta_buffers(
    scope: nn.Module, modules: list[nn.Module], targets: dict[str, Target], into: str | None
) -> None:
    if not any(b is not None and b.is_meta for m in modules for b in m._buffers.values()):
        return  # the common case, without naming every buffer
    lost = [n for n, b in scope.named_buffers() if b.is_meta and n not in targets]
    if lost:
        raise PlanError(
            f"non-persistent buffer(s) {', '.join(lost[:5])} are on the meta device: no checkpoint holds "
            "them and their values cannot be recomputed. Build the model with weightport.init_empty() "
            "(parameters on meta, buffers real) instead of torch.device('meta')"
        )


# -- routing: names only ----------------------------------------------------------------------------


@dataclass
class _Routing:
    candidates: dict[str, list[tuple[str, Rule | None, Output]]]
    used: set[str]
    dropped: list[str]
    unused_reasons: dict[str, str]
    hits: Counter[int]


def _hits(groups: list[Group]) -> Counter[int]:
    """How many keys each rule decided, by ``id(rule)``."""
    hits: Counter[int] = Counter()
    for g in groups:
        if g.resolutions is not None:
            hits.update(id(r.rule) for r in g.resolutions if r.rule is not None)
        elif g.rule is not None:
            hits[id(g.rule)] += len(g.positions)
    return hits


def _route(
    source: Source,
    resolved: list[tuple[str, Resolution]],
    targets: dict[str, Target],
    scope: nn.Module,
    hooks: bool,
    hits: Counter[int],
) -> _Routing:
    """Candidates per target name for the keys the plain lane did not take."""
    r = _Routing({}, set(), [], {}, hits)
    routed: list[tuple[str, Rule | None, Output]] = []
    append = routed.append
    for key, (rule, outputs) in resolved:
        if rule is not None:
            if isinstance(rule, Drop):
                r.dropped.append(key)
                continue
            if isinstance(rule, Split):
                outputs = _auto_split_sizes(source, key, rule, outputs, targets)
        for out in outputs:
            append((key, rule, out))
    if hooks:
        # lazy: hooks look at the few keys under their module; other shards stay closed
        routed = replay(
            scope, routed, _LazyMeta(source, "shape"), _LazyMeta(source, "dtype"), source.state_dict_metadata
        )
    candidates, used = r.candidates, r.used
    for item in routed:
        key, _, out = item
        target = out.target
        if target in targets:
            candidates.setdefault(target, []).append(item)
            used.add(key)
        elif key not in used:
            r.unused_reasons[key] = f"no target tensor named {target!r}"
    return r


# -- the plain lane: most keys of a large model, decided column by column ----------------------------


@dataclass
class _Lane:
    """Source keys loaded as they are (their own name, or a rename without ops) into an untied target
    of the same shape that no other key feeds: nearly every key of a large model. They are decided in
    bulk — lists mapped and zipped in C — rather than through candidates one key at a time."""

    names: list[str]
    keys: list[str]
    rules: list[Rule | None]
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # set by _settle
    params: list[bool] = field(default_factory=list)  # set by _settle

    def recipe(self, i: int) -> Recipe:
        return Recipe(self.names[i], (Input(self.keys[i]),), None, (), self.rules[i], self.shapes[i])

    def recipes(self) -> Iterator[tuple[str, Recipe]]:
        inputs = zip(map(_tuple, repeat(Input), zip(self.keys, repeat(()))))  # (Input(key),) each
        fields = zip(self.names, inputs, repeat(None), repeat(()), self.rules, self.shapes)
        return zip(self.names, map(_tuple, repeat(Recipe), fields))

    def columns(self) -> LoadedColumns:
        """The lane's report entries, as columns (rows are made only if they are listed)."""
        texts: dict[Rule | None, str | None] = {r: r.described() for r in set(self.rules) if r is not None}
        texts[None] = None
        return LoadedColumns(self.names, self.keys, list(map(texts.__getitem__, self.rules)), self.shapes, self.params)

    def take(self, keep: Iterable[bool]) -> _Lane:
        mask = list(keep)
        return _Lane(
            list(compress(self.names, mask)),
            list(compress(self.keys, mask)),
            list(compress(self.rules, mask)),
            list(compress(self.shapes, mask)),
            list(compress(self.params, mask)),
        )


def _plain_lane(
    keys: list[str],
    groups: list[Group],
    targets: dict[str, Target],
    ties: dict[str, list[str]],
    hooks: bool,
) -> tuple[_Lane, list[tuple[str, Resolution]]]:
    """Split the keys: candidates for the plain lane, and the rest (``(key, resolution)`` in
    source order). Groups of keys renamed alike are split with C-level maps, not key by key."""
    lane = _Lane([], [], [])
    rest: list[tuple[int, str, Resolution]] = []
    tied = set(ties).union(*ties.values()) if ties else set()

    def solo(name: str) -> bool:
        return name in targets and name not in tied

    for g in groups:
        rule = g.rule
        plain = not hooks and _as_is(rule)
        group_keys = list(map(keys.__getitem__, g.positions))
        if g.names is not None:
            o = g.output
            assert o is not None
            if not plain:
                fits = [False] * len(g.names)
            else:
                fits = list(map(solo if tied else targets.__contains__, g.names))
            lane.names += compress(g.names, fits)
            lane.keys += compress(group_keys, fits)
            lane.rules += repeat(rule, sum(fits))
            if not all(fits):
                for position, key, name, ok in zip(g.positions, group_keys, g.names, fits):
                    if not ok:
                        rest.append((position, key, Resolution(rule, (Output(name, o.ops, o.part, o.dim),))))
            continue
        assert g.resolutions is not None
        for position, key, res in zip(g.positions, group_keys, g.resolutions):
            r, outputs = res
            if not hooks and _as_is(r) and solo(outputs[0].target):
                lane.names.append(outputs[0].target)
                lane.keys.append(key)
                lane.rules.append(r)
            else:
                rest.append((position, key, res))
    rest.sort(key=itemgetter(0))
    return lane, [(key, res) for _, key, res in rest]


def _as_is(rule: Rule | None) -> bool:
    """Whether keys this rule decides load as they are: no rule, or a rename without ops."""
    return rule is None or (type(rule) is Rename and not rule.ops)


def _settle(lane: _Lane, source: Source, targets: dict[str, Target], routing: _Routing) -> _Lane:
    """Keep the lane's keys whose target no other key feeds and whose shape matches; hand the
    others to the general path (collisions and the mismatch policy are decided there)."""
    if not lane.names:
        return lane
    lane.shapes = source.shapes(lane.keys)
    found = list(map(targets.__getitem__, lane.names))
    lane.params = list(map(itemgetter(2), found))
    fits = list(map(eq, lane.shapes, map(attrgetter("shape"), map(itemgetter(1), found))))
    distinct = set(lane.names)
    shared = Counter(lane.names) if len(distinct) != len(lane.names) else {}
    fed = routing.candidates.keys() & distinct
    if shared or fed:
        fits = [ok and n not in fed and shared.get(n, 1) == 1 for ok, n in zip(fits, lane.names)]
    if all(fits):
        routing.used.update(lane.keys)
        return lane
    moved = set()
    for ok, name, key, rule in zip(fits, lane.names, lane.keys, lane.rules):
        if not ok:
            routing.candidates.setdefault(name, []).append((key, rule, Output(name)))
            routing.used.add(key)
            moved.add(name)
    order = {k: i for i, k in enumerate(source)} if moved & fed or shared else {}
    for name in moved if order else ():  # candidates in source order, as the general path has them
        routing.candidates[name].sort(key=lambda c: order[c[0]])
    kept = lane.take(fits)
    routing.used.update(kept.keys)
    return kept


class _LazyMeta(abc.Mapping):
    """``{key: source.meta(key).<attr>}`` computed on access, so unread keys cost nothing."""

    def __init__(self, source: Source, attr: str) -> None:
        self._source = source
        self._attr = attr

    def __getitem__(self, key: str) -> Any:
        return getattr(self._source.meta(key), self._attr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def _auto_split_sizes(
    source: Source, key: str, rule: Rule | None, outputs: tuple[Output, ...], targets: dict[str, Target]
) -> tuple[Output, ...]:
    """For a split without sizes, take the sizes from the targets when they add up."""
    if not isinstance(rule, Split) or rule.sizes is not None:
        return outputs
    if not all(o.target in targets for o in outputs):
        return outputs
    dim = rule.dim
    shape = source.meta(key).shape
    try:
        sizes = [targets[o.target].tensor.shape[dim] for o in outputs]
    except IndexError:
        return outputs
    if not shape or dim >= len(shape) or sum(sizes) != shape[dim] or len(set(sizes)) == 1:
        return outputs
    return tuple(
        Output(o.target, tuple(OpCall(op.op, {**op.params, "sizes": sizes}) for op in o.ops), o.part, o.dim)
        for o in outputs
    )


# -- deciding: shapes, collisions, policies --------------------------------------------------------


def _ties(targets: dict[str, Target]) -> dict[str, list[str]]:
    """canonical name -> the other names of one tied tensor."""
    ties: dict[str, list[str]] = {}
    for name, target in targets.items():
        if target.canonical != name:
            ties.setdefault(target.canonical, []).append(name)
    return ties


def _decide(
    source: Source,
    targets: dict[str, Target],
    ties: dict[str, list[str]],
    routing: _Routing,
    on_mismatch: str,
    scope: nn.Module,
    decided: set[str],
) -> tuple[dict[str, Recipe], dict[str, tuple[str, tuple[int, ...] | None]], list[str]]:
    """Recipes (or fresh reasons) for every canonical target not in ``decided`` (the plain lane's)."""
    recipes: dict[str, Recipe] = {}
    fresh: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    warnings: list[str] = []
    collisions: list[str] = []
    mismatches: list[str] = []
    dropped = set(routing.dropped)
    candidates = routing.candidates
    for canonical in filterfalse(decided.__contains__, targets):  # in C: most targets are the lane's
        if targets[canonical].canonical != canonical:
            continue  # a tied name is decided with its canonical name
        group = [canonical, *ties.get(canonical, ())]
        chosen = next((n for n in group if n in candidates), None)
        if chosen is None:
            fresh[canonical] = ("dropped" if any(n in dropped for n in group) else "missing", None)
            continue
        chosen_key = routing.candidates[chosen][0][0]
        for other in group:
            if other != chosen and other in routing.candidates:
                keys = [k for k, _, _ in routing.candidates[other] if not source.same_tensor(k, chosen_key)]
                if not keys:
                    continue  # the source ties them too
                warnings.append(
                    f"{chosen!r} and {other!r} are one tied tensor: loaded from "
                    f"{routing.candidates[chosen][0][0]!r}, ignored {', '.join(map(repr, keys))}"
                )
                for k in keys:
                    routing.used.discard(k)
                    routing.unused_reasons[k] = f"{other!r} is tied to {chosen!r}, which was loaded"
        recipe = _recipe(chosen, routing.candidates[chosen], collisions, warnings, routing)
        if recipe is None:
            fresh[canonical] = ("missing", None)
            continue
        fitted = _fit(recipe, source, targets[chosen], on_mismatch, scope, mismatches, warnings)
        if fitted is None:
            fresh[canonical] = ("shape mismatch", _source_shape(source, recipe))
            for inp in recipe.inputs:
                routing.used.discard(inp.key)
                routing.unused_reasons[inp.key] = f"shape mismatch with {chosen!r}"
            continue
        recipes[canonical] = (
            fitted
            if fitted.target == canonical
            else Recipe(canonical, fitted.inputs, fitted.fuse_dim, fitted.post, fitted.rule, fitted.shape)
        )
    if collisions:
        raise CollisionError(
            "two source tensors would write one target:\n  "
            + "\n  ".join(collisions[:20])
            + "\nadd a drop rule for one of them, or fix the rule that renames it"
        )
    if mismatches:
        raise ShapeMismatchError(
            "shape mismatch (on_mismatch='error'):\n  "
            + "\n  ".join(mismatches[:20])
            + (f"\n  … and {len(mismatches) - 20} more" if len(mismatches) > 20 else "")
            + "\nadd a rule or adapter for them, or pass on_mismatch='skip' (keep the target's init) "
            "or on_mismatch='adapt'"
        )
    return recipes, fresh, warnings


def _recipe(
    name: str,
    cands: list[tuple[str, Rule | None, Output]],
    collisions: list[str],
    warnings: list[str],
    routing: _Routing,
) -> Recipe | None:
    parts = [c for c in cands if c[2].part is not None]
    if parts and len(parts) == len(cands) and len({id(c[1]) for c in parts}) == 1:
        rule = parts[0][1]
        count = parts[0][2].part[1]  # type: ignore[index]
        slots: dict[int, tuple[str, Output]] = {}
        for key, _, out in parts:
            index = out.part[0]  # type: ignore[index]
            if index in slots:
                collisions.append(
                    f"{name!r} <- {slots[index][0]!r} and {key!r} (both part {index + 1} "
                    f"of rule {rule.described() if rule else '?'})"
                )
            slots[index] = (key, out)
        missing = [i + 1 for i in range(count) if i not in slots]
        if missing:
            keys = [k for k, _ in slots.values()]
            warnings.append(
                f"fuse into {name!r} is incomplete: part(s) {missing} of {count} not in the "
                f"source (have {', '.join(map(repr, keys))})"
            )
            for k in keys:
                routing.unused_reasons[k] = f"incomplete fuse into {name!r}"
                routing.used.discard(k)
            return None
        inputs = tuple(Input(slots[i][0], slots[i][1].ops) for i in range(count))
        return Recipe(name, inputs, parts[0][2].dim, (), rule, None)
    if len(cands) > 1:
        described = ", ".join(f"{k!r} (rule {r.described() if r else 'none: same name'})" for k, r, _ in cands)
        collisions.append(f"{name!r} <- {described}")
        return None
    key, rule, out = cands[0]
    return Recipe(name, (Input(key, out.ops),), None, (), rule, None)


def _fit(
    recipe: Recipe,
    source: Source,
    target: Target,
    on_mismatch: str,
    scope: nn.Module,
    mismatches: list[str],
    warnings: list[str],
) -> Recipe | None:
    """Infer the recipe's output shape; apply the mismatch policy when it differs."""
    want = tuple(target.tensor.shape)
    try:
        shape = infer_shape(recipe, source, target.tensor)
    except OpError as e:
        if any(op.fn is not None for op in recipe.ops):
            return Recipe(recipe.target, recipe.inputs, recipe.fuse_dim, recipe.post, recipe.rule, None)
        detail = f"{recipe.target!r}: {e}"
        if on_mismatch == "error":
            mismatches.append(detail)
        else:
            warnings.append(f"skipped {detail}")
        return None
    if shape == want:
        return Recipe(recipe.target, recipe.inputs, recipe.fuse_dim, recipe.post, recipe.rule, shape)
    srcs = ", ".join(i.key for i in recipe.inputs)
    if on_mismatch == "adapt":
        adapted = _adapt(recipe, source, target, shape, scope)
        if adapted is not None:
            return adapted
    if on_mismatch == "error":
        mismatches.append(f"{recipe.target!r}: source {srcs!r} gives {shape}, target is {want}")
    return None


def infer_shape(recipe: Recipe, source: Source, target: torch.Tensor) -> tuple[int, ...]:
    """The shape the recipe produces, computed on meta tensors (no data)."""
    if recipe.plain:
        return tuple(source.meta(recipe.inputs[0].key).shape)
    tmeta = torch.empty(target.shape, dtype=target.dtype, device="meta")
    xs = []
    for inp in recipe.inputs:
        m = source.meta(inp.key)
        x = torch.empty(m.shape, dtype=m.dtype, device="meta")
        for op in inp.ops:
            x = op.run(x, tmeta)
        xs.append(x)
    out = fuse(xs, recipe.fuse_dim) if recipe.fuse_dim is not None else xs[0]
    for op in recipe.post:
        out = op.run(out, tmeta)
    return tuple(out.shape)


def _adapt(recipe: Recipe, source: Source, target: Target, shape: tuple[int, ...], scope: nn.Module) -> Recipe | None:
    """The recipe with the first registered shape adapter that fits appended, or ``None``.

    Each adapter's ``applies`` sees the target name, the shape the rule's ops produce, the
    target tensor (maybe on meta) and its owner module; the adapter is then checked on meta
    tensors to give exactly the target's shape.
    """
    owner = _owner(scope, target.name)
    meta = TensorMeta(shape, source.meta(recipe.inputs[0].key).dtype)
    want = tuple(target.tensor.shape)
    for name in list_adapters():
        params = _adapter_params(name, target, meta, owner)
        if params is None:
            continue
        call = OpCall(name, params)
        candidate = Recipe(recipe.target, recipe.inputs, recipe.fuse_dim, recipe.post + (call,), recipe.rule, None)
        try:
            got = infer_shape(candidate, source, target.tensor)
        except OpError:
            continue
        if got == want:
            return Recipe(candidate.target, candidate.inputs, candidate.fuse_dim, candidate.post, candidate.rule, got)
    return None


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


# -- entries and checks -----------------------------------------------------------------------------


def _rows(
    source: Source,
    targets: dict[str, Target],
    recipes: dict[str, Recipe],
    fresh: dict[str, tuple[str, tuple[int, ...] | None]],
    lane: Sequence[str],
) -> list[tuple[Any, ...]]:
    """One report row (:class:`Entry` fields in order) per target outside the plain ``lane``, in
    the model's order."""
    if len(lane) == len(targets):
        return []
    in_lane = set(lane)
    out: list[tuple[Any, ...]] = []
    described: dict[int, str] = {}  # rule descriptions, built once per rule
    for name, t in targets.items():
        if name in in_lane:
            continue
        _, tensor, is_parameter, canonical = t
        recipe = recipes.get(canonical)
        tied = canonical if canonical != name else None
        shape = tuple(tensor.shape)
        if recipe is None:
            reason, src_shape = fresh.get(canonical, ("missing", None))
            out.append((name, "fresh", (), None, (), src_shape, shape, reason, tied, tensor.numel(), is_parameter))
            continue
        rule_text = _described(recipe.rule, described)
        status = "adapted" if recipe.adapted else "loaded"
        sources = tuple(i.key for i in recipe.inputs)
        row = (name, status, sources, rule_text, recipe.labels(), _source_shape(source, recipe), shape, None, tied)
        out.append((*row, tensor.numel(), is_parameter))
    return out


def _described(rule: Rule | None, cache: dict[int, str]) -> str | None:
    if rule is None:
        return None
    text = cache.get(id(rule))
    if text is None:
        text = cache[id(rule)] = rule.described()
    return text


def _source_shape(source: Source, recipe: Recipe) -> tuple[int, ...]:
    if recipe.plain:
        return source.meta(recipe.inputs[0].key).shape
    shapes = [source.meta(i.key).shape for i in recipe.inputs]
    if recipe.fuse_dim is None or len(shapes) == 1:
        return shapes[0]
    dim = recipe.fuse_dim
    first = list(shapes[0])
    if dim < len(first):
        first[dim] = sum(s[dim] for s in shapes if dim < len(s))
    return tuple(first)


def _check_strictness(table: EntryTable, unused: list[str], strict: bool, require: Iterable[str]) -> None:
    problems: list[str] = []
    fresh = [r[0] for r in table.other_rows if r[_STATUS] == "fresh"]  # loaded columns hold none
    for pattern in require:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in table.names()):
            problems.append(f"require={pattern!r} matches no target tensor")
            continue
        missed = [n for n in fresh if fnmatch.fnmatchcase(n, pattern)]
        if missed:
            problems.append(f"require={pattern!r}: not loaded: {', '.join(group_names(missed)[:10])}")
    if strict:
        if fresh:
            problems.append("strict=True: target tensors not loaded: " + ", ".join(group_names(fresh)[:12]))
        if unused:
            problems.append("strict=True: source tensors not used: " + ", ".join(group_names(unused)[:12]))
    if problems:
        raise StrictnessError("\n".join(problems) + "\n" + _strict_hint())


def _strict_hint() -> str:
    return (
        "fix the mapping (rules that rename or drop these), or relax strict=/require=; "
        "wp.plan(...) with strict=False shows the full report"
    )
