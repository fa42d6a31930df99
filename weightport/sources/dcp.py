"""A ``torch.distributed.checkpoint`` (DCP) folder as a source: ``dcp:PATH``, or any folder holding
a ``.metadata`` file and ``*.distcp`` data files.

Opening reads ``.metadata`` only (each tensor's global shape, dtype and saved chunks), through
weightport's restricted unpickler (see :mod:`weightport.sources._dcp_metadata`: DCP's own
``read_metadata`` is a plain ``pickle.load``), plus the small ``__metadata__`` entry that
:func:`weightport.save` writes when it was given metadata. Reading a tensor, or a region of one,
opens only the ``.distcp`` files that hold the saved chunks it overlaps, through DCP's own
``FileSystemReader``, driven directly (no process group needed, and no collective when there is
one: each rank reads a DCP source on its own).

DCP stores each saved chunk (a rank's shard) as one item, which its reader deserialises whole
(``torch.load(weights_only=True)`` of the item's bytes): a region is read chunk by chunk, and
the bytes counted are the stored sizes of the chunks it overlaps, not of the region alone.

Nested state dicts (``{"model": …, "optim": …}``) are flattened by DCP to dotted names
(``model.layer.weight``); the nesting DCP records is rebuilt, so ``checkpoint_key="model"`` or
the usual wrapper search (:func:`weightport.sources.unwrap.find_weights`) yields the model's own
names. Non-tensor entries (``step``, ``param_groups`` …) are pickles: they are never read, only
listed in ``source.info.ignored``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint import (
    FileSystemReader,
    LoadPlan,
    LoadPlanner,
    Metadata,
    ReadItem,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from weightport.errors import CorruptFileError, SourceError, SourceNotFoundError
from weightport.sources._dcp_metadata import METADATA_FILE, read_metadata
from weightport.sources.base import Box, Source, SourceInfo, TensorMeta
from weightport.sources.unwrap import find_weights

#: The entry where :func:`weightport.save` keeps its ``metadata=`` strings: one JSON string (which DCP
#: stores with ``torch.save``, so that ``dcp.load`` and ``dcp_to_torch_save`` read it back as a ``str``).
METADATA_KEY = "__metadata__"
MAX_METADATA_BYTES = 16 * 1024 * 1024

__all__ = ["METADATA_KEY", "DCPSource", "open_dcp", "open_dcp_spec"]


class _Entry(NamedTuple):
    """A handle: the tensor's name in the checkpoint and what DCP recorded of it."""

    fqn: str
    stored: TensorStorageMetadata
    meta: TensorMeta


class _Bytes:
    """A non-tensor entry in the rebuilt nesting: never read."""

    __slots__ = ()


def open_dcp_spec(rest: str, *, checkpoint_key: str | None = None, trust_pickle: bool = False, **_: Any) -> Source:
    """The opener of ``dcp:PATH`` specs (see :func:`weightport.sources.open_source`)."""
    return open_dcp(rest, checkpoint_key=checkpoint_key, trust_pickle=trust_pickle)


def open_dcp(
    folder: str, *, checkpoint_key: str | None = None, trust_pickle: bool = False, ema: bool | None = None
) -> DCPSource:
    """Open a DCP checkpoint folder lazily: reads ``.metadata`` (safely, unless ``trust_pickle``).

    Raises:
        SourceNotFoundError: No such folder, or one without ``.metadata`` (nor data files).
        CorruptFileError: ``.metadata`` is damaged, or data files were written without it.
        SourceError: ``checkpoint_key`` names nothing, or the weights cannot be told apart.
    """
    folder = os.fspath(folder)
    if os.path.isfile(folder) and os.path.basename(folder) == METADATA_FILE:
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise SourceNotFoundError(f"{folder}: no such folder (a DCP checkpoint is a folder holding {METADATA_FILE})")
    read = read_metadata(folder, trust_pickle=trust_pickle)
    return DCPSource(folder, read.metadata, checkpoint_key, ema, read.placeholders)


