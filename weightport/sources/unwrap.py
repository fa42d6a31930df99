"""Finding the weights inside a checkpoint and normalising their names.

Checkpoints nest their weights (``{'net': …, 'optimizer': …, 'epoch': 3}``), keep
an EMA copy beside them, or wrap every key in ``module.`` (DataParallel/DDP) or
``_orig_mod.`` (``torch.compile``). :func:`find_weights` picks the state dict and
says where it found it; :func:`strip_wrapper_prefixes` removes prefixes that
*every* key carries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from weightport.errors import SourceError
from weightport.sources._mapped import TensorRef
from weightport.sources.unpickle import Inert, inert_name, is_module_like, module_state

WRAPPER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "module",
    "model_state",
    "params",
    "weights",
)
EMA_KEYS = ("state_dict_ema", "model_ema", "model_ema_state_dict", "ema_state_dict", "ema", "ema_model", "ema_state")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Found:
    """The weights found in a checkpoint and how they were reached."""

    tensors: dict[str, Any]
    wrapper: str | None = None
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: Mapping[str, Any] | None = None


def is_leaf(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, TensorRef))


def _holds_weights(x: Any, depth: int = 0) -> bool:
    if is_module_like(x):
        return True
    if isinstance(x, Mapping) and depth < 3:
        return any(is_leaf(v) or _holds_weights(v, depth + 1) for v in x.values())
    return False


def find_weights(obj: Any, location: str, checkpoint_key: str | None = None) -> Found:
    """Locate the state dict inside ``obj`` (a loaded checkpoint's object tree).

    Raises:
        SourceError: ``checkpoint_key`` names nothing, or no (unique) state dict exists.
    """
    if checkpoint_key is not None:
        value = _descend(obj, checkpoint_key, location)
        found = _flatten_any(value, location)
        found.wrapper = checkpoint_key
        return found
    if is_module_like(obj):
        found = Found(module_state(obj))
        found.notes.append(f"weights recovered from a pickled {inert_name(obj)} by safe extraction")
        return found
    if not isinstance(obj, Mapping):
        raise SourceError(
            f"{location}: holds a {inert_name(obj)}, not a state dict or a checkpoint containing one; "
            "pass checkpoint_key= if the weights are inside it"
        )
    direct = [k for k, v in obj.items() if is_leaf(v)]
    wrappers = [k for k in WRAPPER_KEYS if k in obj and _holds_weights(obj[k])]
    emas = [k for k in EMA_KEYS if k in obj and _holds_weights(obj[k])]
    if direct and not wrappers:
        found = _flatten(obj)
        found.metadata = _metadata_of(obj)
        return found
    key = wrappers[0] if wrappers else emas[0] if emas else _only_nested(obj, location)
    found = _flatten_any(obj[key], location)
    found.wrapper = str(key)
    others = [k for k in wrappers + emas if k != key]
    if others:
        found.notes.append(
            f"also found weights under {', '.join(map(repr, others))}; "
            f"pass checkpoint_key= to use them instead of {key!r}"
        )
    found.ignored.extend(f"{k}" for k in obj if k != key)
    return found


def _only_nested(obj: Mapping[Any, Any], location: str) -> Any:
    nested = [k for k, v in obj.items() if _holds_weights(v)]
    if len(nested) == 1:
        return nested[0]
    if not nested:
        raise SourceError(f"{location}: no tensors found (top-level keys: {_preview(obj)}); is this a weights file?")
    raise SourceError(
        f"{location}: weights found under several keys ({', '.join(map(repr, nested))}); "
        "pass checkpoint_key= to choose one"
    )


def _descend(obj: Any, key: str, location: str) -> Any:
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    node = obj
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            keys = _preview(node) if isinstance(node, Mapping) else inert_name(node)
            raise SourceError(f"{location}: checkpoint_key={key!r} not found (available keys: {keys})")
        node = node[part]
    return node


def _preview(obj: Mapping[Any, Any]) -> str:
    keys = [repr(k) for k in list(obj)[:12]]
    return ", ".join(keys) + (", …" if len(obj) > 12 else "") if keys else "none"


def _flatten_any(value: Any, location: str) -> Found:
    if is_module_like(value):
        found = Found(module_state(value))
        found.notes.append(f"weights recovered from a pickled {inert_name(value)} by safe extraction")
        return found
    if isinstance(value, Mapping):
        found = _flatten(value)
        found.metadata = _metadata_of(value)
        if not found.tensors:
            raise SourceError(f"{location}: the selected entry holds no tensors")
        return found
    raise SourceError(f"{location}: the selected entry is a {inert_name(value)}, not a state dict")


def _flatten(d: Mapping[Any, Any], prefix: str = "", found: Found | None = None) -> Found:
    found = found or Found({})
    for k, v in d.items():
        name = f"{prefix}{k}"
        if is_leaf(v):
            found.tensors[name] = v
        elif is_module_like(v):
            found.tensors.update({f"{name}.{n}": t for n, t in module_state(v).items()})
        elif isinstance(v, Mapping) and _holds_weights(v):
            _flatten(v, f"{name}.", found)
        else:
            found.ignored.append(name)
    return found


def _metadata_of(d: Any) -> Mapping[str, Any] | None:
    meta = getattr(d, "__dict__", {}).get("_metadata") if not isinstance(d, Inert) else None
    return meta if isinstance(meta, Mapping) else None


def strip_wrapper_prefixes(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Strip ``module.`` / ``_orig_mod.`` while every name carries one.

    Returns:
        ``(renames, stripped)``: old -> new names, and the prefixes removed in order.
    """
    names = list(names)
    current = {n: n for n in names}
    stripped: list[str] = []
    while current:
        for p in WRAPPER_PREFIXES:
            if all(v.startswith(p) and len(v) > len(p) for v in current.values()):
                current = {k: v[len(p) :] for k, v in current.items()}
                stripped.append(p)
                break
        else:
            break
    return {k: v for k, v in current.items() if k != v}, stripped
