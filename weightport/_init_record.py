"""What a model's constructor did to its parameters, recorded while :func:`weightport.init_empty`
builds it, so a parameter that loads nothing can be initialised as an eager build would.

Under ``init_empty`` every parameter is moved to meta as it is registered, so the constructor's
own initialisation (``reset_parameters``, torchvision's ``nn.init.kaiming_normal_`` loops, timm's
``trunc_normal_``, transformers' ``_init_weights`` in ``post_init``) runs on meta tensors and
does nothing. :class:`Recorder`, a ``TorchFunctionMode`` active only inside ``init_empty``,
writes down each in-place call made on a registered meta parameter (or on its ``.data`` /
``detach()`` alias): ``nn.init.normal_(w, std=0.02)``, ``w.uniform_(-b, b)``, ``w.data.zero_()``.
:func:`replay` runs those calls again on a real tensor. The values are drawn anew (same
distribution, not the same numbers: no RNG state is kept).

In-place calls on views of a parameter (``w[padding_idx].zero_()``) are replayed on the same
view of the new tensor. A value the constructor gave before registering the parameter
(``nn.Parameter(torch.zeros(1, 1, d))``, ``init_values * torch.ones(d)``) is kept when it has
at most 2**20 elements, until a later call overwrites it. What cannot be replayed is said, never
guessed: a call that also reads another meta tensor marks the record incomplete, and the caller
falls back to the module's ``reset_parameters``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Record", "Recorder", "built_by_init_empty", "record_of", "replay"]

# in-place calls that set every element whatever it held: the record can start over from them
_OVERWRITES = {
    "normal_",
    "uniform_",
    "zero_",
    "fill_",
    "random_",
    "bernoulli_",
    "exponential_",
    "log_normal_",
    "cauchy_",
    "geometric_",
    "copy_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
}
# in-place calls that only change values (not shape, dtype or flags): on a meta tensor they do nothing
_FILLS = _OVERWRITES - {"copy_"} | {
    "mul_",
    "add_",
    "sub_",
    "div_",
    "clamp_",
    "clamp_min_",
    "clamp_max_",
    "erfinv_",
    "fill_diagonal_",
    "masked_fill_",
}
_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"}
_ALIASES = {"__get__", "detach"}  # Tensor.data.__get__ and Tensor.detach: the same elements
# calls whose result may be a view of part of the parameter: an in-place call on it is not replayed
_VIEWS = {
    "__getitem__",
    "narrow",
    "select",
    "view",
    "view_as",
    "reshape",
    "flatten",
    "unflatten",
    "transpose",
    "t",
    "permute",
    "movedim",
    "unsqueeze",
    "squeeze",
    "diagonal",
    "expand",
    "as_strided",
    "split",
    "chunk",
    "unbind",
}
_KEEP_NUMEL = 1 << 20  # a constructed value this small is kept, e.g. LayerScale's init_values * ones(d)


class _Self:
    """Stands for the parameter in a recorded call."""

    def __repr__(self) -> str:
        return "<param>"


SELF = _Self()


@dataclass(frozen=True)
class _View:
    """Stands for a view of the parameter in a recorded call: ``func(*args, **kwargs)[index]``
    with the parameter (or an outer view) among ``args``."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    index: int | None = None


Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


@dataclass
class Record:
    """The calls that set one parameter's value, in order.

    Attributes:
        start: The value it was registered with, when small; ``None``: unknown (``torch.empty``).
        calls: ``(function, args, kwargs)`` with :data:`SELF` (or a view of it) for the parameter.
        complete: ``False`` once a call could not be recorded faithfully.
        overwritten: A recorded call set every element (``normal_``, ``kaiming_uniform_`` …), so
            the value does not depend on what the parameter held before.
    """

    param_id: int
    start: torch.Tensor | None = None
    calls: list[Call] = field(default_factory=list)
    complete: bool = True
    overwritten: bool = False

    @property
    def replayable(self) -> bool:
        return self.complete and (self.overwritten or self.start is not None)


_ATTR = "_weightport_init"  # where a module keeps its parameters' records, by attribute name


class _Records(dict):  # type: ignore[type-arg]  # dict[str, Record]
    """A module's records. Copying or pickling the module drops them (a copy falls back to
    ``reset_parameters``; a pickle must not carry functions and tensors of ours)."""

    def __reduce__(self) -> Any:
        return (_Records, ())

    def __deepcopy__(self, memo: Any) -> _Records:
        return _Records()


