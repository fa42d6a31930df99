"""What every format :func:`weightport.save` writes refuses: bad keys and values, metadata that is not strings."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from weightport.errors import WeightportError


def check_value(name: Any, t: Any) -> None:
    """Refuse what no format :func:`save` writes holds: a key that is not a string, a value that is not
    a tensor, a tensor on the meta device (no values) or not dense."""
    if not isinstance(name, str):
        raise WeightportError(f"save(): key {name!r} is not a string")
    if not isinstance(t, torch.Tensor):
        raise WeightportError(f"save(): {name!r} is a {type(t).__name__}, not a tensor")
    if t.is_meta:
        raise WeightportError(f"save(): {name!r} is on the meta device and has no values; load it first")
    if t.layout != torch.strided:
        raise WeightportError(
            f"save(): {name!r} is a {t.layout} tensor; weightport saves dense tensors (save {name!r}.to_dense())"
        )


def metadata_strings(metadata: Mapping[str, str] | None, aliases: dict[str, str]) -> dict[str, str]:
    """``metadata`` checked to be ``str -> str``, with the tied names (``aliases``) added as safetensors keeps them."""
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise WeightportError(f"save(): metadata must map str to str; {k!r}: {v!r} does not")
    if aliases:
        meta["weightport.aliases"] = json.dumps(aliases, sort_keys=True)
    return meta