class DCPSource(Source):
    """The tensors of a DCP checkpoint folder, under their flattened names (see the module docstring).

    Args:
        folder: The checkpoint folder.
        metadata: Its ``.metadata``, read.
        checkpoint_key: The part of a nested state dict to take (``"model"``; ``"a/b"`` deeper).
        ema: As for :func:`weightport.sources.unwrap.find_weights`.
        placeholders: Globals the metadata pickle named beyond DCP's own classes.
    """

    def __init__(
        self,
        folder: str,
        metadata: Metadata,
        checkpoint_key: str | None = None,
        ema: bool | None = None,
        placeholders: Sequence[str] = (),
    ) -> None:
        self._folder = folder
        self._metadata = metadata
        self._reader = FileSystemReader(folder)
        self._reader.set_up_storage_reader(metadata, is_coordinator=True)
        tree, entries = _nesting(metadata)
        found = find_weights(tree, folder, checkpoint_key, ema)
        handles = {name: entries[id(leaf)] for name, leaf in found.tensors.items()}
        strings = self._strings()
        storage = metadata.storage_data
        info = SourceInfo(
            kind="dcp",
            location=folder,
            files=tuple(
                os.path.join(folder, f) for f in [METADATA_FILE, *sorted({s.relative_path for s in storage.values()})]
            ),
            wrapper=found.wrapper,
            ignored=tuple(n for n in found.ignored if not (strings and n == METADATA_KEY)),
            placeholders=tuple(placeholders),
            metadata=strings,
            notes=tuple(found.notes),
        )
        super().__init__(handles, info)

    # -- reading -------------------------------------------------------------------------------
    def _meta_of(self, handle: _Entry) -> TensorMeta:
        return handle.meta

    def _view_of(self, handle: _Entry) -> torch.Tensor:
        out = torch.empty(handle.meta.shape, dtype=handle.meta.dtype)
        self._read_into(handle, out)
        return out

    def _read_into(self, handle: _Entry, out: torch.Tensor) -> None:
        self._read_many([handle], [out])

    def _read_many(self, handles: list[_Entry], outs: list[torch.Tensor]) -> None:
        fqns = [h.fqn for h in handles]
        if len(set(fqns)) < len(fqns):  # one name asked twice: a plan holds each name once
            for h, o in zip(handles, outs):
                self._read_many([h], [o])
            return
        whole = [tuple((0, d) for d in h.meta.shape) for h in handles]
        self._read(handles, whole, outs)

    def _read_region_of(self, handle: _Entry, box: Box, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """The box's values, reading only the saved chunks that overlap it, each whole (DCP's
        reader deserialises a stored chunk as one item); the count is their stored sizes."""
        if out is None:
            out = torch.empty(tuple(n for _, n in box), dtype=handle.meta.dtype)
        return out, self._read([handle], [box], [out])

    def _read(self, handles: list[_Entry], boxes: list[Box], outs: list[torch.Tensor]) -> int:
        items: list[ReadItem] = []
        for h, box, out in zip(handles, boxes, outs):
            if tuple(out.shape) != tuple(n for _, n in box):
                raise SourceError(f"{self._folder}: {h.fqn!r}: output of shape {tuple(out.shape)} for a box {box}")
            if out.numel():
                chunk = ChunkStorageMetadata(offsets=torch.Size(s for s, _ in box), sizes=torch.Size(out.shape))
                items += create_read_items_for_chunk_list(h.fqn, h.stored, [chunk])
        planner = _Fill({h.fqn: out for h, out in zip(handles, outs)})
        self._run(items, planner, ", ".join(repr(h.fqn) for h in handles[:3]) + (" …" if len(handles) > 3 else ""))
        return sum(self._metadata.storage_data[i].length for i in {item.storage_index for item in items})

    def _run(self, items: list[ReadItem], planner: LoadPlanner, what: str) -> None:
        if not items:
            return
        files = sorted({self._metadata.storage_data[i.storage_index].relative_path for i in items})
        try:
            plan = self._reader.prepare_local_plan(LoadPlan(items))
            self._reader.read_data(plan, planner).wait()
        except Exception as e:
            listed = ", ".join(files)
            raise CorruptFileError(
                f"{self._folder}: cannot read {what} from {listed} ({type(e).__name__}: {e}); the checkpoint "
                "folder is damaged or incomplete: copy it again, or save it again"
            ) from e

    def _strings(self) -> dict[str, str]:
        """The ``metadata=`` strings :func:`weightport.save` stored (one JSON string, which DCP saves
        with ``torch.save``), or ``{}`` for any other entry of that name."""
        entry = self._metadata.state_dict_metadata.get(METADATA_KEY)
        if entry is None or isinstance(entry, TensorStorageMetadata):
            return {}
        index = MetadataIndex(METADATA_KEY)
        stored = self._metadata.storage_data.get(index)
        if stored is None or stored.length > MAX_METADATA_BYTES:
            return {}
        size = torch.Size((0,))
        item = ReadItem(LoadItemType.BYTE_IO, index, size, index, size, size)
        planner = _Fill({})
        self._run([item], planner, repr(METADATA_KEY))
        try:  # torch's weights_only loader, as DCP's reader uses for every tensor: no arbitrary pickle
            text = torch.load(io.BytesIO(planner.raw.get(METADATA_KEY, b"")), weights_only=True)
            value = json.loads(text) if isinstance(text, str) else None
        except Exception:  # noqa: BLE001 - not weightport's entry: leave it
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return {}
        return value


class _Fill(LoadPlanner):
    """The planner DCP's reader calls back: each read item lands in its part of an output tensor."""

    def __init__(self, outs: Mapping[str, torch.Tensor]) -> None:
        self.outs = outs
        self.raw: dict[str, bytes] = {}

    def set_up_planner(self, *args: Any, **kwargs: Any) -> None:
        return None

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan([])

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.raw[read_item.dest_index.fqn] = value.read(MAX_METADATA_BYTES + 1)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        out = self.outs[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            out = out.narrow(dim, start, length)
        return out

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        return None  # the reader copied into a view of the output


def _nesting(metadata: Metadata) -> tuple[dict[str, Any], dict[int, _Entry]]:
    """The state dict's nesting as DCP recorded it (``planner_data``), with a meta tensor standing
    for each saved tensor (found by :func:`find_weights` like any tensor; no memory) and an inert
    marker for each non-tensor entry; and each meta tensor's handle, by ``id``."""
    leaves: dict[str, Any] = {}
    entries: dict[int, _Entry] = {}
    for fqn, stored in metadata.state_dict_metadata.items():
        if isinstance(stored, TensorStorageMetadata):
            meta = TensorMeta(tuple(stored.size), stored.properties.dtype)
            leaf = torch.empty(meta.shape, dtype=meta.dtype, device="meta")
            entries[id(leaf)] = _Entry(fqn, stored, meta)
            leaves[fqn] = leaf
        else:
            leaves[fqn] = _Bytes()
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    tree: dict[str, Any] = {}
    for fqn, leaf in leaves.items():
        path = [str(p) for p in paths.get(fqn, (fqn,))]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return leaves, entries  # a nesting that contradicts itself: keep the flat names
        if path[-1] in node or ".".join(path) != fqn:
            return leaves, entries
        node[path[-1]] = leaf
    return tree, entries
