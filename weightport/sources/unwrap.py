"""Finding the weights inside a checkpoint and normalising their names.

Checkpoints nest their weights (``{'net': …, 'optimizer': …, 'epoch': 3}``), keep
an EMA copy beside them, or wrap every key in ``module.`` (DataParallel/DDP) or
``_orig_mod.`` (``torch.compile``). :func:`find_weights` picks the state dict and
says where it found it; :func:`strip_wrapper_prefixes` removes prefixes that
*every* key carries.

A pickled whole ``nn.Module`` (``torch.save(model)``) arrives as a tree of inert
placeholders; :func:`module_state` rebuilds its exact ``state_dict()`` names from
the recorded ``_parameters`` / ``_buffers`` / ``_modules`` (non-persistent buffers
left out), without importing the module's class. Every walk here is bounded:
object graphs from a file may be cyclic or share nodes exponentially often.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from weightport.errors import CorruptFileError, SourceError
from weightport.sources._mapped import TensorRef
from weightport.sources.safepickle import Inert, inert_name

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
MAX_TENSORS = 1_000_000  # names one checkpoint may produce
MAX_VISITS = 1_000_000  # nodes one judgement of "does this hold weights" may visit
#: Work one checkpoint's walk may do, shared by all its keys: nodes visited plus entries iterated
#: (every ``_parameters`` / ``_buffers`` / ``_modules`` entry of every module on every path).
MAX_WALK_WORK = 5_000_000
MAX_DEPTH = 100


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


# -- pickled modules -------------------------------------------------------------------------------


def _attrs(obj: Any) -> dict[Any, Any] | None:
    """The ``__dict__`` a pickled object was given (``BUILD`` state, maybe ``(dict, slots)``)."""
    if not isinstance(obj, Inert):
        return None
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]
    return state if isinstance(state, dict) else None


def is_module_like(obj: Any) -> bool:
    """Whether ``obj`` is a placeholder for a pickled ``nn.Module`` (or a real one, from ``trust_pickle=True``)."""
    if isinstance(obj, torch.nn.Module):
        return True
    attrs = _attrs(obj)
    return attrs is not None and isinstance(attrs.get("_modules"), dict) and isinstance(attrs.get("_parameters"), dict)


def module_state(obj: Inert | torch.nn.Module, visits: _Visits | None = None) -> dict[str, Any]:
    """The ``state_dict()`` names and tensors recorded in a pickled module graph.

    A real module (only ever met with ``trust_pickle=True``) gives its own ``state_dict()``. ``visits``
    is the budget of the enclosing walk, when there is one.

    Raises:
        CorruptFileError: The module graph contains itself, or is implausibly large or deep.
    """
    if isinstance(obj, torch.nn.Module):
        return {k: v for k, v in obj.state_dict().items() if is_leaf(v)}
    out: dict[str, Any] = {}
    _collect(obj, "", out, [], visits or _Visits())
    return out


class _Visits:
    def __init__(self) -> None:
        self.left = MAX_WALK_WORK
        self.holds: dict[int, bool] = {}  # id -> _holds_weights, so shared nodes are judged once

    def holds_weights(self, x: Any) -> bool:
        found = self.holds.get(id(x))
        if found is None:
            self.tick("the checkpoint")
            found = self.holds[id(x)] = _holds_weights(x)
        return found

    def tick(self, what: str, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise CorruptFileError(
                f"{what} is implausibly large (more than {MAX_WALK_WORK} nodes and entries to visit)"
            )


def _collect(obj: Inert, prefix: str, out: dict[str, Any], ancestors: list[int], visits: _Visits) -> None:
    visits.tick("the pickled module graph")
    if id(obj) in ancestors or len(ancestors) > MAX_DEPTH:
        raise CorruptFileError(
            f"the pickled module {prefix.rstrip('.') or inert_name(obj)} contains itself or nests too deeply"
        )
    attrs = _attrs(obj) or {}
    skip = attrs.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, (set, frozenset)) else set()
    for kind in ("_parameters", "_buffers"):
        table = attrs.get(kind)
        visits.tick("the pickled module graph", len(table) if isinstance(table, dict) else 0)
        for name, t in table.items() if isinstance(table, dict) else ():
            if is_leaf(t) and not (kind == "_buffers" and name in skip):
                _add(out, prefix + _key(name), t)
    ancestors.append(id(obj))
    children = attrs.get("_modules")
    visits.tick("the pickled module graph", len(children) if isinstance(children, dict) else 0)
    for name, child in children.items() if isinstance(children, dict) else ():
        if is_module_like(child):
            _collect(child, f"{prefix}{_key(name)}.", out, ancestors, visits)
    ancestors.pop()


def _key(k: Any) -> str:
    if type(k) is int and k.bit_length() > 256:  # str() refuses ints of over 4300 digits
        return f"<an integer of {k.bit_length()} bits>"
    text = k if isinstance(k, str) else str(k)
    return text if len(text) <= 1000 else text[:1000] + "…"


def _add(out: dict[str, Any], name: str, tensor: Any) -> None:
    if len(out) >= MAX_TENSORS:
        raise CorruptFileError(f"the checkpoint yields more than {MAX_TENSORS} tensor names")
    out[name] = tensor


def _holds_weights(x: Any, depth: int = 0, seen: set[int] | None = None) -> bool:
    if is_module_like(x):
        return True
    if not isinstance(x, Mapping) or depth >= 3:
        return False
    seen = set() if seen is None else seen
    if id(x) in seen or len(seen) > MAX_VISITS:
        return False
    seen.add(id(x))
    return any(is_leaf(v) or _holds_weights(v, depth + 1, seen) for v in x.values())


def find_weights(obj: Any, location: str, checkpoint_key: str | None = None, ema: bool | None = None) -> Found:
    """Locate the state dict inside ``obj`` (a loaded checkpoint's object tree).

    Raw weights sit under :data:`WRAPPER_KEYS` (``state_dict``, ``model`` …), an EMA copy under
    :data:`EMA_KEYS` (``state_dict_ema``, ``model_ema`` …), searched in timm's order. ``ema=True``
    takes the EMA copy (timm's ``use_ema=True``), ``ema=False`` the raw weights; ``None`` takes the
    raw weights where both exist and the EMA copy where it is all there is. When both exist, a note
    says which was taken and where the other is.

    Raises:
        SourceError: ``checkpoint_key`` names nothing or is given with ``ema``, ``ema=False`` and
            the checkpoint holds EMA weights only, or no (unique) state dict exists.
    """
    if checkpoint_key is not None:
        if ema is not None:
            raise SourceError(
                f"{location}: checkpoint_key={checkpoint_key!r} and ema={ema!r} both choose the weights; pass one"
            )
        value = _descend(obj, checkpoint_key, location)
        found = _flatten_any(value, location)
        found.wrapper = checkpoint_key
        return found
    if is_module_like(obj):
        found = Found(module_state(obj))
        found.notes.append(_recovered(obj))
        return found
    if _attrs(obj) is not None and _holds_weights(_attrs(obj)):  # e.g. torch.save(trainer)
        found = find_weights(_attrs(obj), location, ema=ema)
        found.notes.append(f"weights found in the attributes of a pickled {inert_name(obj)}")
        return found
    if not isinstance(obj, Mapping):
        raise SourceError(
            f"{location}: holds a {inert_name(obj)}, not a state dict or a checkpoint containing one; "
            "pass checkpoint_key= if the weights are inside it"
        )
    direct = [k for k, v in obj.items() if is_leaf(v)]
    wrappers = [k for k in WRAPPER_KEYS if k in obj and _holds_weights(obj[k])]
    emas = [k for k in EMA_KEYS if k in obj and _holds_weights(obj[k])]
    if direct and not wrappers and not (ema and emas):
        found = _flatten(obj)
        found.metadata = _metadata_of(obj)
        return found
    key = _choose(wrappers, emas, ema, obj, location)
    found = _flatten_any(obj[key], location)
    found.wrapper = str(key)
    if wrappers and emas and key in emas:
        found.notes.append(f"EMA weights taken, not the raw weights under {wrappers[0]!r} (ema=False takes those)")
    elif wrappers and emas:
        found.notes.append(f"raw weights taken, not the EMA weights under {emas[0]!r} (ema=True takes those)")
    elif key in emas:
        found.notes.append(f"EMA weights taken from {key!r} (the checkpoint holds no raw weights)")
    others = [k for k in wrappers + emas if k not in (key, *wrappers[:1], *emas[:1])]
    if others:
        found.notes.append(
            f"also found weights under {', '.join(map(repr, others))}; "
            f"pass checkpoint_key= to use them instead of {key!r}"
        )
    # the other weights are named in the notes: "ignored" lists the entries that hold no weights
    found.ignored.extend(f"{k}" for k in obj if k != key and k not in wrappers and k not in emas)
    return found


def _choose(wrappers: list[str], emas: list[str], ema: bool | None, obj: Mapping[Any, Any], location: str) -> Any:
    """The key whose weights to take: EMA or raw as ``ema`` asks (timm's ``use_ema`` order)."""
    if ema and emas:
        return emas[0]
    if wrappers:
        return wrappers[0]
    if emas:
        if ema is False:
            raise SourceError(
                f"{location}: ema=False asks for the raw weights, but the checkpoint holds only EMA weights "
                f"(under {emas[0]!r}); pass ema=None or ema=True to take them"
            )
        return emas[0]
    return _only_nested(obj, location)


def _recovered(obj: Any) -> str:
    if isinstance(obj, torch.nn.Module):
        return f"weights from the unpickled {type(obj).__name__}.state_dict() (trust_pickle=True)"
    return f"weights recovered from a pickled {inert_name(obj)} by safe extraction"


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
    obj = _attrs(obj) if _attrs(obj) is not None and not is_module_like(obj) else obj
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    node = obj
    for part in key.split("/"):
        node = _attrs(node) if _attrs(node) is not None and not is_module_like(node) else node
        if not isinstance(node, Mapping) or part not in node:
            keys = _preview(node) if isinstance(node, Mapping) else inert_name(node)
            raise SourceError(f"{location}: checkpoint_key={key!r} not found (available keys: {keys})")
        node = node[part]
    return node


def _preview(obj: Mapping[Any, Any]) -> str:
    keys = [_key(k if type(k) is int else repr(k))[:80] for k in list(obj)[:12]]
    return ", ".join(keys) + (", …" if len(obj) > 12 else "") if keys else "none"


def _flatten_any(value: Any, location: str) -> Found:
    if is_module_like(value):
        found = Found(module_state(value))
        found.notes.append(_recovered(value))
        return found
    if isinstance(value, Mapping):
        found = _flatten(value)
        found.metadata = _metadata_of(value)
        if not found.tensors:
            raise SourceError(f"{location}: the selected entry holds no tensors")
        return found
    raise SourceError(f"{location}: the selected entry is a {inert_name(value)}, not a state dict")


def _flatten(
    d: Mapping[Any, Any],
    prefix: str = "",
    found: Found | None = None,
    ancestors: list[int] | None = None,
    visits: _Visits | None = None,
) -> Found:
    found = found or Found({})
    ancestors, visits = ancestors if ancestors is not None else [], visits or _Visits()
    if id(d) in ancestors or len(ancestors) > MAX_DEPTH:
        raise CorruptFileError(
            f"the checkpoint entry {prefix.rstrip('.') or 'at the top'} contains itself or nests too deeply"
        )
    ancestors.append(id(d))
    for k, v in d.items():
        visits.tick("the checkpoint")
        name = f"{prefix}{_key(k)}"
        if is_leaf(v):
            _add(found.tensors, name, v)
        elif is_module_like(v):
            for n, t in module_state(v, visits).items():
                _add(found.tensors, f"{name}.{n}", t)
        elif isinstance(v, Mapping) and visits.holds_weights(v):
            _flatten(v, f"{name}.", found, ancestors, visits)
        else:
            found.ignored.append(name)
    ancestors.pop()
    return found


def _metadata_of(d: Any) -> Mapping[str, Any] | None:
    """A state dict's ``_metadata`` (module versions), when it has the shape torch gives it."""
    meta = getattr(d, "__dict__", {}).get("_metadata") if not isinstance(d, Inert) else None
    if not isinstance(meta, Mapping) or len(meta) > MAX_TENSORS:
        return None
    plain = (str, int, float, bool, type(None))
    ok = all(
        isinstance(k, str)
        and isinstance(v, Mapping)
        and all(isinstance(a, str) and isinstance(b, plain) for a, b in v.items())
        for k, v in meta.items()
    )
    return meta if ok else None


def strip_wrapper_prefixes(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Strip ``module.`` / ``_orig_mod.`` while every name carries one.

    Returns:
        ``(renames, stripped)``: old -> new names, and the prefixes removed in order.
    """
    names = list(names)
    if not names:
        return {}, []
    # Strings sharing a prefix are one interval in sorted order: when the smallest and the largest
    # name carry it, all do (one C-speed min/max instead of a test per name, for 100k names).
    lo, hi = min(names), max(names)
    stripped: list[str] = []
    cut = 0
    while True:
        for p in WRAPPER_PREFIXES:
            if lo.startswith(p, cut) and hi.startswith(p, cut) and len(lo) > cut + len(p):
                cut += len(p)  # the smallest name is the shortest of those that start alike
                stripped.append(p)
                break
        else:
            break
    return ({n: n[cut:] for n in names} if cut else {}), stripped
