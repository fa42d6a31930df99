"""Checkpoint layouts of transformers models, converted with transformers' own conversion mapping.

transformers 5 renamed the modules of many models (ViT's ``encoder.layer.N.attention.attention.query``
is now ``layers.N.attention.q_proj``; Mixtral's per-expert ``w1``/``w2``/``w3`` are stacked
``experts.gate_up_proj``/``down_proj``). Its ``save_pretrained`` still writes the classic names (the hub
layout) unless ``save_original_format=False``, and ``from_pretrained`` converts them back at load time
with its conversion mapping (``transformers.conversion_mapping``).

When the target is a transformers ``PreTrainedModel``, :func:`hf_layout` asks transformers how it
would rename every source key (``get_model_conversion_mapping`` and ``rename_source_key``, not a copy of
them) and turns the answer into weightport rules: renamings into renames, converters into split, fuse
and stack rules where their ops are exact layout changes (experts stacked, then concatenated, are a fuse
followed by a reshape: :class:`_FuseThen`, whose ``post`` ops planning runs after the fuse). The rules
are generalised over layer indices where that reproduces transformers' names exactly, and checked
against them key by key.

transformers stays optional: nothing here imports it unless the model already is one of its classes.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from weightport.errors import MappingError
from weightport.mapping import fuse, rename, split, stack, transform
from weightport.mapping.core import Mapping
from weightport.mapping.ops import OpCall
from weightport.mapping.rules import Fuse, Rule

__all__ = ["HfLayout", "hf_layout"]

_NUMBER = re.compile(r"0|[1-9][0-9]*")
_NAMES = "ijklmn"


@dataclass(frozen=True)
class HfLayout:
    """What :func:`hf_layout` found.

    Attributes:
        note: One line for the report's source facts: ``"layout: classic (…)"`` and the like.
        rules: Rules converting the source's names to the model's, to apply after the user's own.
        warnings: Conversions weightport cannot express, or why no conversion was tried.
    """

    note: str
    rules: tuple[Rule, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Step:
    """One concrete conversion: source keys to target names, as one weightport rule would do it."""

    kind: str  # "rename", "split", "fuse", "stack" or "transform"
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    params: tuple[tuple[str, Any], ...] = ()


def hf_layout(
    model: nn.Module,
    keys: Sequence[str],
    targets: Collection[str],
    shape_of: Callable[[str], tuple[int, ...]],
    claimed: Callable[[str], bool] | None = None,
) -> HfLayout | None:
    """The layout of a source's ``keys`` for a transformers ``model``, and the rules that convert it.

    Args:
        model: The target module (the ``into`` scope); nothing is done unless it is a transformers
            ``PreTrainedModel``.
        keys: The source's keys.
        targets: The model's state-dict names.
        shape_of: A source key's shape (converters that stack experts need it).
        claimed: Whether a rule of the user's mapping matches a key: such keys are left to it.

    Returns:
        ``None`` when the model is not a transformers model, or transformers has no conversion for it.
    """
    # a transformers model has imported modeling_utils; asking the package would import it (seconds)
    base = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    if base is None or not isinstance(model, base):
        return None
    transformers = sys.modules["transformers"]
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    try:  # by module name: a package attribute would hide a submodule that cannot be imported
        conversion_mapping = importlib.import_module("transformers.conversion_mapping")
        core_model_loading = importlib.import_module("transformers.core_model_loading")
    except ImportError as e:
        return _without_mapping(model_type, keys, targets, e)
    conversions = conversion_mapping.get_model_conversion_mapping(model, add_legacy=False)
    if not conversions:
        return None
    conversions = [*conversions, *(conversion_mapping.get_checkpoint_conversion_mapping("legacy") or ())]
    target_set = set(targets)
    foreign = [k for k in keys if k not in target_set and not (claimed and claimed(k))]
    found = f"transformers' conversion mapping for {model_type!r}"
    if not foreign:
        return HfLayout(f"layout: transformers 5 (the model's own names; {found} not needed)")
    steps, unsupported = _steps(core_model_loading, conversions, model, foreign, target_set, shape_of)
    if not steps and not unsupported:
        return None
    converted = sum(len(s.sources) for s in steps)
    version = getattr(transformers, "__version__", "?")
    note = f"layout: classic (converted with {found}, transformers {version}: {converted} tensors)"
    return HfLayout(note, tuple(_rules(steps, keys, found)), tuple(unsupported))


def _without_mapping(model_type: str, keys: Sequence[str], targets: Collection[str], e: Exception) -> HfLayout | None:
    """transformers is there but its conversion mapping is not (transformers 4, or a broken install): a
    warning when most source names are not the model's, else nothing (the names need no conversion)."""
    target_set = set(targets)
    if sum(k in target_set for k in keys) >= len(keys) / 2:
        return None
    return HfLayout(
        "layout: unknown (transformers' conversion mapping could not be imported)",
        warnings=(
            f"the target is a transformers {model_type!r} model and most source names are not its own, but "
            f"transformers' conversion mapping (transformers >= 5) could not be imported ({e}): names are used "
            "as they are; install transformers >= 5 to load another checkpoint layout, or pass a mapping",
        ),
    )


