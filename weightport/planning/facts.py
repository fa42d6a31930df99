"""Finding the model facts a mapping's parameters name (``"$heads"`` …; see :mod:`weightport.mapping.facts`).

Facts come from, in order of precedence:

1. the ``facts=`` option (``--fact heads=32`` on the command line);
2. the target model: its ``config`` (a transformers ``PretrainedConfig``, a litgpt ``Config``, a
   torchtitan model config), else the attributes of its attention modules (torchtune's
   ``num_heads``/``num_kv_heads``/``head_dim``, torchtitan's ``n_heads``/``n_kv_heads``), and its first
   embedding for ``vocab`` and ``hidden``;
3. the source's own config next to its files: a Hugging Face ``config.json``, a Meta ``params.json``,
   a litgpt ``model_config.yaml``.

Within one origin, ``kv_heads`` defaults to ``heads`` and ``head_dim`` to ``hidden // heads``. A fact that
the target and the source both give must agree (a port keeps the architecture); a disagreement or a
fact nobody gives is a :class:`MappingError` that names the fact and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from weightport.errors import MappingError
from weightport.mapping.facts import FACTS
from weightport.sources.base import Source

__all__ = ["model_facts", "resolve_facts", "source_facts"]

# attribute names each well-known fact goes by, in configs (first) and in attention modules
_CONFIG_NAMES: dict[str, tuple[str, ...]] = {
    "heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "kv_heads": ("num_key_value_heads", "n_query_groups", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim", "head_size", "kv_channels"),
    "hidden": ("hidden_size", "n_embd", "dim", "d_model", "embed_dim"),
    "vocab": ("padded_vocab_size", "vocab_size"),
}
_MODULE_NAMES: dict[str, tuple[str, ...]] = {
    "heads": ("num_heads", "n_heads", "num_attention_heads", "n_head"),
    "kv_heads": ("num_kv_heads", "n_kv_heads", "num_key_value_heads", "n_query_groups"),
    "head_dim": ("head_dim", "head_size"),
}
_SOURCE_CONFIGS = ("config.json", "params.json", "model_config.yaml")


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _read(obj: Any, names: Mapping[str, tuple[str, ...]], get: Callable[[Any, str], Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for fact, aliases in names.items():
        for alias in aliases:
            value = _positive(get(obj, alias))
            if value is not None:
                out[fact] = value
                break
    return out


def _complete(facts: dict[str, int]) -> dict[str, int]:
    """``kv_heads`` defaults to ``heads``, ``head_dim`` to ``hidden // heads``."""
    heads = facts.get("heads")
    if heads:
        facts.setdefault("kv_heads", heads)
        if "hidden" in facts and facts["hidden"] % heads == 0:
            facts.setdefault("head_dim", facts["hidden"] // heads)
    return facts


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)  # multimodal transformers configs
    if callable(text):
        try:
            config = text()
        except Exception:  # noqa: BLE001 - a config that cannot answer has no text part
            pass
    return config


def model_facts(model: nn.Module) -> dict[str, int]:
    """The facts a model states: its ``config`` first, then its modules' attributes."""
    out: dict[str, int] = {}
    config = _config_of(model)
    if config is not None and not isinstance(config, (str, int, float)):
        out.update(_read(config, _CONFIG_NAMES, lambda c, n: getattr(c, n, None)))
    for module in model.modules():
        if all(f in out for f in _MODULE_NAMES):
            break
        found = _read(module, _MODULE_NAMES, lambda m, n: m.__dict__.get(n))
        # a module of the same head count may add what an outer one left out (torchtune's decoder
        # states num_heads and head_dim, its attention modules num_kv_heads too)
        if "heads" in found and out.setdefault("heads", found["heads"]) == found["heads"]:
            for fact, value in found.items():
                out.setdefault(fact, value)
    if "vocab" not in out or "hidden" not in out:
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is not None:
            out.setdefault("vocab", embedding.num_embeddings)
            out.setdefault("hidden", embedding.embedding_dim)
    return _complete(out)


def source_facts(source: Source) -> tuple[dict[str, int], str | None]:
    """The facts the source's config file states, and that file's path (``None``: no config)."""
    for folder in _folders(source):
        for name in _SOURCE_CONFIGS:
            path = folder / name
            if path.is_file():
                data = _load(path)
                if isinstance(data, dict):
                    data = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
                    return _complete(_read(data, _CONFIG_NAMES, lambda d, n: d.get(n))), str(path)
    return {}, None


def _folders(source: Source) -> Iterable[Path]:
    seen: set[Path] = set()
    for f in (*source.info.files, source.info.location):
        p = Path(str(f))
        for folder in (p, p.parent) if p.is_dir() else (p.parent,):
            if folder.is_dir() and folder not in seen:
                seen.add(folder)
                yield folder


def _load(path: Path) -> Any:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        import yaml  # type: ignore[import-untyped]  # litgpt's model_config.yaml; PyYAML comes with transformers

        return yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001 - an unreadable config states nothing
        return None


def resolve_facts(
    names: Iterable[str], explicit: Mapping[str, int], model: nn.Module, source: Source, mapping_name: str
) -> dict[str, int]:
    """The value of every fact in ``names``.

    Raises:
        MappingError: a fact nobody states, or the target and the source disagree on one.
    """
    wanted = sorted(set(names))
    out = {n: explicit[n] for n in wanted if n in explicit}
    rest = [n for n in wanted if n not in out]
    if not rest:
        return out
    target = model_facts(model)
    found, path = source_facts(source)
    where = f"the source's {Path(path).name} ({path})" if path else "the source"
    missing: list[str] = []
    for name in rest:
        a, b = target.get(name), found.get(name)
        if a is not None and b is not None and a != b:
            raise MappingError(
                f"mapping {mapping_name}: model fact {name!r} is {a} in the target model but {b} in {where}; "
                f"the architectures differ, or pass facts={{{name!r}: N}} (CLI: --fact {name}=N) to say which"
            )
        value = a if a is not None else b
        if value is None:
            missing.append(name)
        else:
            out[name] = value
    if missing:
        known = ", ".join(f"{n} ({FACTS[n]})" for n in missing if n in FACTS)
        raise MappingError(
            f"mapping {mapping_name} needs model fact(s) {', '.join(map(repr, missing))}"
            + (f" [{known}]" if known else "")
            + f", which neither the target model (config or attention modules) nor {where} states; pass "
            + ", ".join(f"facts={{{n!r}: N}} (CLI: --fact {n}=N)" for n in missing)
        )
    return out
