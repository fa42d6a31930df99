"""Mapping files: TOML in ``mappings/``, validated on load.

Format::

    name = "torchvision.vit->timm.vit"
    description = "torchvision VisionTransformer to timm VisionTransformer"
    source = "torchvision:vit_b_16"          # what it was verified on
    target = "timm:vit_base_patch16_224"
    verified = ["vit_b_16", "vit_l_16"]      # optional: every variant the parity test checks
    source_prefix = "vit."                   # optional: stripped from source keys that have it
    source_file = "w.safetensors"            # optional: the weights file a suggestion was made from
    atol = 1e-3                              # optional: verify's output tolerance for this mapping
    extends = "other.mapping"               # optional: its rules come after ours

    [[rule]]
    rename = "encoder.layers.encoder_layer_{i}.ln_{n}.{p}"
    to = "blocks.{i}.norm{n}.{p}"

    [[rule]]
    drop = "heads.pre_logits.**"

    [[rule]]
    split = "blocks.{i}.attn.qkv.{p}"
    to = ["a.{i}.q.{p}", "a.{i}.k.{p}", "a.{i}.v.{p}"]
    dim = 0                                  # sizes = [...] for uneven parts
    ops = ["transpose"]                      # optional: an op chain applied to each part

    [[rule]]
    fuse = ["x.{i}.q.{p}", "x.{i}.k.{p}", "x.{i}.v.{p}"]
    to = "blocks.{i}.attn.qkv.{p}"

    [[rule]]
    transform = "head.weight"
    to = "fc.weight"
    op = "select"                            # a registered op or adapter
    index = [0, 5, 9]                        # its parameters, inline

    [[rule]]
    rename = "h.{i}.mlp.c_fc.weight"         # rename, transform and fuse (to each input) take
    to = "blocks.{i}.fc1.weight"             # an op chain too: names, or tables with 'op'
    ops = ["transpose", {op = "reshape", shape = [-1]}]

    [[rule]]
    strip_prefix = "backbone."               # also: add_prefix

    [[rule]]
    fuse = ["a.{i}.wq.weight", "a.{i}.wk.weight", "a.{i}.wv.weight"]
    to = "a.{i}.wqkv.weight"
    groups = "$kv_heads"                     # per kv group: its q heads, its k head, its v head

    [[rule]]
    rename = "a.{i}.q_proj.weight"           # op parameters may name model facts
    to = "a.{i}.wq.weight"                   # ($heads, $kv_heads, $head_dim, $hidden, $vocab),
    ops = [{op = "rope_permute", heads = "$heads"}]   # read from the configs (facts= overrides)

    [[rule]]
    stack = "layers.{i}.experts.{e}.w1.weight"   # experts one by one -> one stacked tensor
    to = "layers.{i}.moe.w1"                 # (unstack: the inverse, the template names {e})
    over = "e"

    [[rule]]
    tie = "lm_head.weight"                   # a target the source lacks, filled with what
    like = "embed_tokens.weight"             # feeds another target (both target names)

Errors name the file, the rule number and the field.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from weightport.errors import MappingError, PatternError
from weightport.mapping.builders import (
    add_prefix,
    drop,
    fuse,
    rename,
    split,
    stack,
    strip_prefix,
    tie,
    transform,
    unstack,
)
from weightport.mapping.core import Mapping
from weightport.mapping.ops import get_op
from weightport.mapping.pattern import Pattern, Placeholder, Template
from weightport.mapping.rules import Rule, Stack, dropped_captures

__all__ = ["list_mappings", "load_mapping", "mapping_files", "parse_mapping"]

TOP_FIELDS = {
    "name",
    "description",
    "source",
    "target",
    "verified",
    "source_prefix",
    "source_file",
    "atol",
    "extends",
    "rule",
}
KINDS = ("rename", "drop", "split", "fuse", "transform", "strip_prefix", "add_prefix", "tie", "stack", "unstack")
FIELDS = {
    "rename": {"to", "ops"},
    "drop": set(),
    "split": {"to", "dim", "sizes", "ops", "groups"},
    "fuse": {"to", "dim", "ops", "groups"},
    "tie": {"like"},
    "stack": {"to", "over", "dim", "ops"},
    "unstack": {"to", "over", "dim", "ops"},
    "transform": {"to", "op", "params", "ops"},
    "strip_prefix": set(),
    "add_prefix": set(),
}


def shipped_dir() -> Path:
    """The folder of shipped mapping files (inside the wheel, or the source checkout)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "mappings", here.parent / "mappings"):
        if candidate.is_dir():
            return candidate
    return here / "mappings"


def mapping_files() -> dict[str, Path]:
    """Shipped mapping names and their files."""
    out: dict[str, Path] = {}
    folder = shipped_dir()
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.toml")):
        try:
            with open(path, "rb") as f:
                name = tomllib.load(f).get("name")
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if isinstance(name, str):
            out[name] = path
    return out


def list_mappings() -> list[str]:
    """Names of the shipped mappings."""
    return sorted(mapping_files())


