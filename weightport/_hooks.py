"""Replaying modules' own ``_load_from_state_dict`` logic on names, before anything loads.

Some modules upgrade old checkpoints themselves: they override
``_load_from_state_dict`` (or register load-state-dict pre-hooks) and, depending on
the version recorded in the state dict's ``_metadata``, rename keys (torchvision's
``MLPBlock`` maps ``linear_1`` to ``0``), or add and drop entries. ``load_state_dict``
runs these; so must we. Each such module is replayed on a *meta shadow* with meta
stand-ins for the routed source tensors; the renames it performs (tracked by
object identity) become part of the plan. No data is read and the model is untouched.

A key such a module removes from the state dict without holding a tensor of that name is
*consumed*, as ``load_state_dict`` would consume it: torchvision's ``FrozenBatchNorm2d``
deletes ``num_batches_tracked``, which torch's strict load then does not call unexpected.
Replay marks it with :class:`HookConsumed`; the report lists it as consumed, not unused.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weightport.mapping.rules import Output, Rule

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class HookRename(Rule):
    """A rename performed by a module's own versioned loading hook."""

    module: str = ""
    version: Any = None

    @property
    def patterns(self) -> tuple[Any, ...]:
        return ()

    @property
    def text(self) -> str:
        return f"{self.module}._load_from_state_dict (checkpoint version {self.version})"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        return ()

    def inverse(self) -> None:
        return None


@dataclass(frozen=True, eq=False)
class HookConsumed(Rule):
    """A source key a module's own ``_load_from_state_dict`` (or pre-hook) removes: used, loads nothing."""

    module: str = ""
    path: str = ""

    @property
    def patterns(self) -> tuple[Any, ...]:
        return ()

    @property
    def text(self) -> str:
        return f"consumed by {self.module} {self.path!r}" if self.path else f"consumed by {self.module}"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        return ()

    def inverse(self) -> None:
        return None


Routed = tuple[str, Rule | None, Output]


def has_custom_loading(module: nn.Module) -> bool:
    return type(module)._load_from_state_dict is not nn.Module._load_from_state_dict or bool(
        module._load_state_dict_pre_hooks
    )


def replay(
    scope: nn.Module,
    routed: list[Routed],
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    metadata: Mapping[str, Any] | None,
    held: Container[str] = (),
) -> list[Routed]:
    """Return ``routed`` with the renames that modules' loading hooks would perform, and the keys
    they consume (removed, naming none of the ``held`` target tensors: parameters and persistent
    buffers by name in ``scope``) ruled by :class:`HookConsumed`.

    Only plain entries (no ops, not part of a fuse) are offered to hooks: those are the
    ones a plain ``load_state_dict`` would have seen.
    """
    modules = [(name, m) for name, m in scope.named_modules() if has_custom_loading(m)]
    if not modules:
        return routed
    for path, module in modules:
        prefix = f"{path}." if path else ""
        plain = {
            i: r for i, r in enumerate(routed) if r[2].target.startswith(prefix) and not r[2].ops and r[2].part is None
        }
        if not plain:
            continue
        specs = {i: (tuple(shapes[r[0]]), dtypes[r[0]]) for i, r in plain.items()}  # a failing read is an error
        try:
            markers = {i: torch.empty(shape, dtype=dtype, device="meta") for i, (shape, dtype) in specs.items()}
        except (RuntimeError, TypeError, ValueError, OverflowError) as e:  # a shape torch cannot represent
            log.debug("not replaying %s's loading hook: %s", type(module).__name__, e)
            continue
        state: dict[str, torch.Tensor] = {routed[i][2].target: markers[i] for i in plain}
        local = dict((metadata or {}).get(path, {}))
        try:
            meta_shadow(module)._load_from_state_dict(state, prefix, local, False, [], [], [])
        except Exception as e:  # noqa: BLE001 - third-party hooks; a failing replay must not block the plan
            log.debug("replaying %s's loading hook failed: %s", type(module).__name__, e)
            continue
        where = {id(t): k for k, t in state.items()}
        rule = HookRename(module=type(module).__name__, version=local.get("version"))
        consumed = HookConsumed(module=type(module).__name__, path=path)
        for i, marker in markers.items():
            new = where.get(id(marker))
            key, _old_rule, out = routed[i]
            if new is None and out.target not in held:
                routed[i] = (key, consumed, out)
            elif new is None:  # torch would leave that tensor missing; the plan still loads it
                log.debug("%s's loading hook removed %s", type(module).__name__, out.target)
            elif new != out.target:
                routed[i] = (key, rule, Output(new))
    return routed


def meta_shadow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta stand-ins."""
    shadow = copy.copy(module)
    shadow._parameters = {
        a: None if t is None else nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        for a, t in module._parameters.items()
    }
    shadow._buffers = {a: None if t is None else torch.empty_like(t, device="meta") for a, t in module._buffers.items()}
    shadow._modules = {n: meta_shadow(c) for n, c in module._modules.items() if c is not None}
    return shadow
