"""Planning: match source names against the target, decide every tensor's fate, read no data.

:func:`build_plan` routes every source key through the mapping, matches the
results against the target's parameters and persistent buffers, infers the
shape each op chain produces by running it on meta tensors, applies the
mismatch policy and the strictness checks, and returns a :class:`TransferPlan`.
Nothing is written and no tensor data is read until :meth:`TransferPlan.apply`.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections import Counter, abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
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
from weightport.mapping.core import Mapping
from weightport.mapping.files import shipped_dir
from weightport.mapping.ops import OpCall, fuse, get_op, list_adapters
from weightport.mapping.rules import Drop, Output, Rule, Split
from weightport.report import Entry, TransferReport, group_names
from weightport.sources.base import Source, TensorMeta

ON_MISMATCH = ("skip", "adapt", "error")
_tuple = tuple.__new__  # builds a named tuple from a tuple of all its fields, in C


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
        recipes: dict[str, Recipe],
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
    def entries(self) -> tuple[Entry, ...]:
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
    _check_meta_buffers(scope, targets, into)
    routing = _route(source, mapping, targets, scope)
    recipes, fresh_reasons, warnings = _decide(source, targets, routing, on_mismatch, scope)
    warnings += [f"rule {r.described()} matched no source tensor" for r in _idle_rules(mapping, routing)]
    entries = _entries(source, targets, recipes, fresh_reasons)
    dropped = set(routing.dropped)
    unused = [k for k in source if k not in routing.used and k not in dropped]
    reasons = {k: routing.unused_reasons.get(k, "no target tensor with this name") for k in unused}
    missing = sum(1 for e in entries if e.status == "fresh" and e.reason == "missing")
    if unused and missing and len(unused) >= 0.5 * len(source):
        warnings.append(
            f"{len(unused)} source tensors unused and {missing} target tensors missing: the names "
            "probably differ; try a mapping (weightport mappings) or `weightport suggest SOURCE TARGET`"
        )
    report = TransferReport(
        tuple(entries),
        tuple(unused),
        tuple(routing.dropped),
        tuple(warnings),
        source.info,
        applied=False,
        into=into,
        unused_reasons=reasons,
    )
    _check_strictness(report, strict, require)
    return TransferPlan(
        source=source,
        scope=scope,
        into=into,
        targets=targets,
        recipes=recipes,
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


def collect_targets(scope: nn.Module) -> dict[str, Target]:
    """Parameters and persistent buffers by state-dict name, tied names grouped."""
    state = {n: t for n, t in scope.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
    # (non-tensor entries: _extra_state and the like)
    first: dict[int, str] = {}
    for name, t in state.items():
        first.setdefault(id(t), name)
    parameter = nn.Parameter
    return {name: _tuple(Target, (name, t, isinstance(t, parameter), first[id(t)])) for name, t in state.items()}


def _check_meta_buffers(scope: nn.Module, targets: dict[str, Target], into: str | None) -> None:
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


def _route(source: Source, mapping: Mapping, targets: dict[str, Target], scope: nn.Module) -> _Routing:
    keys = list(source)
    resolutions = mapping.resolve_all(keys)
    r = _Routing({}, set(), [], {}, Counter(id(rule) for rule, _ in resolutions if rule is not None))
    routed: list[tuple[str, Rule | None, Output]] = []
    append = routed.append
    for key, (rule, outputs) in zip(keys, resolutions):
        if rule is not None:
            if isinstance(rule, Drop):
                r.dropped.append(key)
                continue
            if isinstance(rule, Split):
                outputs = _auto_split_sizes(source, key, rule, outputs, targets)
        for out in outputs:
            append((key, rule, out))
    if any(has_custom_loading(m) for m in scope.modules()):
        # lazy: hooks look at the few keys under their module; other shards stay closed
        routed = replay(
            scope, routed, _LazyMeta(source, "shape"), _LazyMeta(source, "dtype"), source.state_dict_metadata
        )
    candidates, used = r.candidates, r.used
    for item in routed:  # one pass, kept lean: 100k keys
        key, _, out = item
        target = out.target
        if target in targets:
            found = candidates.get(target)
            if found is None:
                candidates[target] = [item]
            else:
                found.append(item)
            used.add(key)
        elif key not in used:
            r.unused_reasons[key] = f"no target tensor named {target!r}"
    return r


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


def _decide(
    source: Source, targets: dict[str, Target], routing: _Routing, on_mismatch: str, scope: nn.Module
) -> tuple[dict[str, Recipe], dict[str, tuple[str, tuple[int, ...] | None]], list[str]]:
    recipes: dict[str, Recipe] = {}
    fresh: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    warnings: list[str] = []
    collisions: list[str] = []
    mismatches: list[str] = []
    ties: dict[str, list[str]] = {}  # canonical -> the other names of one tied tensor
    for name, target in targets.items():
        if target.canonical != name:
            ties.setdefault(target.canonical, []).append(name)
    dropped = set(routing.dropped)
    candidates = routing.candidates
    meta = source.meta
    for canonical, target in targets.items():
        if target.canonical != canonical:
            continue  # decided with its canonical name
        tied = ties.get(canonical)
        if tied is None:  # untied: the common case, kept cheap for 100k-key models
            cands = candidates.get(canonical)
            chosen = None if cands is None else canonical
            if cands is not None and len(cands) == 1:
                key, rule, out = cands[0]
                if out.part is None and not out.ops:
                    shape = meta(key).shape
                    if shape == target.tensor.shape:  # else the general path applies the mismatch policy
                        inputs = (_tuple(Input, (key, ())),)
                        recipes[canonical] = _tuple(Recipe, (canonical, inputs, None, (), rule, shape))
                        continue
            group = [canonical]
        else:
            group = [canonical, *tied]
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


def _entries(
    source: Source,
    targets: dict[str, Target],
    recipes: dict[str, Recipe],
    fresh: dict[str, tuple[str, tuple[int, ...] | None]],
) -> list[Entry]:
    out = []
    described: dict[int, str] = {}  # rule descriptions, built once per rule
    loaded_as_is = Entry._loaded_as_is
    prod = math.prod
    get = recipes.get
    for name, t in targets.items():
        _, tensor, is_parameter, canonical = t
        recipe = get(canonical)
        tied = canonical if canonical != name else None
        if recipe is not None:
            _, inputs, fuse_dim, post, rule, shape = recipe
            if fuse_dim is None and not post and shape is not None and len(inputs) == 1 and not inputs[0].ops:
                # plain: the common case, without the general recipe walk
                text = None if rule is None else described.get(id(rule)) or _described(rule, described)
                shape = tuple(shape)
                out.append(loaded_as_is(name, inputs[0].key, text, shape, tied, prod(shape), is_parameter))
                continue
        shape = tuple(tensor.shape)
        if recipe is None:
            reason, src_shape = fresh.get(t.canonical, ("missing", None))
            out.append(
                Entry(name, "fresh", (), None, (), src_shape, shape, reason, tied, tensor.numel(), t.is_parameter)
            )
            continue
        rule_text = _described(recipe.rule, described)
        if recipe.plain:
            key = recipe.inputs[0].key
            entry = Entry(
                name,
                "loaded",
                (key,),
                rule_text,
                (),
                source.meta(key).shape,
                shape,
                None,
                tied,
                tensor.numel(),
                t.is_parameter,
            )
        else:
            entry = Entry(
                name,
                "adapted" if recipe.adapted else "loaded",
                tuple(i.key for i in recipe.inputs),
                rule_text,
                recipe.labels(),
                _source_shape(source, recipe),
                shape,
                None,
                tied,
                tensor.numel(),
                t.is_parameter,
            )
        out.append(entry)
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


def _check_strictness(report: TransferReport, strict: bool, require: Iterable[str]) -> None:
    problems: list[str] = []
    for pattern in require:
        matched = [e for e in report.entries if fnmatch.fnmatchcase(e.target, pattern)]
        if not matched:
            problems.append(f"require={pattern!r} matches no target tensor")
            continue
        fresh = [e.target for e in matched if e.status == "fresh"]
        if fresh:
            problems.append(f"require={pattern!r}: not loaded: {', '.join(group_names(fresh)[:10])}")
    if strict:
        not_loaded = [e.target for e in report.entries if e.status == "fresh"]
        if not_loaded:
            problems.append("strict=True: target tensors not loaded: " + ", ".join(group_names(not_loaded)[:12]))
        if report.unused:
            problems.append("strict=True: source tensors not used: " + ", ".join(group_names(report.unused)[:12]))
    if problems:
        raise StrictnessError("\n".join(problems) + "\n" + _strict_hint(report))


def _strict_hint(report: TransferReport) -> str:
    return (
        "fix the mapping (rules that rename or drop these), or relax strict=/require=; "
        "wp.plan(...) with strict=False shows the full report"
    )
