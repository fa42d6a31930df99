"""Optimizer state that follows each parameter to its new name.

At save time the checkpoint records, for every optimizer parameter index, the
names that parameter has in the model. At resume the model transfer decides,
for every target tensor, which source tensor(s) fed it; the optimizer state of
those sources is carried to the target parameter, put through the same
rearranging ops (split, fuse, transpose, permute, reshape, select, narrow) so a
momentum buffer stays aligned with its weight. A parameter whose value was
changed by an adapter (new channels, interpolated positions), that has no source,
or whose source had no state starts with fresh optimizer state, and
:class:`OptimizerReport` says why.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from weightport.checkpoint._format import CheckpointFile
from weightport.checkpoint._save import names_by_id, type_name
from weightport.checkpoint._tree import decode
from weightport.errors import CheckpointError
from weightport.planning.data import TransferPlan, evaluate
from weightport.report import group_names

# Ops that only move elements around: elementwise optimizer state can follow them exactly.
REARRANGING_OPS = frozenset({"split", "transpose", "permute", "reshape", "select", "narrow", "cast"})


@dataclass(frozen=True)
class OptimizerReport:
    """Where each parameter's optimizer state came from on resume.

    Attributes:
        type: The optimizer class.
        carried: Target parameter name -> source parameter name(s) whose state it took.
        fresh: Target parameter name -> why it starts with fresh state.
        groups: For each parameter group: the saved group whose hyper-parameters (lr,
            weight decay, betas …) it took, or ``None`` when it kept its own.
    """

    type: str
    carried: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)
    groups: tuple[int | None, ...] = ()

    def summary(self) -> str:
        name = self.type.rpartition(".")[2]
        line = f"optimizer {name}: state carried for {len(self.carried)} parameters, fresh for {len(self.fresh)}"
        by_reason: dict[str, list[str]] = {}
        for target, reason in self.fresh.items():
            by_reason.setdefault(reason, []).append(target)
        details = [f"fresh ({reason}): {', '.join(group_names(names)[:12])}" for reason, names in by_reason.items()]
        renamed = [f"{t} <- {s}" for t, s in self.carried.items() if t != s]
        if renamed:
            details.append(f"renamed: {', '.join(renamed[:6])}" + (" …" if len(renamed) > 6 else ""))
        return "\n".join([line, *details])

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "carried": dict(self.carried),
            "fresh": dict(self.fresh),
            "groups": list(self.groups),
        }


_MISSING = object()
_NO_SOURCE = {
    "missing": "no source tensor in the checkpoint",
    "shape mismatch": "its source tensor has another shape",
    "dropped": "its source tensor was dropped by a rule",
}


@dataclass(frozen=True)
class _Stored:
    """A tensor of the checkpoint, not read yet."""

    key: str


@dataclass
class _Context:
    ckpt: CheckpointFile
    plan: TransferPlan
    saved: dict[str, Any]
    name_to_index: dict[str, int]
    saved_names: list[list[str]]
    device: torch.device | None


def prepare(
    ckpt: CheckpointFile,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    plan: TransferPlan,
    device: torch.device | None,
) -> tuple[dict[str, Any], OptimizerReport]:
    """The state dict to give ``optimizer.load_state_dict`` after the model transfer, and its report.

    Reads the carried state tensors now, onto the device and dtype each parameter will have,
    so that loading it later cannot fail.
    """
    part = ckpt.body["optimizer"]
    saved = decode(part.get("state_dict"), _Stored, ckpt.path)
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        raise CheckpointError(f"{ckpt.path}: the saved optimizer state has no param_groups; the file is damaged")
    saved.setdefault("state", {})
    saved_names = [list(n) for n in part.get("param_names", [])]
    ctx = _Context(ckpt, plan, saved, {n: i for i, names in enumerate(saved_names) for n in names}, saved_names, device)
    state, carried, fresh, sources = _carry_all(ctx, optimizer, model)
    current = optimizer.state_dict()
    groups, chosen = _groups(current["param_groups"], saved["param_groups"], sources)
    others = {k: _materialize(ctx, v) for k, v in saved.items() if k not in ("state", "param_groups")}
    report = OptimizerReport(type_name(optimizer), carried, fresh, tuple(chosen))
    return {**others, "state": state, "param_groups": groups}, report


def check_loadable(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Run ``optimizer.load_state_dict`` on a shell of the optimizer (its parameter groups, empty state,
    no hooks) with every state tensor replaced by a one-element stand-in: it raises where the real
    load would (a group that does not match, a step count ``__setstate__`` cannot read), at no
    memory cost, without touching the optimizer. An optimizer class with its own ``load_state_dict``
    (a sharded one may talk to other ranks) is not run twice: torch's rules are not known for it."""
    if getattr(type(optimizer), "load_state_dict", None) is not torch.optim.Optimizer.load_state_dict:
        return
    shell = object.__new__(type(optimizer))
    shell.__dict__.update(optimizer.__dict__)
    shell.__dict__.update(
        param_groups=[dict(g) for g in optimizer.param_groups],
        state=collections.defaultdict(dict),
        defaults=dict(optimizer.defaults),
        _optimizer_load_state_dict_pre_hooks=collections.OrderedDict(),
        _optimizer_load_state_dict_post_hooks=collections.OrderedDict(),
    )
    shell.load_state_dict({**state_dict, "state": _stand_ins(state_dict.get("state", {}))})


