"""Propose a mapping between two sets of tensor names, from names and shapes alone.

:func:`suggest` pairs every target module with the source module most likely to feed it, then compresses
the tensor pairs into a few readable rules (``layer{a}.{b}.conv1.{p}`` rather than hundreds of literal
renames), checks that the rules route every key where the pairing says, and renders a mapping file. It is
a starting point for a human: ``weightport suggest SOURCE TARGET -o my.toml``, read the file, then prove
it with ``weightport verify my.toml``.

How pairs are chosen (no tensor data is read):

1. Same name and shape: nothing to do.
2. Siblings whose dim 0 concatenates into one target (``q_proj``/``k_proj``/``v_proj`` -> ``qkv``)
   become ``fuse`` rules; the mirror case ``split`` rules.
3. The rest is paired module by module (:mod:`._modules`): a sorted source (a safetensors file) is first
   put back in module order by its layer indices; source and target modules are aligned in order, a
   module's weight, bias, statistics and counters moving together.
4. Tensors of modules that found no partner are paired one by one by element count and names
   (:mod:`._tensors`); scalar buffers (``num_batches_tracked``) never pair across modules.

Whatever cannot be paired, or routed by a valid rule, is listed, never guessed and never an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from weightport.mapping.core import Mapping
from weightport.mapping.suggest._modules import in_module_order, pair_leaves, pair_units, units
from weightport.mapping.suggest._rules import make_rules, toml_value
from weightport.mapping.suggest._tensors import pair_by_shape, pair_fused

__all__ = ["Suggestion", "suggest"]

Shape = tuple[int, ...]


@dataclass
class Suggestion:
    """What :func:`suggest` proposes.

    Attributes:
        rules: Rule tables as a mapping file holds them (``{"rename": ..., "to": ...}``), in order.
        pairs: Target name -> the source name(s) the rules route to it.
        unmatched_targets: Target tensors nothing was found for (they would stay fresh).
        unmatched_sources: Source tensors no target needs (they would be unused).
    """

    rules: list[dict[str, Any]]
    pairs: dict[str, tuple[str, ...]]
    unmatched_targets: list[str] = field(default_factory=list)
    unmatched_sources: list[str] = field(default_factory=list)

    def mapping(self) -> Mapping:
        """The rules as a :class:`~weightport.Mapping`."""
        from weightport.mapping.files import parse_mapping

        return parse_mapping({"rule": self.rules}, "<suggested>")

    def to_toml(
        self,
        *,
        name: str = "suggested",
        source: str | None = None,
        target: str | None = None,
        source_file: str | None = None,
    ) -> str:
        """The suggestion as a mapping file (``weightport suggest -o``).

        Args:
            name: The mapping's name.
            source: The source *architecture* spec (``torchvision:resnet50``), when it was one.
            target: The target architecture spec.
            source_file: The weights file the suggestion was read from, when the source was a file
                (then ``source`` stays unset: a path is not an architecture).
        """
        total = len(self.pairs) + len(self.unmatched_targets)
        about = f"suggested by weightport: {len(self.pairs)} of {total} target tensors paired"
        lines = [f"name = {toml_value(name)}", f"description = {toml_value(about)}"]
        fields = (("source", source), ("target", target), ("source_file", source_file))
        lines += [f"{k} = {toml_value(v)}" for k, v in fields if v]
        lines.append("# Generated from names and shapes only: read it, then prove it with `weightport verify`.")
        for rule in self.rules:
            lines.append("\n[[rule]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in rule.items()]
        for title, names in (
            ("target tensors with no source (they keep their init)", self.unmatched_targets),
            ("source tensors no target uses (add drop rules to silence them)", self.unmatched_sources),
        ):
            if names:
                lines.append(f"\n# {len(names)} {title}:")
                lines += [f"#   {n}" for n in names]
        return "\n".join(lines) + "\n"


def suggest(source: Any, target: Any, *, into: str | None = None, checkpoint_key: str | None = None) -> Suggestion:
    """Propose rules that route ``source`` names onto ``target`` names, reading no tensor data.

    Args:
        source: Anything :func:`weightport.open_source` accepts (a file, folder, spec, state dict, module),
            or a mapping of name -> shape.
        target: The model to load into (an ``nn.Module``, meta-built is fine), or a mapping of name -> shape.
        into: Suggest for this submodule of ``target`` only.
        checkpoint_key: Key of the weights inside a nested checkpoint.

    Returns:
        A :class:`Suggestion` whose rules were checked to route every paired source key to its target;
        what could not be paired is listed in ``unmatched_targets`` / ``unmatched_sources``.
    """
    src = _source_shapes(source, checkpoint_key)
    src = {k: src[k] for k in in_module_order(list(src))}
    tgt = _target_shapes(target, into)
    exact = {t: t for t in tgt if src.get(t) == tgt[t]}
    left_src = {k: v for k, v in src.items() if k not in exact}
    left_tgt = {k: v for k, v in tgt.items() if k not in exact}
    # Many-to-one first: one-to-one pairing would otherwise spend q/k/v on look-alike tensors.
    fused = pair_fused(left_src, left_tgt)
    split = pair_fused(left_tgt, left_src)  # source -> the targets it splits into
    taken_src = {s for parts in fused.values() for s in parts} | set(split)
    taken_tgt = set(fused) | {t for ts in split.values() for t in ts}
    left_src = {k: v for k, v in left_src.items() if k not in taken_src}
    left_tgt = {k: v for k, v in left_tgt.items() if k not in taken_tgt}
    pairs: dict[str, str] = {}
    for s_unit, t_unit in pair_units(units(left_src), units(left_tgt)):
        pairs.update(pair_leaves(s_unit, t_unit))
    used = set(pairs.values())
    pairs.update(
        pair_by_shape(
            {k: v for k, v in left_src.items() if k not in used and v},
            {k: v for k, v in left_tgt.items() if k not in pairs and v},
        )
    )
    reshaped = {t: s for t, s in pairs.items() if src[s] != tgt[t]}
    renamed = {t: s for t, s in pairs.items() if t not in reshaped}
    rules, dropped = make_rules(src, {**exact, **renamed}, reshaped, fused, split)
    routed: dict[str, tuple[str, ...]] = {t: (s,) for t, s in {**exact, **renamed, **reshaped}.items()}
    routed.update(fused)
    for s, ts in split.items():
        routed.update({t: (s,) for t in ts})
    routed = {t: ss for t, ss in routed.items() if t not in dropped}
    used = {s for ss in routed.values() for s in ss}
    return Suggestion(
        rules=rules,
        pairs={t: routed[t] for t in tgt if t in routed},
        unmatched_targets=[t for t in tgt if t not in routed],
        unmatched_sources=[s for s in src if s not in used],
    )


def _is_shapes(obj: Any) -> bool:
    from collections.abc import Mapping as MappingABC

    return isinstance(obj, MappingABC) and all(
        isinstance(v, (tuple, list)) and all(isinstance(d, int) for d in v) for v in obj.values()
    )


def _source_shapes(source: Any, checkpoint_key: str | None) -> dict[str, Shape]:
    if _is_shapes(source):
        return {k: tuple(v) for k, v in source.items()}
    from weightport.sources import open_source

    src = open_source(source, checkpoint_key=checkpoint_key)
    return {k: tuple(src.meta(k).shape) for k in src}


def _target_shapes(target: Any, into: str | None) -> dict[str, Shape]:
    if _is_shapes(target):
        return {k: tuple(v) for k, v in target.items()}
    from weightport.planning.targets import collect_targets, scope_of

    found = collect_targets(scope_of(target, into))
    return {n: tuple(t.tensor.shape) for n, t in found.items() if t.canonical == n}
