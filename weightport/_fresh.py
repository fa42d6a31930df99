"""Values for the fresh tensors of a meta-built target: each module's own ``reset_parameters``,
run on a shadow copy so the model is untouched until the commit."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from weightport._hooks import meta_shadow
from weightport.errors import PlanError

Place = Callable[[torch.Tensor], tuple[torch.dtype, torch.device]]  # the dtype and device a tensor ends with

__all__ = ["fresh_values"]


def fresh_values(scope: nn.Module, names: list[str], place: Place, notes: list[str]) -> dict[str, torch.Tensor]:
    """Initialise the meta tensors ``names`` (of ``scope``) by their modules' own ``reset_parameters``,
    on a shadow copy; modules without one give zeros and a note."""
    by_module: dict[str, list[str]] = {}
    for name in names:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, members in by_module.items():
        module = scope.get_submodule(path) if path else scope
        shadow = _shadow(module, place)
        init = getattr(shadow, "reset_parameters", None) or getattr(shadow, "_reset_parameters", None)
        if callable(init):
            with torch.no_grad():
                init()
        else:
            notes.append(
                f"{path or 'the model'} ({type(module).__name__}) has no reset_parameters(): "
                f"{', '.join(members)} initialised to zeros"
            )
        for name in members:
            attr = name.rpartition(".")[2]
            value: torch.Tensor | None = shadow._parameters.get(attr)
            if value is None:
                value = shadow._buffers.get(attr)
            if value is None or value.is_meta:
                raise PlanError(
                    f"cannot materialise {name!r}: it is not a direct parameter or buffer "
                    "of its module; build the model normally instead of on meta"
                )
            out[name] = value.detach()
    return out


def _shadow(module: nn.Module, place: Place) -> nn.Module:
    """A copy of ``module`` whose own meta tensors are real (zeros) and whose other tensors
    are meta stand-ins, so ``reset_parameters`` can run without touching the model."""
    shadow = copy.copy(module)
    shadow._parameters = {}
    shadow._buffers = {}
    shadow._modules = {n: meta_shadow(c) for n, c in module._modules.items() if c is not None}
    for kind in ("_parameters", "_buffers"):
        for attr, t in getattr(module, kind).items():
            if t is None:
                getattr(shadow, kind)[attr] = None
                continue
            dtype, device = place(t)
            if t.is_meta:
                real = torch.zeros(t.shape, dtype=dtype, device=device)
            else:
                real = torch.empty_like(t, device="meta")
            getattr(shadow, kind)[attr] = (
                nn.Parameter(real, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else real
            )
    return shadow