def _stand_ins(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros((), dtype=value.dtype, device=value.device)
    if isinstance(value, dict):
        return {k: _stand_ins(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_stand_ins(v) for v in value)
    return value


def _carry_all(
    ctx: _Context, optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[int, dict[str, Any]], dict[str, str], dict[str, str], dict[int, list[int]]]:
    """Per optimizer parameter (by state-dict index): its carried state, or why it starts fresh."""
    names = names_by_id(model)
    state: dict[int, dict[str, Any]] = {}
    carried: dict[str, str] = {}
    fresh: dict[str, str] = {}
    sources: dict[int, list[int]] = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, p in enumerate(params):
        label = names[id(p)][0] if id(p) in names else f"<optimizer parameter {index}, not in the model>"
        result = _carry(ctx, index, p, names.get(id(p), []))
        if isinstance(result, str):
            fresh[label] = result
            continue
        state[index], sources[index], carried[label] = result
    return state, carried, fresh, sources


def rebinder(optimizer: torch.optim.Optimizer, model: nn.Module) -> Callable[[], str | None]:
    """A callable to run after the model transfer: where the transfer had to replace a parameter object
    (it keeps identity when it can; not when something holds a weak reference to the parameter),
    the optimizer is pointed at the model's new parameter, so it never trains a stale one."""
    names = names_by_id(model)
    before = [[names.get(id(p), [None])[0] for p in g["params"]] for g in optimizer.param_groups]

    def rebind() -> str | None:
        now = dict(model.named_parameters(remove_duplicate=False))
        moved = 0
        for group, names_then in zip(optimizer.param_groups, before):
            for i, name in enumerate(names_then):
                if name is not None and now.get(name) is not None and group["params"][i] is not now[name]:
                    group["params"][i] = now[name]
                    moved += 1
        return f"optimizer re-pointed at {moved} replaced model parameters" if moved else None

    return rebind


def _carry(
    ctx: _Context, index: int, param: torch.Tensor, names: list[str]
) -> tuple[dict[str, Any], list[int], str] | str:
    """The carried state of one parameter, or the reason it starts fresh."""
    if not names:
        return _carry_unnamed(ctx, index, param)
    name = next((n for n in names if n in ctx.plan.targets), None)
    if name is None:
        return "not in the transferred model"
    canonical = ctx.plan.targets[name].canonical
    recipe = ctx.plan.recipes.get(canonical)
    if recipe is None:
        return _NO_SOURCE.get(ctx.plan.report[canonical].reason or "missing", "no source tensor")
    blocked = [op.label() for op in recipe.ops if op.fn is not None or op.op not in REARRANGING_OPS]
    if blocked:
        return f"adapted by {', '.join(blocked)}; optimizer state does not follow a change of values"
    indices = [ctx.name_to_index.get(i.key) for i in recipe.inputs]
    if None in indices:
        missing = [i.key for i, x in zip(recipe.inputs, indices) if x is None]
        return f"source {', '.join(missing)} was not optimized when saved"
    states = [ctx.saved["state"].get(i) for i in indices]
    if any(not s for s in states):
        return "no saved state (its source had not been stepped)"
    built = _through_recipe(ctx, recipe, states, param)  # type: ignore[arg-type]
    if isinstance(built, str):
        return built
    return built, [i for i in indices if i is not None], " + ".join(i.key for i in recipe.inputs)


def _carry_unnamed(ctx: _Context, index: int, param: torch.Tensor) -> tuple[dict[str, Any], list[int], str] | str:
    """A parameter outside the model: carried by position when the saved one was outside it too."""
    if index >= len(ctx.saved_names) or ctx.saved_names[index]:
        return "not in the model, and no unnamed saved parameter at its position"
    state = ctx.saved["state"].get(index)
    if not state:
        return "no saved state"
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, _Stored):
            shape = tuple(ctx.ckpt.source.meta(value.key).shape)
            if shape not in ((), tuple(param.shape)):
                return f"saved state {key!r} has shape {shape}, the parameter {tuple(param.shape)}"
            out[key] = _read(ctx, value.key, param, key)
        else:
            out[key] = _materialize(ctx, value)
    return out, [index], f"<optimizer parameter {index}>"


def _through_recipe(
    ctx: _Context, recipe: Any, states: Sequence[dict[str, Any]], param: torch.Tensor
) -> dict[str, Any] | str:
    """Each state entry of the source(s), rearranged like the weight itself."""
    shapes = [tuple(ctx.plan.source.meta(i.key).shape) for i in recipe.inputs]
    out: dict[str, Any] = {}
    for key in states[0]:
        values = [s.get(key, _MISSING) for s in states]
        stored = [isinstance(v, _Stored) for v in values]
        if any(v is _MISSING for v in values) or (any(stored) and not all(stored)):
            return f"its sources disagree on optimizer state {key!r}"
        value = _entry(ctx, recipe, key, values, shapes, param) if all(stored) else _same(ctx, key, values)
        if isinstance(value, str):
            return value
        out[key] = value[0]
    return out


def _entry(
    ctx: _Context, recipe: Any, key: str, values: list[Any], shapes: list[tuple[int, ...]], param: torch.Tensor
) -> tuple[torch.Tensor] | str:
    """One tensor state entry: through the recipe when it is shaped like the weight, else copied
    (scalars such as step counts, or any state of a plainly renamed parameter)."""
    stored = [tuple(ctx.ckpt.source.meta(v.key).shape) for v in values]
    if stored == shapes:
        views = {i.key: ctx.ckpt.source.view(v.key) for i, v in zip(recipe.inputs, values)}
        value = evaluate(recipe, views.__getitem__, param)
        placed = _place(value, param, key, ctx.device)
        for v in values:
            ctx.ckpt.source.release(v.key)  # the copy is made: let the file's pages go
        return (placed,)
    if not recipe.plain and any(s != () for s in stored):
        return f"optimizer state {key!r} of shape {stored[0]} cannot follow {', '.join(recipe.labels())}"
    tensors = [ctx.ckpt.tensor(v.key) for v in values]
    if any(t.shape != tensors[0].shape or not torch.equal(t, tensors[0]) for t in tensors[1:]):
        return f"its sources have different optimizer state {key!r}"
    return (_place(tensors[0], param, key, ctx.device),)


def _same(ctx: _Context, key: str, values: list[Any]) -> tuple[Any] | str:
    plain = [_materialize(ctx, v) for v in values]
    try:
        differ = any(bool(v != plain[0]) for v in plain[1:])
    except RuntimeError:  # containers of tensors: not comparable with ==
        differ = True
    if differ:
        return f"its sources have different optimizer state {key!r}"
    return (plain[0],)


def _place(value: torch.Tensor, param: torch.Tensor, key: str, device: torch.device | None) -> torch.Tensor:
    """Where torch's own ``load_state_dict`` would put it, computed for the parameter's final place."""
    if key == "step":  # torch keeps step counts where they were saved (CPU) unless capturable/fused
        return value.to(device="cpu", copy=True)
    target_device = device or (torch.device("cpu") if param.is_meta else param.device)
    dtype = param.dtype if param.is_floating_point() and value.is_floating_point() else value.dtype
    return value.to(device=target_device, dtype=dtype, copy=True)


def _read(ctx: _Context, stored_key: str, param: torch.Tensor, key: str) -> torch.Tensor:
    placed = _place(ctx.ckpt.source.view(stored_key), param, key, ctx.device)
    ctx.ckpt.source.release(stored_key)
    return placed


def _materialize(ctx: _Context, value: Any) -> Any:
    """Replace unread tensors by CPU copies throughout a decoded tree."""
    if isinstance(value, _Stored):
        return ctx.ckpt.tensor(value.key)
    if isinstance(value, dict):
        return {k: _materialize(ctx, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(ctx, v) for v in value)
    return value


def _groups(
    current: list[dict[str, Any]], saved: list[dict[str, Any]], sources: dict[int, list[int]]
) -> tuple[list[dict[str, Any]], list[int | None]]:
    """Hyper-parameters per group: by position when the group counts agree (torch's rule), else from
    the saved group most of the group's carried parameters came from."""
    saved_group_of = {i: g for g, group in enumerate(saved) for i in group.get("params", [])}
    groups: list[dict[str, Any]] = []
    chosen: list[int | None] = []
    for position, group in enumerate(current):
        if len(current) == len(saved):
            choice: int | None = position
        else:
            votes = collections.Counter(
                saved_group_of[i] for p in group["params"] for i in sources.get(p, []) if i in saved_group_of
            )
            choice = votes.most_common(1)[0][0] if votes else None
        hyper = (
            {k: v for k, v in saved[choice].items() if k not in ("params", "param_names")} if choice is not None else {}
        )
        groups.append({**group, **hyper, "params": group["params"]})
        chosen.append(choice)
    return groups, chosen