def built_by_init_empty(model: nn.Module) -> bool:
    return any(_ATTR in m.__dict__ for m in model.modules())


def record_of(module: nn.Module, attr: str, t: torch.Tensor) -> Record | None:
    """The record of parameter ``attr`` of ``module``, if it is still the meta tensor recorded."""
    rec = module.__dict__.get(_ATTR, {}).get(attr)
    return rec if rec is not None and rec.param_id == id(t) and t.is_meta else None


class Recorder(TorchFunctionMode):
    """Records in-place calls on tracked meta parameters and their views (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # while recording only, then cleared: a weak reference left on a parameter would stop
        # torch.utils.swap_tensors from loading it in place later
        self._params: dict[int, tuple[torch.Tensor, Record]] = {}
        self._exprs: WeakIdKeyDictionary = WeakIdKeyDictionary()  # alias or view -> (Record, expression)

    def track(self, module: nn.Module, attr: str, param: torch.Tensor, registered: torch.Tensor) -> None:
        """Start the record of meta ``param``, registered as ``module.attr`` with the real value
        ``registered`` (kept, not copied, when small: the constructor's own tensor)."""
        small = registered.numel() <= _KEEP_NUMEL and not registered.is_meta
        rec = Record(id(param), start=registered.detach() if small else None)
        module.__dict__.setdefault(_ATTR, _Records())[attr] = rec
        self._params[id(param)] = (param, rec)

    def close(self) -> None:
        self._params.clear()
        self._exprs = WeakIdKeyDictionary()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("tensor")
        found = self._lookup(first) if isinstance(first, torch.Tensor) and first.is_meta else None
        if found is not None and getattr(func, "__name__", "") in _FILLS:
            # an initialisation of a meta tensor computes nothing: recorded, not run (running it
            # costs a meta decomposition per call, the bulk of a large model's build)
            self._noted(func, args, kwargs, first, first, found)
            return first
        result = func(*args, **kwargs)
        if found is not None:
            self._noted(func, args, kwargs, result, first, found)
        return result

    def _noted(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any, first: Any, found: Any
    ) -> None:
        try:
            self._note(func, args, kwargs, result, first, *found)
        except Exception:  # noqa: BLE001 - recording never breaks a constructor: the record is marked instead
            found[0].complete = False

    def _lookup(self, t: torch.Tensor) -> tuple[Record, Any] | None:
        found = self._params.get(id(t))
        if found is not None and found[0] is t:
            return found[1], SELF
        return self._exprs.get(t)

    def _note(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: Any,
        first: torch.Tensor,
        rec: Record,
        expr: Any,
    ) -> None:
        name = getattr(func, "__name__", "")

        def swap(x: Any) -> Any:
            if x is first:
                return expr
            if isinstance(x, torch.Tensor) and x.is_meta:
                raise ValueError("reads another meta tensor")
            return x

        if name in _ALIASES and isinstance(result, torch.Tensor):
            self._exprs[result] = (rec, expr)
        elif (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS:
            call = (func, tuple(map(swap, args)), {k: swap(v) for k, v in kwargs.items()})
            if expr is SELF and name in _OVERWRITES:
                rec.calls.clear()
                rec.start = None
                rec.overwritten = True
            rec.calls.append(call)
        elif name in _VIEWS:
            view_args, view_kwargs = tuple(map(swap, args)), {k: swap(v) for k, v in kwargs.items()}
            if isinstance(result, torch.Tensor):
                self._exprs[result] = (rec, _View(func, view_args, view_kwargs))
            elif isinstance(result, (tuple, list)):
                for i, part in enumerate(result):
                    if isinstance(part, torch.Tensor):
                        self._exprs[part] = (rec, _View(func, view_args, view_kwargs, i))


def replay(rec: Record, like: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The recorded value of a parameter shaped like ``like``, computed anew on ``device``."""
    if rec.start is not None:
        value = rec.start.to(device=device, dtype=dtype, copy=True)
    else:
        value = torch.empty(like.shape, dtype=dtype, device=device)

    def resolve(x: Any) -> Any:
        if x is SELF:
            return value
        if isinstance(x, _View):
            out = x.func(*map(resolve, x.args), **{k: resolve(v) for k, v in x.kwargs.items()})
            return out if x.index is None else out[x.index]
        return x

    with torch.no_grad():
        for func, args, kwargs in rec.calls:
            func(*map(resolve, args), **{k: resolve(v) for k, v in kwargs.items()})
    return value
