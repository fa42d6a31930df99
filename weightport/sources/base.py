"""The :class:`Source` interface: a lazy, read-only ``Mapping[str, Tensor]``.

A source lists names, shapes and dtypes without reading tensor data. Each
concrete source keeps a table ``name -> handle`` and says how to describe and
read a handle; renaming the table (unwrapping prefixes) never touches data.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from weightport.errors import ShapeMismatchError, TensorNotFoundError

__all__ = ["Box", "Source", "SourceInfo", "TensorMeta"]

#: A box inside a tensor: ``(start, length)`` for each dimension.
Box = tuple[tuple[int, int], ...]


class TensorMeta(NamedTuple):
    """What a tensor is, without its values (a named tuple: sources make one per tensor).

    Attributes:
        shape: The tensor's shape.
        dtype: The tensor's element type.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from and what was done to reach them.

    Attributes:
        kind: Format or scheme: ``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"``,
            ``"sharded"``, ``"dict"``, ``"module"``, ``"torchvision"``, ``"timm"``, ``"hf"``, ``"dcp"``.
        location: The path or spec the source was opened from.
        files: Every file the source may read.
        wrapper: The key of a nested checkpoint the weights were found under (``"net"``,
            ``"state_dict"`` …), or ``None``.
        prefixes: Prefixes stripped from every key (``"module."``, ``"_orig_mod."``), in order.
        ignored: Names of non-tensor entries that were skipped.
        placeholders: Pickled globals that were replaced by inert placeholders during
            safe extraction (nothing was imported or called).
        metadata: Free-form string metadata stored in the file (safetensors ``__metadata__``).
        provenance: Where the file came from: url, repository, revision, sha256 …
        notes: Anything else worth telling the user (other candidate wrappers …).
    """

    kind: str
    location: str
    files: tuple[str, ...] = ()
    wrapper: str | None = None
    prefixes: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    placeholders: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def with_(self, **changes: Any) -> SourceInfo:
        return replace(self, **changes)

    def facts(self, *, detail: bool = False) -> list[str]:
        """What opening the source did, one phrase each (wrapper, prefixes, inert globals, and the notes:
        which weights of a checkpoint were taken, EMA or raw, and what else it holds); with ``detail``,
        also the ignored entries, the globals by name and the provenance."""
        facts = []
        if self.wrapper:
            facts.append(f"weights found under {self.wrapper!r}")
        if self.prefixes:
            facts.append("stripped prefixes: " + ", ".join(repr(p) for p in self.prefixes))
        if detail and self.ignored:
            facts.append(f"ignored non-tensor entries: {', '.join(self.ignored[:10])}")
        if self.placeholders:
            names = f": {', '.join(self.placeholders[:8])}" if detail else ""
            facts.append(f"{len(self.placeholders)} pickled globals kept inert (nothing imported or run){names}")
        if detail:
            facts.extend(f"{k}: {v}" for k, v in self.provenance.items())
        facts.extend(self.notes)
        return facts

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "location": self.location,
            "files": list(self.files),
            "wrapper": self.wrapper,
            "prefixes": list(self.prefixes),
            "ignored": list(self.ignored),
            "placeholders": list(self.placeholders),
            "metadata": dict(self.metadata),
            "provenance": {k: v for k, v in self.provenance.items()},
            "notes": list(self.notes),
        }


def box_slices(box: Box) -> tuple[slice, ...]:
    """``tensor[box_slices(box)]`` is the part of ``tensor`` inside ``box``."""
    return tuple(slice(start, start + length) for start, length in box)


def fill_box(tensor: torch.Tensor, box: Box, out: torch.Tensor | None) -> torch.Tensor:
    """The part of ``tensor`` inside ``box``, copied into ``out`` or into a new contiguous tensor."""
    part = tensor[box_slices(box)]
    return part.clone(memory_format=torch.contiguous_format) if out is None else out.copy_(part)


class Source(Mapping[str, torch.Tensor]):
    """A lazy, read-only mapping from tensor names to tensors.

    ``source[name]`` returns an owning copy that is safe to modify. The planner
    and applier use :meth:`meta`, :meth:`view` and :meth:`release` instead, which
    read nothing or read once without copying twice.

    Subclasses fill ``self._handles`` and implement :meth:`_meta_of`,
    :meth:`_view_of`, and optionally :meth:`_read_into`, :meth:`_read_many` (many
    reads at once) and :meth:`_release`.

    Attributes:
        info: Where the weights came from.
        state_dict_metadata: The ``_metadata`` a ``state_dict()`` carried (module
            versions for ``_load_from_state_dict`` hooks), or ``None``.
    """

    info: SourceInfo
    state_dict_metadata: Mapping[str, Any] | None = None

    def __init__(self, handles: Mapping[str, Any], info: SourceInfo) -> None:
        self._handles: dict[str, Any] = dict(handles)
        self.info = info

    # -- the part subclasses implement ---------------------------------------------
    def _meta_of(self, handle: Any) -> TensorMeta:
        raise NotImplementedError

    def _view_of(self, handle: Any) -> torch.Tensor:
        raise NotImplementedError

    def _read_into(self, handle: Any, out: torch.Tensor) -> None:
        out.copy_(self._view_of(handle))
        self._release(handle)

    def _read_many(self, handles: list[Any], outs: list[torch.Tensor]) -> None:
        for handle, out in zip(handles, outs):
            self._read_into(handle, out)

    def _release(self, handle: Any) -> None:
        return None

    def _mapped_view_of(self, handle: Any) -> torch.Tensor | None:
        return None

    def _read_region_of(self, handle: Any, box: Box, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """The default for sources that cannot read part of a tensor: read it whole, keep the box."""
        out = fill_box(self._view_of(handle), box, out)
        self._release(handle)
        return out, self._meta_of(handle).nbytes

    # -- public ----------------------------------------------------------------------
    def _handle(self, name: str) -> Any:
        try:
            return self._handles[name]
        except KeyError:
            raise TensorNotFoundError(self._missing_message(name)) from None

    def _missing_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._handles.keys(), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"{self.info.location}: no tensor named {name!r}{hint}"

    def meta(self, name: str) -> TensorMeta:
        """Shape and dtype of ``name``; reads no tensor data."""
        return self._meta_of(self._handle(name))

    def shapes(self, names: Iterable[str]) -> list[tuple[int, ...]]:
        """``[self.meta(n).shape for n in names]`` (tuples); sources that can answer in bulk do."""
        return [self.meta(n).shape for n in names]

    def nbytes(self, names: Iterable[str]) -> list[int]:
        """``[self.meta(n).nbytes for n in names]``; sources that can answer in bulk do."""
        return [self.meta(n).nbytes for n in names]

    def view(self, name: str) -> torch.Tensor:
        """The tensor ``name``, zero-copy where the format allows. Do not modify it."""
        return self._view_of(self._handle(name))

    def mapped_view(self, name: str) -> torch.Tensor | None:
        """A zero-copy tensor over the file's mapped pages for ``name``, or ``None`` when the
        source is not file-backed or the tensor is not stored as one contiguous native block.

        Used by ``transfer(..., zero_copy=True)``. Writes to it stay in this process
        (copy-on-write); the file must not change while the tensor lives.
        """
        return self._mapped_view_of(self._handle(name))

    def read_region(self, name: str, box: Box, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """The values of ``name`` inside ``box`` as a new contiguous tensor (or in ``out``, a
        contiguous CPU tensor of the box's shape and the tensor's dtype), and the bytes read to
        get them: only the box's byte ranges where the format stores the tensor as one native
        block (safetensors, torch files), else the whole tensor (then the count says so)."""
        handle = self._handle(name)
        meta = self._meta_of(handle)
        shape = meta.shape
        if out is not None and (
            tuple(out.shape) != tuple(n for _, n in box)
            or out.dtype != meta.dtype
            or not out.is_contiguous()
            or not out.is_cpu
        ):
            raise ShapeMismatchError(
                f"{self.info.location}: read_region of {name!r} into a {tuple(out.shape)} {out.dtype} tensor on "
                f"{out.device}; give a contiguous CPU tensor of the box's shape and {meta.dtype}, or none"
            )
        if len(box) != len(shape) or any(s < 0 or n < 0 or s + n > d for (s, n), d in zip(box, shape)):
            raise ShapeMismatchError(
                f"{self.info.location}: the box {box} lies outside {name!r} of shape {tuple(shape)}; "
                "give (start, length) inside the tensor for each of its dimensions"
            )
        return self._read_region_of(handle, box, out)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy the values of ``name`` into ``out`` (same shape), reading once."""
        self._read_into(self._handle(name), out)

    def read_into_many(self, names: Sequence[str], outs: Sequence[torch.Tensor]) -> None:
        """:meth:`read_into` for each name and tensor; file sources read tensors that lie next to each
        other in a file with one system call (100k small tensors cost 100k calls otherwise)."""
        self._read_many(list(map(self._handle, names)), list(outs))

    def same_tensor(self, a: str, b: str) -> bool:
        """Whether names ``a`` and ``b`` hold one shared tensor (tied weights saved once)."""
        ha, hb = self._handle(a), self._handle(b)
        if ha is hb:
            return True
        key = self._alias_key(ha)
        return key is not None and key == self._alias_key(hb)

    def aliases(self, names: Iterable[str]) -> dict[str, list[str]]:
        """For each of ``names`` that shares its tensor with other keys of the source (tied weights
        saved once: ``wte.weight`` and ``lm_head.weight`` of one storage), those other keys."""
        wanted = set(names)
        groups: dict[Any, list[str]] = {}
        for name, handle in self._handles.items():
            key = self._alias_key(handle)
            if key is not None:
                groups.setdefault(key, []).append(name)
        return {
            n: [o for o in group if o != n] for group in groups.values() if len(group) > 1 for n in group if n in wanted
        }

    def _alias_key(self, handle: Any) -> Any:
        """What identifies the tensor ``handle`` reads (equal for two names of one tensor), or ``None``."""
        return None

    def release(self, name: str) -> None:
        """Hint that the caller is done with ``name``: its pages may leave memory."""
        self._release(self._handle(name))

    def __getitem__(self, name: str) -> torch.Tensor:
        meta = self.meta(name)
        out = torch.empty(meta.shape, dtype=meta.dtype)
        self.read_into(name, out)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    def __contains__(self, name: object) -> bool:
        return name in self._handles

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.location!r}: {len(self)} tensors>"

    def renamed(self, names: Mapping[str, str], **info_changes: Any) -> Source:
        """A shallow copy whose keys are renamed by ``names`` (old -> new); no data is read."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        handles = self._handles
        clone._handles = dict(zip(map(names.get, handles, handles), handles.values()))  # in C, for 100k keys
        clone.info = self.info.with_(**info_changes)
        return clone

    def close(self) -> None:
        """Release open files; the source must not be used afterwards."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
