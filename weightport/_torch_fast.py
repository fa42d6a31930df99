"""The private torch calls weightport uses for speed, each beside its public-API fallback.

Applying a plan to a model of many small tensors spends most of its time in per-tensor
Python overhead, so three steps take torch's own primitives when they exist:

* :func:`swap` exchanges two tensors' contents in place (what ``torch.utils.swap_tensors``
  does, without its Python-level checks, which the caller has made: :func:`swappable`);
* :func:`swappable` asks the tensor's use count (``Tensor._use_count``);
* :func:`as_parameter` makes a ``Parameter`` around a plain tensor without ``Parameter.__new__``.

Nothing else in weightport calls a private torch API. ``FAST = False`` (the tests run both)
takes the public path everywhere: ``torch.utils.swap_tensors`` and ``nn.Parameter``.
"""

from __future__ import annotations

import copyreg
import weakref

import torch
from torch import nn

_swap_impl = getattr(torch._C, "_swap_tensor_impl", None)
_has_use_count = hasattr(torch.Tensor, "_use_count")

#: Whether the private primitives are used (they exist in this torch).
FAST = _swap_impl is not None and hasattr(torch.Tensor, "_make_subclass")


def swappable(t: torch.Tensor) -> bool:
    """Whether ``t``'s contents can be swapped in place: no weak references, no other user
    (``torch.utils.swap_tensors`` refuses otherwise). ``False`` when torch cannot tell."""
    if weakref.getweakrefs(t) or not _has_use_count:
        return False
    return t._use_count() <= 1  # type: ignore[attr-defined,no-any-return]


def swap(old: torch.Tensor, new: torch.Tensor) -> None:
    """Exchange the contents, class attributes and ``__dict__`` of two tensors of one class, both
    :func:`swappable`: every holder of ``old`` then sees the new values."""
    if FAST and not copyreg._slotnames(type(old)):  # type: ignore[attr-defined]
        # torch.utils.swap_tensors' own steps for two tensors of one class without slots, whose
        # checks (same class, no weak references, one user) the caller made; the primitive first,
        # so that if it refuses, nothing has changed
        _swap_impl(old, new)  # type: ignore[misc]
        if old.__dict__ or new.__dict__:
            old.__dict__, new.__dict__ = new.__dict__, old.__dict__
    else:
        torch.utils.swap_tensors(old, new)


def as_parameter(data: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """``nn.Parameter(data, requires_grad)`` for a plain tensor ``data``."""
    if FAST and type(data) is torch.Tensor:
        return torch.Tensor._make_subclass(nn.Parameter, data, requires_grad)  # type: ignore[return-value]
    return nn.Parameter(data, requires_grad=requires_grad)
