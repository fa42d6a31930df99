"""Values for the meta tensors of a meta-built target that load nothing, made on the side so the
model is untouched until the commit:

* parameters as an eager build gives them: the constructor's own initialisation calls, recorded
  by :func:`weightport.init_empty` (:mod:`weightport._init_record`), replayed; failing that the
  module's ``reset_parameters`` on a shadow copy; failing that zeros, with a note.
* non-persistent buffers a constructor computed from a parameter's device (timm Swin's
  ``attn_mask``): recomputed by the module's own buffer initialiser on a real shadow copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from weightport._hooks import meta_shadow, shallow_copy
from weightport._init_record import Record, record_of, replay
from weightport.errors import PlanError

Place = Callable[[torch.Tensor], tuple[torch.dtype, torch.device]]  # the dtype and device a tensor ends with

__all__ = ["BUFFER_INITS", "fresh_values", "recomputable", "recompute_buffers"]

# methods that (re)compute a module's non-persistent buffers, most specific first (timm's names, then
# the one every torch module may have)
BUFFER_INITS = ("init_non_persistent_buffers", "_init_buffers", "reset_parameters")


def fresh_values(scope: nn.Module, names: list[str], place: Place, notes: list[str]) -> dict[str, torch.Tensor]:
    """Initialise the meta tensors ``names`` (of ``scope``) as an eager build would: recorded
    constructor calls replayed, else the module's own ``reset_parameters`` on a shadow copy;
    modules without one give zeros and a note."""
    out: dict[str, torch.Tensor] = {}
    rest: list[str] = []
    for name in names:
        path, _, attr = name.rpartition(".")
        module = scope.get_submodule(path) if path else scope
        t = module._parameters.get(attr)
        rec = record_of(module, attr, t) if t is not None else None
        replayed = _replayed(rec, t, place) if t is not None and rec is not None and rec.replayable else None
        if replayed is not None:
            out[name] = replayed
        else:
            rest.append(name)
    for module, shadow, members in _shadows(scope, rest, place, deep=False):
        init = getattr(shadow, "reset_parameters", None) or getattr(shadow, "_reset_parameters", None)
        if callable(init):
            with torch.no_grad():
                init()
        else:
            path = members[0].rpartition(".")[0]
            notes.append(
                f"{path or 'the model'} ({type(module).__name__}) has no reset_parameters(): "
                f"{', '.join(members)} initialised to zeros"
            )
        out.update(_read(shadow, members, "it is not a direct parameter or buffer of its module"))
    return out


def _replayed(rec: Record, t: torch.Tensor, place: Place) -> torch.Tensor | None:
    """The recorded initialisation replayed, or ``None`` when a recorded call fails on real data
    (the constructor's own call was recorded, not run: see :mod:`weightport._init_record`)."""
    dtype, device = place(t)
    try:
        return replay(rec, t, dtype, device)
    except Exception:  # noqa: BLE001 - any failure of a third-party init function: use the fallback
        return None


def recomputable(module: nn.Module) -> bool:
    """Whether ``module`` has a method that computes its buffers (:data:`BUFFER_INITS`)."""
    return any(callable(getattr(module, m, None)) for m in BUFFER_INITS)


def recompute_buffers(root: nn.Module, names: list[str], place: Place) -> dict[str, torch.Tensor]:
    """The non-persistent meta buffers ``names`` (of ``root``) computed by their modules' own buffer
    initialiser, run on a copy of the module and its children whose tensors are real (the
    computation needs their device and dtype, and maybe other buffers' values)."""
    out: dict[str, torch.Tensor] = {}
    for module, shadow, members in _shadows(root, names, place, deep=True):
        init = next(getattr(shadow, m) for m in BUFFER_INITS if callable(getattr(shadow, m, None)))
        with torch.no_grad():
            init()
        out.update(_read(shadow, members, f"{type(module).__name__}.{init.__name__}() did not give it a value"))
    return out


def _shadows(
    root: nn.Module, names: list[str], place: Place, *, deep: bool
) -> Iterator[tuple[nn.Module, nn.Module, list[str]]]:
    """``(module, its shadow, the names it owns)`` for the modules owning ``names``."""
    by_module: dict[str, list[str]] = {}
    for name in names:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    for path, members in by_module.items():
        module = root.get_submodule(path) if path else root
        yield module, _shadow(module, place, deep=deep), members


def _read(shadow: nn.Module, members: list[str], why: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in members:
        attr = name.rpartition(".")[2]
        value: torch.Tensor | None = shadow._parameters.get(attr)
        if value is None:
            value = shadow._buffers.get(attr)
        if value is None or value.is_meta:
            raise PlanError(
                f"cannot materialise {name!r}: {why}; build the model normally (without init_empty or "
                "torch.device('meta'))"
            )
        out[name] = value.detach()
    return out


def _shadow(module: nn.Module, place: Place, *, deep: bool) -> nn.Module:
    """A copy of ``module`` for an initialiser to run on without touching the model: its meta
    tensors are real zeros (in the dtype and on the device each ends with). Its other tensors are
    meta stand-ins and its children meta shadows, or with ``deep`` real copies and real shadows
    (an initialiser that reads a child parameter's device, as timm Swin's ``_init_buffers``)."""
    shadow = shallow_copy(module)
    children = module._modules.items()
    shadow.__dict__["_modules"] = {
        n: _shadow(c, place, deep=True) if deep else meta_shadow(c) for n, c in children if c is not None
    }
    for kind in ("_parameters", "_buffers"):
        tensors: dict[str, torch.Tensor | None] = {}
        for attr, t in getattr(module, kind).items():
            if t is None:
                tensors[attr] = None
                continue
            dtype, device = place(t)
            if t.is_meta:
                real = torch.zeros(t.shape, dtype=dtype, device=device)
            else:
                real = t.detach().clone() if deep else torch.empty_like(t, device="meta")
            tensors[attr] = nn.Parameter(real, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else real
        shadow.__dict__[kind] = tensors
    return shadow
