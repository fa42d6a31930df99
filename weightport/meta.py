"""Building models without paying for an initialisation that a transfer overwrites."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from weightport._init_record import Recorder


@contextlib.contextmanager
def init_empty() -> Iterator[None]:
    """Build modules with parameters on the meta device and buffers real.

    Parameters cost no memory and no random initialisation; buffers (BatchNorm
    statistics, position ids, rotary tables) keep the values their modules compute.
    :func:`weightport.transfer` then loads what the checkpoint has and initialises the
    rest as an eager build would: the initialisation calls the constructor made on each
    parameter (``reset_parameters``, torchvision's and timm's init loops, transformers'
    ``_init_weights``) are recorded here and replayed on the tensors that load nothing
    (see :mod:`weightport._init_record`). Buffers a constructor computes from a parameter's
    device (timm Swin's ``attn_mask``) are recomputed by their module after the transfer.

    Example:
        >>> with weightport.init_empty():
        ...     model = torchvision.models.vit_l_16()
        >>> weightport.transfer("vit_l_16.safetensors", model)
    """
    original = nn.Module.register_parameter
    recorder = Recorder()

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and not param.is_meta:
            value = param.data
            meta = (
                type(param)(param.to("meta"), requires_grad=param.requires_grad)
                if type(param) is nn.Parameter
                else nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            )
            meta.__dict__.update(param.__dict__)
            self._parameters[name] = meta
            recorder.track(self, name, meta, value)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        with recorder:
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        recorder.close()


def is_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device."""
    return any(t.is_meta for t in _tensors(module))


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()
