"""Spec schemes (``hf:org/name``, ``torchvision:resnet50`` …): a registry of openers, listable.

The built-in schemes (the zoos, and ``dcp:`` for DCP folders) are declared here as data, by the
function that opens them, and imported on first use: importing weightport imports no zoo module.
Any other scheme (``checkpoint:``, a user's own) registers an opener with
:func:`register_scheme`, which also overrides a built-in one.
This module imports no source: the openers depend on the sources, never the other way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weightport.sources.base import Source

SchemeOpener = Callable[..., "Source"]

_ZOO = {
    "dcp": "weightport.sources.dcp:open_dcp_spec",
    "hf": "weightport.sources.zoo_hf:open_hf",
    "timm": "weightport.sources.zoo_timm:open_timm",
    "torchvision": "weightport.sources.zoo_torchvision:open_torchvision",
}
_REGISTERED: dict[str, SchemeOpener] = {}


def register_scheme(name: str, opener: SchemeOpener) -> None:
    """Register ``opener(rest, *, checkpoint_key, check_hash, trust_pickle)`` for ``name:rest`` specs."""
    _REGISTERED[name] = opener


def list_schemes() -> list[str]:
    return sorted({*_ZOO, *_REGISTERED})


def find_opener(name: str) -> SchemeOpener | None:
    """The opener of scheme ``name`` (a zoo's imported now), or ``None`` for an unknown scheme."""
    opener = _REGISTERED.get(name)
    if opener is None and name in _ZOO:
        module, _, function = _ZOO[name].partition(":")
        opener = getattr(importlib.import_module(module), function)
    return opener
