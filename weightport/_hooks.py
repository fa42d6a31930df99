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

import logging
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weightport.errors import OpError
from weightport.mapping.ops import OpCall
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


@dataclass(frozen=True, eq=False)
class HookFuse(Rule):
    """Several source keys a module's own loading hook merges into one of its tensors (torchtitan's
    ``FusedQKVLinear`` merges ``wq``/``wk``/``wv`` into its ``wqkv`` parameter). The recipe
    concatenates the parts along dim 0 and :attr:`post` gives them to the hook (:class:`HookCall`)."""

    module: str = ""
    path: str = ""
    target: str = ""
    post: tuple[OpCall, ...] = ()

    @property
    def patterns(self) -> tuple[Any, ...]:
        return ()

    @property
    def text(self) -> str:
        where = f" at {self.path!r}" if self.path else ""
        return f"{self.module}'s loading hook{where} merges into {self.target!r}"

    def outputs(self, index: int, captures: dict[str, str]) -> tuple[Output, ...]:
        return ()

    def inverse(self) -> None:
        return None


@dataclass(frozen=True, eq=False)
class HookCall(OpCall):
    """The op behind :class:`HookFuse`: the parts, concatenated along dim 0, cut apart again and
    given by name to the module's own loading code, on a meta shadow of the module (so the model
    is untouched); the value is what the hook put under ``name``. The same call infers the shape
    on meta tensors while planning and computes the values while applying. It only re-lays out
    the source's values as ``load_state_dict`` would: exact."""

    module: nn.Module | None = None
    prefix: str = ""
    name: str = ""
    parts: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (key under the module, shape) in order
    local: Mapping[str, Any] | None = None

    @property
    def spec(self) -> None:
        return None

    @property
    def exact(self) -> bool:
        return True

    def label(self) -> str:
        return f"{type(self.module).__name__} loading hook"

    def inverse(self) -> None:
        return None

    def run(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        assert self.module is not None
        sizes = [_rows(shape, x) for _, shape in self.parts]
        pieces = x.split(sizes, 0)
        state = {k: p.reshape(shape) for (k, shape), p in zip(self.parts, pieces)}
        try:
            load_into_shadow(self.module, state, self.prefix, self.local)
        except Exception as e:  # third-party hooks: any failure is an op failure
            raise OpError(f"{self.label()} failed on {', '.join(k for k, _ in self.parts)}: {e}") from e
        out = state.get(self.name)
        if not isinstance(out, torch.Tensor):
            raise OpError(f"{self.label()} did not make {self.name!r} from {', '.join(k for k, _ in self.parts)}")
        return out


def _rows(shape: tuple[int, ...], x: torch.Tensor) -> int:
    """The rows of ``x`` one part of ``shape`` takes (the parts are flattened when their trailing
    dimensions differ)."""
    n = 1
    for d in shape if x.dim() == 1 else shape[:1]:
        n *= d
    return n


Routed = tuple[str, Rule | None, Output]


def has_custom_loading(module: nn.Module) -> bool:
    return type(module)._load_from_state_dict is not nn.Module._load_from_state_dict or bool(
        module._load_state_dict_pre_hooks
    )


def load_into_shadow(module: nn.Module, state: dict[str, Any], prefix: str, local: Mapping[str, Any] | None) -> None:
    """Run ``module``'s own ``_load_from_state_dict`` (its pre-hooks included) on a meta shadow of
    it: ``state`` changes as ``load_state_dict`` would change it; the module does not."""
    local = {**(local or {}), "assign_to_params_buffers": True}  # the shadow takes tensors as they are
    meta_shadow(module)._load_from_state_dict(state, prefix, local, False, [], [], [])


def replay(
    scope: nn.Module,
    routed: list[Routed],
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    metadata: Mapping[str, Any] | None,
    held: Container[str] = (),
) -> list[Routed]:
    """Return ``routed`` with what modules' loading hooks would do to the names: the renames they
    perform, the tensors they merge from several keys into one of the ``held`` target tensors
    (parameters and persistent buffers by name in ``scope``: :class:`HookFuse`), and the keys they
    consume (removed, naming no held tensor and merged into none) ruled by :class:`HookConsumed`.

    Entries that are not part of a fuse are offered to the hooks, as the tensors their ops make
    (a mapping's ``rope_permute`` before torchtitan's merge): those are what a plain
    ``load_state_dict`` of the mapped state dict would have seen.
    """
    modules = [(name, m) for name, m in scope.named_modules() if has_custom_loading(m)]
    if not modules:
        return routed
    for path, module in modules:
        prefix = f"{path}." if path else ""
        offered = {
            i: r
            for i, r in enumerate(routed)
            if r[2].target.startswith(prefix) and r[2].part is None and _offerable(r[2])
        }
        if not offered:
            continue
        specs = {i: (tuple(shapes[r[0]]), dtypes[r[0]]) for i, r in offered.items()}  # a failing read is an error
        try:
            markers = {i: _marker(specs[i], r[2].ops) for i, r in offered.items()}
        except (RuntimeError, TypeError, ValueError, OverflowError, OpError) as e:  # torch cannot represent it
            log.debug("not replaying %s's loading hook: %s", type(module).__name__, e)
            continue
        local = dict((metadata or {}).get(path, {}))
        names = {i: routed[i][2].target for i in offered}
        state = _run(module, {names[i]: markers[i] for i in offered}, prefix, local)
        if state is None:
            continue
        ops = {i: routed[i][2].ops for i in offered}
        fused = _merged(module, markers, names, ops, state, prefix, local, held)
        where = {id(t): k for k, t in state.items()}
        rule = HookRename(module=type(module).__name__, version=local.get("version"))
        consumed = HookConsumed(module=type(module).__name__, path=path)
        for i, marker in markers.items():
            key, _old_rule, out = routed[i]
            new = where.get(id(marker))
            if i in fused:
                routed[i] = (key, fused[i][0], fused[i][1])
            elif new is None and out.target not in held:
                routed[i] = (key, consumed, out)
            elif new is None:  # torch would leave that tensor missing; the plan still loads it
                log.debug("%s's loading hook removed %s", type(module).__name__, out.target)
            elif new != out.target:
                routed[i] = (key, rule, Output(new, out.ops))
    return routed


def _offerable(out: Output) -> bool:
    """An entry whose tensor can be made on meta without the target: no op needs one."""
    return all(op.fn is None and op.target_use == "none" for op in out.ops)


def _marker(spec: tuple[tuple[int, ...], torch.dtype], ops: tuple[OpCall, ...]) -> torch.Tensor:
    """A meta stand-in for a routed tensor of ``spec`` (shape, dtype) once its ``ops`` ran."""
    x = torch.empty(spec[0], dtype=spec[1], device="meta")
    for op in ops:
        x = op.run(x)
    return x


def _run(module: nn.Module, state: dict[str, Any], prefix: str, local: Mapping[str, Any]) -> dict[str, Any] | None:
    """``state`` as ``module``'s loading code leaves it, or ``None`` when that code fails."""
    try:
        load_into_shadow(module, state, prefix, local)
    except Exception as e:  # noqa: BLE001 - third-party hooks; a failing replay must not block the plan
        log.debug("replaying %s's loading hook failed: %s", type(module).__name__, e)
        return None
    return state


def _merged(
    module: nn.Module,
    markers: dict[int, torch.Tensor],
    names: dict[int, str],
    ops: dict[int, tuple[OpCall, ...]],
    state: dict[str, Any],
    prefix: str,
    local: Mapping[str, Any],
    held: Container[str],
) -> dict[int, tuple[Rule, Output]]:
    """The entries the loading code merges into held tensors it makes, each with its
    :class:`HookFuse` rule and part. Which keys feed which made tensor is found by leaving each
    removed key out in turn: the tensors that then are not made (or differ in shape) need it."""
    ids = {id(m) for m in markers.values()}
    made = {
        k: tuple(t.shape) for k, t in state.items() if k in held and isinstance(t, torch.Tensor) and id(t) not in ids
    }
    if not made:
        return {}
    kept = {id(t) for t in state.values()}
    removed = [i for i, m in markers.items() if id(m) not in kept]
    feeds: dict[str, list[int]] = {k: [] for k in made}
    for i in removed:
        without = _run(module, {names[j]: markers[j] for j in markers if j != i}, prefix, local)
        for k, shape in made.items():
            t = None if without is None else without.get(k)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                feeds[k].append(i)
    out: dict[int, tuple[Rule, Output]] = {}
    for k, parts in feeds.items():
        if not parts or any(i in out for i in parts):
            continue
        shapes = [tuple(markers[i].shape) for i in parts]
        flat = len({s[1:] for s in shapes}) > 1  # trailing dimensions differ: concatenate flattened
        call = HookCall(
            "load_hook",
            module=module,
            prefix=prefix,
            name=k,
            parts=tuple((names[i], s) for i, s in zip(parts, shapes)),
            local=local,
        )
        rule = HookFuse(module=type(module).__name__, path=prefix[:-1], target=k, post=(call,))
        flatten = (OpCall("reshape", {"shape": [-1]}),) if flat else ()
        for n, i in enumerate(parts):
            out[i] = (rule, Output(k, ops[i] + flatten, (n, len(parts)), 0))
    return out


def shallow_copy(module: nn.Module) -> nn.Module:
    """``copy.copy(module)`` for any module: the same class and attributes. (FSDP2's classes pickle
    as the class they wrap, which ``copy.copy`` would call with no arguments.)"""
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    return clone


def meta_shadow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta stand-ins."""
    shadow = shallow_copy(module)
    shadow._parameters = {
        a: None if t is None else nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        for a, t in module._parameters.items()
    }
    shadow._buffers = {a: None if t is None else torch.empty_like(t, device="meta") for a, t in module._buffers.items()}
    shadow._modules = {n: meta_shadow(c) for n, c in module._modules.items() if c is not None}
    return shadow
