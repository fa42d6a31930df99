"""Module-level parity: the activations of corresponding modules of source and target, compared.

A final output can hide a mistake: in a deep random network an early swapped bias may change the
last layer by 1e-7. So :func:`compare_modules` hooks every pair of *corresponding* modules and
compares what each computes. Correspondence comes from the mapping's tensor names: a source module
``a.b`` whose tensors (``a.b.weight``, ``a.b.bias`` …) all go to target module ``x.y``, which gets
tensors from no other source module, corresponds to it (fused or split modules have no single
partner and are left out, and so is a module whose tensors go through an op that reorders its
outputs, a rotary permutation or a ``select``, and an embedding that computes more than its lookup,
such as Gemma's, which scales, paired with a plain one whose model scales elsewhere). A module is
compared as its output and as the inputs of its parameter-free children (timm's ``BatchNormAct2d``
applies its activation inside: its ``act`` child's input is the plain BatchNorm output torchvision's
``BatchNorm2d`` gives).

Memory is bounded: at most :data:`MAX_MODULES` pairs (evenly sampled beyond that) and at most
:data:`MAX_ELEMENTS` values kept per activation (a strided sample that still meets every channel).

Norm modules whose ``eps`` differs between the two architectures are found by
:func:`eps_differences`; :func:`source_eps` runs the target with the source's values, which tells
whether that difference explains what was measured.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weightport.errors import TargetError
from weightport.mapping.core import Mapping

__all__ = ["MAX_ELEMENTS", "MAX_MODULES", "ModuleDiff", "compare_modules", "corresponding", "eps_differences"]

MAX_MODULES = 1000
MAX_ELEMENTS = 1 << 16
_EPS_ATTRS = ("eps", "variance_epsilon")
# ops after which a module computes its outputs in another order (rotary layouts: the q/k rows of each head)
_REORDERING = frozenset({"rope_permute", "select"})


@dataclass(frozen=True)
class ModuleDiff:
    """One pair of corresponding modules, in the source's execution order.

    Attributes:
        source: The source module's name.
        target: The target module's name.
        input_diff: Largest absolute difference of the modules' first inputs; ``None`` when their
            shapes differ.
        output_diff: Largest absolute difference of their outputs.
        scale: Largest absolute value of the source module's output.
        ok: ``output_diff <= atol * max(1, scale)``.
    """

    source: str
    target: str
    input_diff: float | None
    output_diff: float
    scale: float
    ok: bool


_REORDER_ROWS = frozenset({"rope_permute"})


def corresponding(
    mapping: Mapping, names: dict[str, str], source: nn.Module, target: nn.Module
) -> list[tuple[str, str]]:
    """``(source module, target module)`` pairs the mapping's tensor names give.

    A source module goes with the target module its ``weight`` goes to (its first routed tensor
    when it has no weight), so a mapping that misroutes a bias still pairs the modules and the
    misrouted bias shows in their outputs. A tensor that becomes part of a fused target, a target
    module two source modules go with, or a module whose tensors are reordered gives no pair.
    ``names``: checkpoint name -> the source model's in-memory name of each tensor (they differ for
    transformers models)."""
    primary: dict[str, tuple[str, bool]] = {}
    reordered: set[str] = set()
    keys = list(names)
    for key, res in zip(keys, mapping.resolve_all(keys), strict=True):
        if res.dropped or "." not in names[key] or not res.outputs:
            continue
        module, _, leaf = names[key].rpartition(".")
        if any(op.op in _REORDERING for out in res.outputs for op in out.ops):
            reordered.add(module)
        o = res.outputs[0]
        if module not in primary or leaf == "weight":
            # rows reordered (rotary layouts) reorder the module's outputs too: no element-wise pair
            same_rows = all(op.op not in _REORDER_ROWS for op in o.ops)
            primary[module] = (o.target.rpartition(".")[0], o.part is None and len(res.outputs) == 1 and same_rows)
    count: dict[str, int] = {}
    for name, _whole in primary.values():
        count[name] = count.get(name, 0) + 1
    src, dst = dict(source.named_modules()), dict(target.named_modules())
    return [
        (module, into)
        for module, (into, whole) in primary.items()
        if whole and count[into] == 1 and module in src and into in dst and into and module not in reordered
        if _lookup_only(src[module]) == _lookup_only(dst[into])
    ]


def _lookup_only(module: nn.Module) -> bool | None:
    """For an embedding: whether its forward is ``nn.Embedding``'s own lookup (``None``: not an embedding)."""
    if not isinstance(module, nn.Embedding):
        return None
    return type(module).forward is nn.Embedding.forward


@dataclass
class _Act:
    """An activation as kept: its shape without size-1 dims, a sample of its values, its largest value."""

    shape: tuple[int, ...]
    values: torch.Tensor
    scale: float


