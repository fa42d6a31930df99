"""Why a transfer would load nothing: the likely cause, read from the names alone.

A plan that loads no tensor is almost always a mistake (the wrong file, a prefix, another
architecture), so it is refused unless ``allow_empty=True``; the message says what the names
suggest and what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["nothing_loaded"]

_SHOWN = 3


def nothing_loaded(source_keys: Sequence[str], target_names: Sequence[str], location: str) -> str:
    """The message for a plan that loads nothing from ``location``."""
    head = (
        f"{location}: nothing would load: none of its {len(source_keys)} tensors fits the model's {len(target_names)}"
    )
    return f"{head}. {_cause(source_keys, target_names)} (pass allow_empty=True if loading nothing is intended)"


def _cause(keys: Sequence[str], names: Sequence[str]) -> str:
    if keys and all("/" in k for k in keys) and any(k.startswith("model/") for k in keys):
        return (
            "It looks like a weightport training checkpoint read without its metadata (another reader "
            "loaded it): pass the file's path instead, which takes its model part, or resume it with "
            "weightport.checkpoint.resume(path, model=...)"
        )
    prefix = _shared_prefix(keys)
    wanted = set(names)
    if prefix and sum(k[len(prefix) :] in wanted for k in keys) >= max(1, len(keys) // 2):
        return (
            f"Every source key starts with {prefix!r}, and without it they match the model's names: "
            f"add rules=[weightport.strip_prefix({prefix!r})] (CLI: --rule '{prefix}{{rest*}}=>{{rest}}')"
        )
    prefix = _shared_prefix(names)
    if prefix and sum(prefix + k in wanted for k in keys) >= max(1, len(keys) // 2):
        return (
            f"The model's names all start with {prefix!r}: add rules=[weightport.add_prefix({prefix!r})], "
            f"or into={prefix[:-1]!r}"
        )
    pairs = [(n, difflib.get_close_matches(n, keys, n=1, cutoff=0.0)) for n in list(names)[:_SHOWN]]
    shown = "; ".join(f"model {n!r} ~ source {m[0]!r}" for n, m in pairs if m)
    return (
        "The names differ, maybe another architecture (closest: "
        + (shown or "none")
        + "): try a shipped mapping (weightport mappings) or `weightport suggest SOURCE TARGET`"
    )


def _shared_prefix(keys: Sequence[str]) -> str:
    """The dotted prefix (``"model."``) every key starts with, or ``""``."""
    if not keys:
        return ""
    first = keys[0].split(".", 1)[0] + "."
    if first == "." or not all(k.startswith(first) and len(k) > len(first) for k in keys):
        return ""
    return first
