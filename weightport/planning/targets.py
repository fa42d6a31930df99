"""The target side of a plan: the module in scope and its tensors by state-dict name."""

from __future__ import annotations

import difflib
from itertools import chain, compress, repeat
from typing import Any, NamedTuple

import torch
from torch import nn

from weightport._fresh import BUFFER_INITS, recomputable
from weightport._init_record import built_by_init_empty
from weightport._tuples import rows
from weightport.errors import PlanError, TargetError
from weightport.planning.data import Target

__all__ = ["Materialise", "collect_targets", "left_on_meta", "scope_of", "state_tensors", "ties"]


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
            return _held_state(scope)
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


_EXTRA_STATE = "_extra_state"  # torch's key suffix of get_extra_state()


def _held_state(scope: nn.Module) -> dict[str, Any]:
    """``scope.state_dict(keep_vars=True)``, with the tensors the modules hold in place of tensors a
    state-dict hook made. A hook that saves a tensor as others made from it (torchtitan's
    ``FusedQKVLinear`` saves its ``wqkv`` parameter as ``wq``/``wk``/``wv``) names tensors that
    nothing loads into: those are left out, and the parameters and persistent buffers under the
    module that made them which the state dict lacks take the place of the first of them, under
    their own names. The target is the real parameter (``wqkv.weight``); a checkpoint in the hooked
    layout reaches it through the module's own loading hook (:mod:`weightport._hooks`)."""
    state = scope.state_dict(keep_vars=True)
    held: dict[int, tuple[str, torch.Tensor]] = {}
    for path, module in scope.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        skip = module._non_persistent_buffers_set
        for attr, t in chain(module._parameters.items(), module._buffers.items()):
            if t is not None and attr not in skip:
                held.setdefault(id(t), (prefix + attr, t))
    made = [
        n
        for n, t in state.items()
        if isinstance(t, torch.Tensor) and id(t) not in held and not n.endswith(_EXTRA_STATE)  # a module's own
    ]
    if not made:
        return state
    kept = {id(t) for t in state.values() if isinstance(t, torch.Tensor)}
    missing = [held[i] for i in held if i not in kept]
    paths = {p for p, _ in scope.named_modules()}
    at: dict[str, list[tuple[str, torch.Tensor]]] = {}  # a made name -> the held tensors in its place
    for name in made:
        segments = name.split(".")[:-1]
        while segments and ".".join(segments) not in paths:
            segments.pop()
        prefix = "".join(f"{s}." for s in segments)
        at[name] = [m for m in missing if m[0].startswith(prefix)]
        missing = [m for m in missing if not m[0].startswith(prefix)]
    out: dict[str, Any] = {}
    for name, t in state.items():
        if name in at:
            out.update(at[name])
        else:
            out[name] = t
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


class Materialise(NamedTuple):
    """Meta tensors of the whole model that no target in scope covers, by name in the model:
    ``fresh`` (parameters and persistent buffers outside ``into=``) are initialised as fresh
    tensors are, ``buffers`` (non-persistent ones, which no checkpoint holds) are recomputed by
    their modules."""

    fresh: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()


def left_on_meta(model: nn.Module, scope: nn.Module, into: str | None, modules: list[nn.Module]) -> Materialise:
    """What :class:`Materialise` lists for this model and scope.

    Raises:
        PlanError: a non-persistent meta buffer whose module cannot compute it.
    """
    outside = model is not scope and any(t.is_meta for t in chain(model.parameters(), model.buffers()))
    if not outside and not any(b is not None and b.is_meta for m in modules for b in m._buffers.values()):
        return Materialise()  # the common case, without naming every tensor
    prefix = f"{into}." if into else ""
    persistent = set(state_tensors(model))
    fresh = [
        n
        for n, t in chain(model.named_parameters(), model.named_buffers())
        if t.is_meta and n in persistent and not n.startswith(prefix)
    ]
    buffers = [n for n, b in model.named_buffers() if b.is_meta and n not in persistent]
    cannot = [n for n in buffers if not recomputable(model.get_submodule(n.rpartition(".")[0]))]
    if cannot:
        owner = type(model.get_submodule(cannot[0].rpartition(".")[0])).__name__
        fix = (
            "it computes them from a parameter's device in its constructor: build this model normally "
            f"(without init_empty), or give {owner} an init_non_persistent_buffers() method"
            if built_by_init_empty(model)
            else "build the model with weightport.init_empty(), which keeps buffers real, rather than "
            "under torch.device('meta'); or build it normally"
        )
        raise PlanError(
            f"non-persistent buffer(s) {', '.join(cannot[:5])} are on the meta device: no checkpoint holds "
            f"them and their module ({owner}) has no method that computes them ({', '.join(BUFFER_INITS)}); " + fix
        )
    return Materialise(tuple(fresh), tuple(buffers))


def ties(targets: dict[str, Target]) -> dict[str, list[str]]:
    """canonical name -> the other names of one tied tensor."""
    out: dict[str, list[str]] = {}
    for name, target in targets.items():
        if target.canonical != name:
            out.setdefault(target.canonical, []).append(name)
    return out