def load_mapping(name_or_path: str | os.PathLike[str]) -> Mapping:
    """Load a shipped mapping by name, or a mapping file by path.

    Raises:
        MappingError: unknown name, or an invalid file (the message names file, rule and field).
    """
    return _load(os.fspath(name_or_path), ())


def _load(ref: str, chain: tuple[str, ...]) -> Mapping:
    path = _find(ref)
    key = str(path.resolve())
    if key in chain:
        raise MappingError(f"{path}: 'extends' forms a cycle: {' -> '.join(chain + (key,))}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise MappingError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise MappingError(f"{path}: not valid UTF-8 text: {e}") from e
    return parse_mapping(data, str(path), chain + (key,))


def _find(ref: str) -> Path:
    if os.path.isfile(ref):
        return Path(ref)
    shipped = mapping_files()
    if ref in shipped:
        return shipped[ref]
    raise MappingError(
        f"{ref!r} is neither a mapping file nor a shipped mapping; shipped: {', '.join(sorted(shipped)) or 'none'}"
    )


def parse_mapping(data: Any, path: str = "<mapping>", chain: tuple[str, ...] = ()) -> Mapping:
    """Validate parsed TOML and build the :class:`Mapping`."""
    if not isinstance(data, dict):
        raise MappingError(f"{path}: a mapping file is a TOML table")
    unknown = sorted(set(data) - TOP_FIELDS)
    if unknown:
        raise MappingError(
            f"{path}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(TOP_FIELDS))}"
        )
    for field in ("name", "description", "source", "target", "source_prefix", "source_file", "extends"):
        if field in data and not isinstance(data[field], str):
            raise MappingError(f"{path}: field {field!r} must be a string")
    atol = data.get("atol")
    if atol is not None and (isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0):
        raise MappingError(f"{path}: field 'atol' must be a non-negative number (verify's output tolerance)")
    verified = data.get("verified", [])
    if not isinstance(verified, list) or not all(isinstance(v, str) for v in verified):
        raise MappingError(f"{path}: field 'verified' must be a list of strings (the variants the tests check)")
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise MappingError(f"{path}: 'rule' must be an array of tables ([[rule]])")
    rules = [_rule(r, f"{path} rule {i}") for i, r in enumerate(raw_rules, 1)]
    _check_targets_unique(rules, path)
    try:
        mapping = Mapping(
            rules,
            name=data.get("name"),
            description=data.get("description"),
            source=data.get("source"),
            target=data.get("target"),
            verified=tuple(verified),
            source_prefix=data.get("source_prefix"),
            path=path,
            source_file=data.get("source_file"),
            atol=float(atol) if atol is not None else None,
        )
    except MappingError as e:
        raise MappingError(f"{path}: {e}") from None
    if "extends" in data:
        base = _load(data["extends"], chain)
        mapping = Mapping(mapping.rules + base.rules, **mapping._fields())
    return mapping


def _rule(raw: dict[str, Any], where: str) -> Rule:
    kinds = [k for k in KINDS if k in raw]
    if len(kinds) != 1:
        raise MappingError(f"{where}: a rule has exactly one of {', '.join(KINDS)}; found {', '.join(kinds) or 'none'}")
    kind = kinds[0]
    where = f"{where} ({kind})"
    allowed = FIELDS[kind] | {kind}
    if kind == "transform" and "ops" in raw:
        if "op" in raw or "params" in raw:
            raise MappingError(f"{where}: give either 'op' (with its parameters) or 'ops', a chain, not both")
    elif kind == "transform":
        op = raw.get("op")
        if not isinstance(op, str):
            raise MappingError(f"{where}: field 'op' must name a registered op (or give 'ops', a chain)")
        try:
            allowed |= get_op(op).params
        except MappingError as e:
            raise MappingError(f"{where}: field 'op': {e}") from None
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise MappingError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed here: {', '.join(sorted(allowed))}"
        )
    _check_field_syntax(kind, raw, where)
    try:
        rule = _build(kind, raw, where)
    except (PatternError, MappingError) as e:
        raise MappingError(f"{where}: {_strip_where(str(e), where)}") from None
    _check_captures_used(rule, where)
    return rule


def _check_field_syntax(kind: str, raw: dict[str, Any], where: str) -> None:
    """Parse every pattern and template on its own, so an error names its field."""
    pattern_field = kind if kind in ("rename", "drop", "split", "fuse", "transform", "stack") else None
    if pattern_field is None:
        return
    patterns = [Pattern(v) for v in _field_texts(raw, pattern_field, where, Pattern)]
    templates = [Template(v) for v in _field_texts(raw, "to", where, Template)]
    for t in templates:
        for p in patterns:
            t.check_against(p, f"{where}: field 'to'")