def _keep(t: torch.Tensor) -> _Act:
    flat = t.detach().reshape(-1).float()
    scale = float(flat.abs().max()) if flat.numel() else 0.0
    if flat.numel() > MAX_ELEMENTS:
        step = math.ceil(flat.numel() / MAX_ELEMENTS)
        last = t.shape[-1] if t.dim() else 1
        while math.gcd(step, last) != 1:  # a stride sharing a factor with the last dim skips channels
            step += 1
        flat = flat[::step]
    # a copy: the model may change the tensor in place afterwards (a residual add, an inplace ReLU)
    return _Act(tuple(d for d in t.shape if d != 1), flat.clone(), scale)


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return next((t for t in x if isinstance(t, torch.Tensor)), None)
    if isinstance(x, dict):
        return next((t for t in x.values() if isinstance(t, torch.Tensor)), None)
    return None


@dataclass
class _Seen:
    input: _Act | None
    views: list[_Act]  # the output, then the inputs of parameter-free children


class _Recorder:
    """Forward hooks on the named modules of one model: the first call of each is kept."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.seen: dict[str, _Seen] = {}
        self.order: list[str] = []
        self._handles: list[Any] = []
        for name in names:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
            for child in module.children():
                if next(child.parameters(), None) is None:
                    self._handles.append(child.register_forward_pre_hook(self._child_hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = _first_tensor(output)
            if name in self.order or out is None:
                return
            x = _first_tensor(args)
            views = self.seen.pop(name, _Seen(None, [])).views
            self.seen[name] = _Seen(_keep(x) if x is not None else None, [_keep(out), *views])
            self.order.append(name)

        return hook

    def _child_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            x = _first_tensor(args)
            if name not in self.order and x is not None:
                self.seen.setdefault(name, _Seen(None, [])).views.append(_keep(x))

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _diff(a: _Act, b: _Act) -> float | None:
    if a.shape != b.shape or a.values.shape != b.values.shape:
        return None
    return float((a.values - b.values).abs().max()) if a.values.numel() else 0.0


def _best(a: Sequence[_Act], b: Sequence[_Act]) -> float | None:
    found = [d for x in a for y in b if (d := _diff(x, y)) is not None]
    return min(found) if found else None


def compare_modules(
    source: nn.Module,
    target: nn.Module,
    x: torch.Tensor,
    pairs: Sequence[tuple[str, str]],
    atol: float,
) -> tuple[Any, Any, list[ModuleDiff]]:
    """Run both models on ``x`` with hooks on ``pairs``: their outputs and the per-module table.

    Pairs whose source module never runs or whose activations have different shapes are left out.
    """
    if len(pairs) > MAX_MODULES:
        step = len(pairs) / MAX_MODULES
        pairs = [pairs[int(i * step)] for i in range(MAX_MODULES)]
    a, b = _Recorder(source, [s for s, _ in pairs]), _Recorder(target, [t for _, t in pairs])
    try:
        with torch.no_grad():
            ya, yb = _run(source, x, "source"), _run(target, x, "target")
    finally:
        a.close()
        b.close()
    partner = dict(pairs)
    table = []
    for name in a.order:
        mine, theirs = a.seen[name], b.seen.get(partner[name])
        if theirs is None:
            continue
        out = _best(mine.views, theirs.views)
        if out is None:
            continue
        inp = _diff(mine.input, theirs.input) if mine.input and theirs.input else None
        scale = mine.views[0].scale
        table.append(ModuleDiff(name, partner[name], inp, out, scale, out <= atol * max(1.0, scale)))
    return ya, yb, table


def _run(model: nn.Module, x: torch.Tensor, side: str) -> Any:
    try:
        return model(x)
    except Exception as e:
        shape = f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        raise TargetError(
            f"the {side} model ({type(model).__name__}) fails on the input {shape}: {type(e).__name__}: {e}; "
            "give it an input it takes with --input FILE (input= in Python)"
        ) from e


def _eps(module: nn.Module) -> tuple[str, float] | None:
    for attr in _EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return attr, value
    return None


def eps_differences(
    source: nn.Module, target: nn.Module, pairs: Sequence[tuple[str, str]]
) -> list[tuple[str, str, float, float]]:
    """Corresponding norm modules whose eps differs: ``(kind, target module, source eps, target eps)``."""
    out = []
    for s, t in pairs:
        mine, theirs = _eps(source.get_submodule(s)), _eps(target.get_submodule(t))
        if mine and theirs and mine[1] != theirs[1]:
            out.append((type(source.get_submodule(s)).__name__, t, mine[1], theirs[1]))
    return out


@contextlib.contextmanager
def source_eps(target: nn.Module, found: Sequence[tuple[str, str, float, float]]) -> Iterator[None]:
    """The target's norm modules run with the source's eps inside the block."""
    saved = []
    for _kind, name, mine, _theirs in found:
        module = target.get_submodule(name)
        attr, value = _eps(module) or ("eps", 0.0)
        saved.append((module, attr, value))
        setattr(module, attr, mine)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def describe_eps(found: Sequence[tuple[str, str, float, float]]) -> str:
    """``BatchNorm2d eps 0.001 (source) vs 1e-05 (target) on 52 modules``, per kind and pair of values."""
    groups: dict[tuple[str, float, float], int] = {}
    for kind, _name, mine, theirs in found:
        groups[(kind, mine, theirs)] = groups.get((kind, mine, theirs), 0) + 1
    return "; ".join(
        f"{kind} eps {mine:g} (source) vs {theirs:g} (target) on {n} module{'s' * (n != 1)}"
        for (kind, mine, theirs), n in groups.items()
    )