# -- asking transformers ---------------------------------------------------------------------------


def _steps(
    tf: Any, conversions: list[Any], model: nn.Module, keys: list[str], targets: set[str], shape_of: Callable
) -> tuple[list[_Step], list[str]]:
    """transformers' conversion of each key (``core_model_loading.rename_source_key``), as steps."""
    renamings = [c for c in conversions if isinstance(c, tf.WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, tf.WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    present = dict.fromkeys(targets, True)
    steps: list[_Step] = []
    groups: dict[tuple[int, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key in sorted(keys, key=tf.dot_natural_key):
        if "*" in key:
            continue  # a key a pattern cannot name literally; left as it is
        name, pattern = tf.rename_source_key(key, renamings, converters, prefix, present)
        if pattern is None:
            if name != key and name in targets:
                steps.append(_Step("rename", (key,), (name,)))
            continue
        converter = _converter(tf, key, renamings, converters)
        groups[(id(converter), name)][pattern].append(key)
    by_id = {id(c): c for c in converters}
    unsupported: dict[str, list[str]] = defaultdict(list)  # op chain -> the targets it makes
    for (cid, name), inputs in groups.items():
        step = _converted(by_id[cid], name, inputs, shape_of)
        if isinstance(step, str):
            unsupported[step].extend(t for t in _expand(name, by_id[cid].target_patterns) if t in targets)
        elif all(t in targets for t in step.targets):
            steps.append(step)
    return steps, [_unsupported(chain, names) for chain, names in unsupported.items() if names]


def _unsupported(chain: str, targets: list[str]) -> str:
    shown = ", ".join(targets[:3]) + (" …" if len(targets) > 3 else "")
    return (
        f"transformers makes {len(targets)} target tensor(s) ({shown}) with {chain}, which weightport's rules "
        "cannot express exactly yet: they are not loaded from this checkpoint; load them with transformers' "
        "from_pretrained, or write a Python rule for them"
    )


def _converter(tf: Any, key: str, renamings: list[Any], converters: list[Any]) -> Any:
    """The converter transformers applies to ``key`` (the first that matches, as in ``apply_converters``)."""
    renamed = tf.apply_renamings(key, renamings)
    return next(c for c in converters if c.rename_source_key(renamed)[1] is not None)


def _converted(converter: Any, name: str, inputs: dict[str, list[str]], shape_of: Callable) -> _Step | str:
    """One converter's work on one target group as a step, or (when no exact rule does it) its op chain."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    ordered = [inputs.get(p, []) for p in converter.source_patterns]
    keys = tuple(k for part in ordered for k in part)
    targets = tuple(_expand(name, converter.target_patterns))
    single = all(len(part) == 1 for part in ordered)
    chunk = ops == [("Chunk", ops[0][1])] and getattr(converter.operations[0], "num_shards_attribute", None) is None
    if chunk and len(keys) == 1:
        return _Step("split", keys, targets, (("dim", ops[0][1]),))
    if ops == [("Concatenate", ops[0][1])] and single and len(keys) > 1:
        return _Step("fuse", keys, targets, (("dim", ops[0][1]),))
    if len(ops) == 1 and ops[0][0] == "Transpose" and len(keys) == 1:
        op = converter.operations[0]
        return _Step("transform", keys, targets, (("dim0", op.dim0), ("dim1", op.dim1)))
    index = _expert_index(keys)
    if ops == [("MergeModulelist", 0)] and len(ordered) == 1 and index is not None:
        return _Step("stack", keys, targets, (("over", index),))
    experts = {len(part) for part in ordered}
    if ops == [("MergeModulelist", 0), ("Concatenate", 1)] and len(experts) == 1 and len(ordered) > 1:
        # expert e's parts one after another, for every e, fused along 0, then cut into the experts
        interleaved = tuple(k for parts in zip(*ordered) for k in parts)
        rows = sum(shape_of(part[0])[0] for part in ordered)
        shape = (experts.pop(), rows, *shape_of(keys[0])[1:])
        return _Step("fuse", interleaved, targets, (("dim", 0), ("then", shape)))
    return " then ".join(f"{op}(dim={dim})" if dim is not None else op for op, dim in ops)


def _expert_index(keys: Sequence[str]) -> int | None:
    """The one dotted segment in which ``keys`` differ, when it counts 0, 1, … in their order."""
    parts = [k.split(".") for k in keys]
    if len(parts) < 2 or len({len(p) for p in parts}) != 1:
        return None
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if len(differ) != 1 or [p[differ[0]] for p in parts] != [str(e) for e in range(len(parts))]:
        return None
    return differ[0]


def _expand(name: str, patterns: Sequence[str]) -> list[str]:
    """The full target names of a converter's target patterns, as transformers expands them."""
    full = name.replace("*.", "0.")
    for p in patterns:
        if p in full:
            head, _, tail = full.partition(p)
            return [head + q + tail for q in patterns]
    return [name]


# -- steps into rules --------------------------------------------------------------------------------


def _rules(steps: list[_Step], keys: Sequence[str], origin: str) -> list[Rule]:
    """Rules for the steps, generalised over indices where that gives every key transformers' name."""
    general = [rule for cluster in _clusters(steps).values() for rule in _generalised(cluster, origin)]
    expected = {k: s.targets for s in steps for k in s.sources}
    mapping = Mapping(general)
    for key in keys:
        found = mapping.resolve(key)
        if (tuple(o.target for o in found.outputs) if found.rule is not None else None) != expected.get(key):
            return [_exact(s, origin) for s in steps]  # exact rules: right by construction
    return general


def _signature(step: _Step) -> tuple[Any, ...]:
    def sig(name: str) -> str:
        return ".".join("#" if _NUMBER.fullmatch(p) else p for p in name.split("."))

    return (step.kind, step.params, tuple(map(sig, step.sources)), tuple(map(sig, step.targets)))


def _clusters(steps: list[_Step]) -> dict[tuple[Any, ...], list[_Step]]:
    out: dict[tuple[Any, ...], list[_Step]] = defaultdict(list)
    for s in steps:
        out[_signature(s)].append(s)
    return out


def _generalised(cluster: list[_Step], origin: str) -> list[Rule]:
    """One rule for a cluster whose names differ only in numbers that vary together (layer indices);
    the steps' own exact rules otherwise."""
    first = cluster[0]
    names = (*first.sources, *first.targets)
    split_names = [[n.split(".") for n in (*s.sources, *s.targets)] for s in cluster]
    placeholders: dict[tuple[str, ...], str] = {}
    at: dict[tuple[int, int], str] = {}
    for n, parts in enumerate(split_names[0]):
        for p, seg in enumerate(parts):
            if not _NUMBER.fullmatch(seg):
                continue
            values = tuple(s[n][p] for s in split_names)
            if len(set(values)) > 1:
                if values not in placeholders and len(placeholders) == len(_NAMES):
                    return [_exact(s, origin) for s in cluster]
                at[(n, p)] = placeholders.setdefault(values, _NAMES[len(placeholders)])
    if not at:
        return [_exact(s, origin) for s in cluster]
    texts = []
    for n, parts in enumerate(split_names[0]):
        texts.append(".".join("{" + at[(n, p)] + "}" if (n, p) in at else _literal(seg) for p, seg in enumerate(parts)))
    sources, targets = texts[: len(first.sources)], texts[len(first.sources) :]
    used = [{at[(n, p)] for p in range(len(parts)) if (n, p) in at} for n, parts in enumerate(split_names[0])]
    if any(used[n] != set(placeholders.values()) for n in range(len(names))):
        return [_exact(s, origin) for s in cluster]  # not one index shared by every name
    return [_rule(first, tuple(sources), tuple(targets), origin)]


def _literal(name: str) -> str:
    """``name`` as pattern or template text that means exactly it."""
    return name.replace("{", "{{").replace("}", "}}")


def _exact(step: _Step, origin: str) -> Rule:
    return _rule(step, tuple(map(_literal, step.sources)), tuple(map(_literal, step.targets)), origin)


def _rule(step: _Step, sources: Sequence[str], targets: Sequence[str], origin: str) -> Rule:
    params = dict(step.params)
    if step.kind == "rename":
        return rename(sources[0], targets[0], origin=origin)
    if step.kind == "split":
        return split(sources[0], list(targets), dim=params["dim"], origin=origin)
    if step.kind == "transform":
        return transform(sources[0], targets[0], ops=[("transpose", params)], origin=origin)
    if step.kind == "stack":
        segments = sources[0].split(".")
        segments[params["over"]] = "{e}"
        return stack(".".join(segments), targets[0], over="e", origin=origin)
    rule = fuse(list(sources), targets[0], dim=params["dim"], origin=origin)
    then = params.get("then")
    if then is None:
        return rule
    return _FuseThen(
        rule.sources, rule.template, rule.dim, origin=origin, post=(OpCall("reshape", {"shape": list(then)}),)
    )


@dataclass(frozen=True, eq=False)
class _FuseThen(Fuse):
    """A fuse followed by ``post`` ops on the fused tensor (planning applies them after the
    concatenation): experts' parts fused one expert after another, then reshaped to the stack."""

    post: tuple[OpCall, ...] = ()

    @property
    def text(self) -> str:
        return f"{super().text}, then {', '.join(op.label() for op in self.post)}"

    def inverse(self) -> Rule:
        raise MappingError(f"{self._where()}: cannot invert a fuse followed by {self.post[0].label()}")
