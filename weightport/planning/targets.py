"""The target side of a plan: the module in scope and its tensors by state-dict name."""

from __future__ import annotations

import difflib
from itertools import compress, repeat
from typing import Any

import torch
from torch import nn

from weightport._tuples import rows
from weightport.errors import PlanError, TargetError
from weightport.planning.data import Target

__all__ = ["check_meta_buffers", "collect_targets", "scope_of", "state_tensors", "ties"]


def scope_of(model: nn.Module, into: str | None) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TargetError(f"the target must be an nn.Module, not {type(model).__name__}")
    if not into:
        return model
    try:
        return model.get_submodule(into)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(into, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise TargetError(f"into={into!r}: the model has no submodule of that name{hint}") from None


def state_tensors(scope: nn.Module) -> dict[str, Any]:
    """``scope.state_dict(keep_vars=True)``, without its per-module calls where no module changes
    what it would give: no module overrides ``state_dict``, ``_save_to_state_dict`` or
    ``get_extra_state``, nor has a state-dict hook (about half the cost on a model of many small
    modules). Anything else takes ``state_dict`` itself."""
    plain: dict[type, bool] = {}
    out: dict[str, Any] = {}
    stack: list[tuple[str, nn.Module]] = [("", scope)]
    pop, push = stack.pop, stack.extend
    while stack:
        prefix, module = pop()
        kind = type(module)
        ok = plain.get(kind)
        if ok is None:
            ok = plain[kind] = (
                kind.state_dict is nn.Module.state_dict
                and kind._save_to_state_dict is nn.Module._save_to_state_dict
                and getattr(kind, "get_extra_state", nn.Module.get_extra_state) is nn.Module.get_extra_state
            )
        if not ok or module._state_dict_hooks or module._state_dict_pre_hooks:
            return scope.state_dict(keep_vars=True)
        for name, param in module._parameters.items():
            if param is not None:
                out[prefix + name] = param
        if module._buffers:
            skip = module._non_persistent_buffers_set
            for name, buf in module._buffers.items():
                if buf is not None and name not in skip:
                    out[prefix + name] = buf
        if module._modules:  # children in order: pushed last to first
            push((f"{prefix}{name}.", child) for name, child in reversed(module._modules.items()) if child is not None)
    return out


def collect_targets(scope: nn.Module) -> dict[str, Target]:
    """Parameters and persistent buffers by state-dict name, tied names grouped."""
    state = state_tensors(scope)
    names, tensors = list(state), list(state.values())
    # isinstance(t, torch.Tensor) goes through torch's metaclass: test the few distinct types instead
    types = list(map(type, tensors))
    if not all(issubclass(k, torch.Tensor) for k in set(types)):  # _extra_state and the like
        keep = [issubclass(k, torch.Tensor) for k in types]
        names, tensors = list(compress(names, keep)), list(compress(tensors, keep))
    ids = list(map(id, tensors))
    if len(set(ids)) == len(ids):  # nothing tied: every name is its own canonical name
        canonical: list[str] = names
    else:
        first: dict[int, str] = {}
        canonical = [first.setdefault(i, n) for i, n in zip(ids, names)]
    parameters = map(isinstance, tensors, repeat(nn.Parameter))  # fast for exact Parameters
    return dict(zip(names, rows(Target, names, tensors, parameters, canonical)))


def check_meta_buffers(scope: nn.Module, modules: list[nn.Module], targets: dict[str, Target]) -> None:
    """Refuse non-persistent buffers left on meta: no checkpoint holds them."""
    if not any(b is not None and b.is_meta for m in modules for b in m._buffers.values()):
        return  # the common case, without naming every buffer
    lost = [n for n, b in scope.named_buffers() if b.is_meta and n not in targets]
    if lost:
        raise PlanError(
            f"non-persistent buffer(s) {', '.join(lost[:5])} are on the meta device: no checkpoint holds "
            "them and their values cannot be recomputed. Build the model with weightport.init_empty() "
            "(parameters on meta, buffers real) instead of torch.device('meta')"
        )


def ties(targets: dict[str, Target]) -> dict[str, list[str]]:
    """canonical name -> the other names of one tied tensor."""
    out: dict[str, list[str]] = {}
    for name, target in targets.items():
        if target.canonical != name:
            out.setdefault(target.canonical, []).append(name)
    return out
