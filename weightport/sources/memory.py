"""Sources backed by tensors already in memory or by mapped-file references."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from operator import attrgetter, mul
from typing import Any

import torch

from weightport.sources._mapped import MappedFile, TensorRef, read_refs
from weightport.sources.base import Box, Source, SourceInfo, TensorMeta, fill_box

_shape, _dtype, _itemsize = attrgetter("shape"), attrgetter("dtype"), attrgetter("itemsize")


class TensorSource(Source):
    """Tensors held in memory (a dict, a module's state dict, an eager ``torch.load``)."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        info: SourceInfo,
        state_dict_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tensors, info)
        self.state_dict_metadata = state_dict_metadata

    def _meta_of(self, handle: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(handle.shape), handle.dtype)

    def _view_of(self, handle: torch.Tensor) -> torch.Tensor:
        return handle.detach()

    def _read_into(self, handle: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(handle.detach())

    def _read_region_of(self, handle: torch.Tensor, box: Box, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Tensors in memory: the box is copied, nothing else is touched."""
        out = fill_box(handle.detach(), box, out)
        return out, out.nbytes

    def _alias_key(self, handle: torch.Tensor) -> Any:
        if handle.numel() == 0 or handle.device.type == "meta":
            return None
        return (handle.device, handle.dtype, tuple(handle.shape), handle.stride(), handle.data_ptr())


class FileSource(Source):
    """Tensors referenced inside one or more mapped files (safetensors, torch zip/legacy)."""

    def __init__(
        self,
        refs: Mapping[str, TensorRef],
        info: SourceInfo,
        files: list[MappedFile],
        state_dict_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(refs, info)
        self._files = files
        self.state_dict_metadata = state_dict_metadata

    def _meta_of(self, handle: TensorRef) -> TensorMeta:
        return handle.meta

    def _refs(self, names: Iterable[str]) -> list[TensorRef]:
        """The references of ``names``, looked up in C; a missing name raises as :meth:`meta` does."""
        names = list(names)
        try:
            return list(map(self._handles.__getitem__, names))
        except KeyError:
            return list(map(self._handle, names))  # raises, naming the missing one

    def shapes(self, names: Iterable[str]) -> list[tuple[int, ...]]:
        return list(map(_shape, self._refs(names)))

    def nbytes(self, names: Iterable[str]) -> list[int]:
        refs = self._refs(names)
        return list(map(mul, map(math.prod, map(_shape, refs)), map(_itemsize, map(_dtype, refs))))

    def _view_of(self, handle: TensorRef) -> torch.Tensor:
        return handle.view()

    def _read_into(self, handle: TensorRef, out: torch.Tensor) -> None:
        handle.read_into(out)

    def _read_many(self, handles: list[TensorRef], outs: list[torch.Tensor]) -> None:
        read_refs(handles, outs)

    def _release(self, handle: TensorRef) -> None:
        handle.release()

    def _read_region_of(self, handle: TensorRef, box: Box, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        read = handle.read_region(box, out)
        if read is None:
            return super()._read_region_of(handle, box, out)
        return read, read.nbytes

    def _alias_key(self, handle: TensorRef) -> Any:
        if handle.numel == 0:
            return None
        return (id(handle.file), handle.offset, handle.storage_offset, handle.dtype, handle.shape, handle.stride)

    def _mapped_view_of(self, handle: TensorRef) -> torch.Tensor | None:
        if not handle.contiguous or handle.byteswap or handle.numel == 0:
            return None
        return handle.view()

    def close(self) -> None:
        for f in self._files:
            f.close()
