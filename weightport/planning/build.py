"""Building a :class:`~weightport.planning.data.TransferPlan`: source keys routed by the mapping,
each target decided once, the strictness checks, the preview report. No tensor data is read.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace
from itertools import filterfalse

from torch import nn

from weightport._gc import gc_paused
from weightport._hooks import has_custom_loading
from weightport.apply import apply_plan
from weightport.distributed.detect import apply_sharded, is_sharded, whole_reads_note
from weightport.errors import NothingLoadedError, StrictnessError
from weightport.mapping.core import Mapping
from weightport.mapping.files import shipped_dir
from weightport.mapping.hf_conversion import HfLayout, hf_layout
from weightport.mapping.rules import Drop, Rule, Tie
from weightport.options import ApplyOptions, PlanOptions
from weightport.planning.data import Recipes, Target, TransferPlan
from weightport.planning.decide import Decisions, decide
from weightport.planning.diagnose import nothing_loaded
from weightport.planning.facts import resolve_facts
from weightport.planning.route import Routes, route
from weightport.planning.targets import collect_targets, left_on_meta, scope_of, ties
from weightport.report import EntryTable, LoadedColumns, Row, TransferReport, group_names
from weightport.sources.base import Source

__all__ = ["build_plan"]


def build_plan(
    source: Source, model: nn.Module, mapping: Mapping, options: PlanOptions, apply_options: ApplyOptions
) -> TransferPlan:
    """Decide the fate of every target and source tensor; read no tensor data.

    Raises:
        TargetError: ``into`` names no submodule.
        CollisionError, ShapeMismatchError: the source cannot be placed as asked.
        StrictnessError: ``strict``/``require`` not met; ``e.report`` is the full preview.
    """
    with gc_paused():
        return _build(source, model, mapping, options, apply_options)


def _build(
    source: Source, model: nn.Module, mapping: Mapping, options: PlanOptions, apply_options: ApplyOptions
) -> TransferPlan:
    scope = scope_of(model, options.into)
    targets = collect_targets(scope)
    modules = list(scope.modules())
    materialise = left_on_meta(model, scope, options.into, modules)
    keys = list(source)
    if mapping.facts():
        names = mapping.name or "rules"
        mapping = mapping.bind(resolve_facts(mapping.facts(), options.facts or {}, scope, source, names))
    claimed = (lambda key: mapping.match(key) is not None) if mapping.rules else None  # the user's rules first
    layout = hf_layout(scope, keys, targets, lambda key: tuple(source.meta(key).shape), claimed)
    if layout is not None:
        mapping = mapping.with_rules(layout.rules)
    routes = route(source, keys, mapping, targets, scope, hooks=any(map(has_custom_loading, modules)))
    decided = decide(
        source, targets, ties(targets), routes, options.on_mismatch, scope, options.adapter_calls(), mapping.ties
    )
    report = _report(source, keys, targets, routes, decided, mapping, options.into)
    if layout is not None:
        report = _with_layout(report, layout)
    if materialise.fresh:
        report = replace(
            report,
            outside=materialise.fresh,
            warnings=(
                *report.warnings,
                f"outside into={options.into!r}, {len(materialise.fresh)} tensor(s) on meta are initialised "
                f"fresh (nothing loads there): {', '.join(group_names(list(materialise.fresh))[:12])}",
            ),
        )
    note = report.fresh_parameters_note()
    if note is not None:
        report = replace(report, warnings=(*report.warnings, note))
    sharded = is_sharded(targets)
    if sharded:
        report = replace(report, warnings=(*report.warnings, *whole_reads_note(targets, decided.recipes.values())))
    if targets and not decided.lane.names and not decided.recipes and not options.allow_empty:
        raise NothingLoadedError(nothing_loaded(keys, list(targets), source.info.location), report=report)
    _check_strictness(report, options.strict, options.require)
    return TransferPlan(
        source=source,
        scope=scope,
        targets=targets,
        recipes=Recipes(decided.recipes, decided.lane),
        report=report,
        options=options,
        apply_options=apply_options,
        applier=apply_sharded if sharded else apply_plan,
        model=model,
        materialise=materialise,
    )


def _report(
    source: Source,
    keys: list[str],
    targets: dict[str, Target],
    routes: Routes,
    decided: Decisions,
    mapping: Mapping,
    into: str | None,
) -> TransferReport:
    lane = decided.lane
    texts: dict[Rule | None, str | None] = {r: r.described() for r in set(lane.rules) if r is not None}
    texts[None] = None  # rules hash by identity
    params = [targets[n].is_parameter for n in lane.names]
    loaded = LoadedColumns(lane.names, lane.keys, list(map(texts.__getitem__, lane.rules)), lane.shapes, params)
    rows = _rows(source, targets, decided, set(lane.names)) if len(lane.names) != len(targets) else []
    dropped = set(routes.dropped)
    fed = set(routes.fed())
    fed.difference_update(decided.unused)
    unused = [k for k in filterfalse(fed.__contains__, keys) if k not in dropped and k not in routes.consumed]
    consumed = dict(routes.consumed)
    if unused:
        aliased = _aliases_of_used(source, unused, fed)
        consumed.update(aliased)
        unused = [k for k in unused if k not in aliased]
    reasons = {k: _unused_reason(k, decided, routes) for k in unused}
    warnings = decided.warnings + [f"rule {r.described()} matched no source tensor" for r in _idle(mapping, routes)]
    missing = sum(1 for r in rows if r.reason == "missing")
    if unused and missing and len(unused) >= 0.5 * len(keys):
        warnings.append(
            f"{len(unused)} source tensors unused and {missing} target tensors missing: the names "
            "probably differ; try a mapping (weightport mappings) or `weightport suggest SOURCE TARGET`"
        )
    return TransferReport(
        EntryTable.from_parts(list(targets), rows, loaded),
        tuple(unused),
        tuple(routes.dropped),
        tuple(warnings),
        source.info,
        applied=False,
        into=into,
        unused_reasons=reasons,
        consumed=consumed,
    )


def _aliases_of_used(source: Source, unused: list[str], used: set[str]) -> dict[str, str]:
    """Unused keys that name a tensor a used key also names (tied weights a file stores once, such
    as ``lm_head.weight`` sharing ``wte.weight``'s storage): loaded through that key, so used."""
    out: dict[str, str] = {}
    for key, others in source.aliases(unused).items():
        through = next((o for o in others if o in used), None)
        if through is not None:
            out[key] = f"the same tensor as {through!r} (one storage in the source), loaded through it"
    return out


def _with_layout(report: TransferReport, layout: HfLayout) -> TransferReport:
    """The report with the checkpoint layout among the source's facts, and what could not be converted."""
    source = report.source.with_(notes=(*report.source.notes, layout.note)) if report.source else None
    return replace(report, source=source, warnings=(*layout.warnings, *report.warnings))


def _unused_reason(key: str, decided: Decisions, routes: Routes) -> str:
    reason = decided.unused.get(key)
    if reason is not None:
        return reason
    name = routes.nowhere.get(key)
    return f"no target tensor named {name!r}" if name is not None else "no target tensor with this name"


def _rows(source: Source, targets: dict[str, Target], decided: Decisions, lane: set[str]) -> list[Row]:
    """One report row per target outside the loaded ``lane``, in the model's order, built by field name."""
    out: list[Row] = []
    texts: dict[int, str] = {}  # rule descriptions, built once per rule
    for name, t in targets.items():
        if name in lane:
            continue
        recipe = decided.recipes.get(t.canonical)
        row = Row(
            target=name,
            status="fresh",
            sources=(),
            rule=None,
            ops=(),
            source_shape=None,
            target_shape=tuple(t.tensor.shape),
            reason=None,
            tied_to=t.canonical if t.canonical != name else None,
            numel=t.tensor.numel(),
            is_parameter=t.is_parameter,
        )
        if recipe is None:
            reason, source_shape = decided.fresh.get(t.canonical, ("missing", None))
            out.append(row._replace(reason=reason, source_shape=source_shape))
            continue
        rule = recipe.rule
        if rule is not None and id(rule) not in texts:
            texts[id(rule)] = rule.described()
        out.append(
            row._replace(
                status="adapted" if recipe.adapted else "loaded",
                sources=tuple(i.key for i in recipe.inputs),
                rule=texts[id(rule)] if rule is not None else None,
                ops=recipe.labels(),
                source_shape=recipe.source_shape(source),
            )
        )
    return out


def _idle(mapping: Mapping, routes: Routes) -> list[Rule]:
    """Rules that matched nothing and deserve a warning: not drop rules (nothing to drop is fine), and
    not rules of shipped mappings, which cover a family of variants (a ViT without ``pre_logits``)."""
    shipped = str(shipped_dir())
    return [
        r
        for r in mapping.rules
        if routes.hits[id(r)] == 0 and not isinstance(r, (Drop, Tie)) and not (r.origin or "").startswith(shipped)
    ]


def _check_strictness(report: TransferReport, strict: bool, require: Sequence[str]) -> None:
    """Raise :class:`StrictnessError`, carrying the full preview report, when a requirement is unmet."""
    if not strict and not require:
        return
    table = report.entries
    assert isinstance(table, EntryTable)
    fresh = [r.target for r in table.other_rows if r.status == "fresh"]  # loaded columns hold none
    problems: list[str] = []
    for pattern in require:
        matches = _required(pattern, report.into)
        if not any(map(matches, table.names())):
            problems.append(_require_matched_nothing(pattern, report.into, table))
            continue
        missed = list(filter(matches, fresh))
        if missed:
            problems.append(f"require={pattern!r}: not loaded: {', '.join(group_names(missed)[:10])}")
    if strict:
        if fresh:
            problems.append("strict=True: target tensors not loaded: " + ", ".join(group_names(fresh)[:12]))
        if report.unused:
            problems.append("strict=True: source tensors not used: " + ", ".join(group_names(report.unused)[:12]))
    if problems:
        raise StrictnessError(
            "\n".join(problems) + "\nfix the mapping (rules that rename or drop these), or relax strict=/require=; "
            "print(error.report) shows the full plan",
            report=report,
            problems=problems,
        )


def _required(pattern: str, into: str | None) -> Callable[[str], bool]:
    """Whether a target name (relative to ``into``) matches a ``require`` pattern written relative
    to ``into`` or as the model's full name."""
    if not into:
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    return lambda name: fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(f"{into}.{name}", pattern)


def _require_matched_nothing(pattern: str, into: str | None, table: EntryTable) -> str:
    """The problem of a ``require`` pattern that matched no target: the names it could have
    matched, in both forms."""
    names = list(itertools.islice(table.names(), 5000))  # a sample is enough to show the form
    if not names:
        return f"require={pattern!r} matched no target: there are no target tensors"
    example = (difflib.get_close_matches(pattern, names, n=1, cutoff=0) or names)[0]
    if not into:
        return f"require={pattern!r} matched no target; target names look like {example!r}"
    return (
        f"require={pattern!r} matched no target under into={into!r}; target names look like {example!r} "
        f"(or absolute {f'{into}.{example}'!r})"
    )