def _field_texts(raw: dict[str, Any], name: str, where: str, parser: Callable[[str], object]) -> list[str]:
    if name not in raw:
        return []
    values = raw[name] if isinstance(raw[name], list) else [raw[name]]
    for value in values:
        if not isinstance(value, str):
            raise MappingError(f"{where}: field {name!r} must hold strings, not {type(value).__name__}")
        try:
            parser(value)
        except PatternError as e:
            raise MappingError(f"{where}: field {name!r}: {e}") from None
    return values


def _strip_where(message: str, where: str) -> str:
    return message[len(where) + 2 :] if message.startswith(where + ": ") else message


def _field(raw: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in raw:
        raise MappingError(f"{where}: field {name!r} is required")
    value = raw[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MappingError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _strings(raw: dict[str, Any], name: str, where: str) -> list[str]:
    value = _field(raw, name, list, where)
    if not all(isinstance(v, str) for v in value):
        raise MappingError(f"{where}: field {name!r} must be a list of strings")
    return value


def _build(kind: str, raw: dict[str, Any], where: str) -> Rule:
    dim = _field(raw, "dim", int, where) if "dim" in raw else 0
    ops = _ops(raw, where)
    if kind == "rename":
        return rename(_field(raw, kind, str, where), _field(raw, "to", str, where), ops=ops, origin=where)
    if kind == "drop":
        return drop(_field(raw, kind, str, where), origin=where)
    if kind == "strip_prefix":
        return strip_prefix(_field(raw, kind, str, where), origin=where)
    if kind == "add_prefix":
        return add_prefix(_field(raw, kind, str, where), origin=where)
    if kind == "tie":
        return tie(_field(raw, kind, str, where), like=_field(raw, "like", str, where), origin=where)
    if kind in ("stack", "unstack"):
        make = stack if kind == "stack" else unstack
        pattern, target, over = (_field(raw, f, str, where) for f in (kind, "to", "over"))
        return make(pattern, target, over=over, dim=dim, ops=ops, origin=where)
    groups = _field(raw, "groups", (int, str), where) if "groups" in raw else 1
    if kind == "split":
        sizes = raw.get("sizes")
        if sizes is not None and not (isinstance(sizes, list) and all(type(s) in (int, str) for s in sizes)):
            raise MappingError(
                f"{where}: field 'sizes' must be a list of integers or model facts ('$heads * $head_dim')"
            )
        pattern, targets = _field(raw, kind, str, where), _strings(raw, "to", where)
        return split(pattern, targets, dim, sizes, ops=ops, groups=groups, origin=where)
    if kind == "fuse":
        patterns, target = _strings(raw, kind, where), _field(raw, "to", str, where)
        return fuse(patterns, target, dim, ops=ops, groups=groups, origin=where)
    if ops is not None:
        return transform(_field(raw, kind, str, where), _field(raw, "to", str, where), ops=ops, origin=where)
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise MappingError(f"{where}: field 'params' must be a table of op parameters")
    params = dict(params)
    params.update({k: v for k, v in raw.items() if k not in ("transform", "to", "op", "params")})
    return transform(_field(raw, kind, str, where), _field(raw, "to", str, where), raw["op"], origin=where, **params)


def _ops(raw: dict[str, Any], where: str) -> list[Any] | None:
    """Field ``ops``: a list of op names and ``{op = "name", param = ...}`` tables."""
    if "ops" not in raw:
        return None
    ops = raw["ops"]
    if not isinstance(ops, list) or not all(isinstance(o, str) or (isinstance(o, dict) and "op" in o) for o in ops):
        raise MappingError(
            f"{where}: field 'ops' must be a list of op names or tables with an 'op' key, "
            'e.g. ops = ["transpose", {op = "reshape", shape = [-1]}]'
        )
    return ops


def _check_captures_used(rule: Rule, where: str) -> None:
    """In files, a named capture the template ignores is an error: it maps many keys to one."""
    templates = rule.output_templates
    for pattern in rule.patterns:
        if pattern.text.startswith("re:"):
            continue
        stacked = {rule.over} if isinstance(rule, Stack) else set()
        for t, unused in dropped_captures(pattern, templates, stacked):
            raise MappingError(
                f"{where}: field 'to': placeholder(s) {', '.join('{' + n + '}' for n in unused)} captured "
                f"by {pattern.text!r} are not used in {t.text!r}; use them, or '*' to match without capturing"
            )


def _shape_of(template: Template) -> str:
    """A template with placeholder names erased: two rules with the same shape write the same keys.

    Offsets stay (``{i+3}``): rules that flatten stages into one list differ only by them."""
    out = []
    for t in template.tokens:
        if isinstance(t, str):
            out.append(t)
        elif isinstance(t, Placeholder):
            out.append("{*}" if t.multi else f"{{{t.offset:+d}}}" if t.offset else "{}")
    return "".join(out)


def _check_targets_unique(rules: list[Rule], path: str) -> None:
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules, 1):
        for t in rule.output_templates:
            shape = _shape_of(t)
            if shape in seen and seen[shape] != i:
                raise MappingError(
                    f"{path}: rules {seen[shape]} and {i} both write {t.text!r}; two rules would write the same target"
                )
            seen[shape] = i
