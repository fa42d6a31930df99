"""Hugging Face style folders and sharded checkpoints (``*.index.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from weightport.errors import CorruptFileError, SourceNotFoundError
from weightport.sources.base import Box, Source, SourceInfo, TensorMeta

# In order of preference: safetensors first (no pickle), the single file before an index.
PREFERRED = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MAX_INDEX_BYTES = 256 * 1024 * 1024


def choose_weights_file(folder: str) -> str:
    """The weights file (or index) a Hugging Face style ``folder`` holds.

    Raises:
        SourceNotFoundError: the folder holds no weights, or several candidates with no
            obvious choice.
    """
    names = sorted(os.listdir(folder))
    for name in PREFERRED:
        if name in names:
            return os.path.join(folder, name)
    indexes = [n for n in names if n.endswith(".index.json")]
    singles = [n for n in names if n.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(folder, n))]
    safes = [n for n in singles if n.endswith(".safetensors")]
    for group in ([n for n in indexes if "safetensors" in n], indexes, safes, singles):
        if len(group) == 1:
            return os.path.join(folder, group[0])
        if len(group) > 1:
            raise SourceNotFoundError(
                f"{folder}: several weight files ({', '.join(group)}); pass the path of the one to use"
            )
    raise SourceNotFoundError(
        f"{folder}: no weights found (looked for {', '.join(PREFERRED)} and any {'/'.join(WEIGHT_SUFFIXES)} file)"
    )


class ShardedSource(Source):
    """A checkpoint split over several files by an index; shards open only when needed."""

    def __init__(self, index_path: str, open_file: Callable[[str], Source], location: str | None = None):
        self._index_path = index_path
        folder = os.path.dirname(index_path)
        weight_map, metadata = _read_index(index_path)
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
        if missing:
            raise SourceNotFoundError(
                f"{index_path}: the index points to shard(s) that do not exist: {', '.join(missing)}; "
                "download the missing files or fix the index"
            )
        files = tuple(os.path.join(folder, f) for f in dict.fromkeys(weight_map.values()))
        info = SourceInfo(
            kind="sharded",
            location=location or index_path,
            files=(index_path, *files),
            metadata={str(k): str(v) for k, v in metadata.items() if isinstance(v, (str, int, float, bool))},
        )
        super().__init__({name: (os.path.join(folder, f), name) for name, f in weight_map.items()}, info)
        self._open_file = open_file
        self._shards: dict[str, Source] = {}

    def _shard(self, path: str) -> Source:
        shard = self._shards.get(path)
        if shard is None:
            shard = self._shards[path] = self._open_file(path)
        return shard

    def _locate(self, handle: tuple[str, str]) -> tuple[Source, str]:
        path, name = handle
        shard = self._shard(path)
        if name not in shard:
            raise CorruptFileError(
                f"{self._index_path}: the index places {name!r} in {os.path.basename(path)}, "
                "but that shard does not hold it"
            )
        return shard, name

    def _meta_of(self, handle: tuple[str, str]) -> TensorMeta:
        shard, name = self._locate(handle)
        return shard.meta(name)

    def _view_of(self, handle: tuple[str, str]) -> torch.Tensor:
        shard, name = self._locate(handle)
        return shard.view(name)

    def _mapped_view_of(self, handle: tuple[str, str]) -> torch.Tensor | None:
        shard, name = self._locate(handle)
        return shard.mapped_view(name)

    def _read_into(self, handle: tuple[str, str], out: torch.Tensor) -> None:
        shard, name = self._locate(handle)
        shard.read_into(name, out)

    def _read_many(self, handles: list[tuple[str, str]], outs: list[torch.Tensor]) -> None:
        by_shard: dict[int, tuple[Source, list[str], list[torch.Tensor]]] = {}
        for handle, out in zip(handles, outs):
            shard, name = self._locate(handle)
            _, names, shard_outs = by_shard.setdefault(id(shard), (shard, [], []))
            names.append(name)
            shard_outs.append(out)
        for shard, names, shard_outs in by_shard.values():
            shard.read_into_many(names, shard_outs)

    def _release(self, handle: tuple[str, str]) -> None:
        shard, name = self._locate(handle)
        shard.release(name)

    def _read_region_of(self, handle: tuple[str, str], box: Box, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        shard, name = self._locate(handle)
        return shard.read_region(name, box, out)

    @property
    def opened_shards(self) -> list[str]:
        """Paths of the shards opened so far (the others were never touched)."""
        return list(self._shards)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def _read_index(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    if os.path.getsize(path) > MAX_INDEX_BYTES:
        raise CorruptFileError(f"{path}: a shard index of {os.path.getsize(path)} bytes is not plausible")
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError, and ints past Python's limit
        raise CorruptFileError(f"{path}: the shard index is not valid JSON ({type(e).__name__}: {e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise CorruptFileError(f"{path}: the shard index has no valid 'weight_map' object of name -> shard file")
    for shard in set(weight_map.values()):
        parts = shard.replace("\\", "/").split("/")
        if os.path.isabs(shard) or ".." in parts or not shard or "\0" in shard:
            raise CorruptFileError(f"{path}: shard name {shard!r} points outside the folder")
        if shard.endswith(".index.json"):
            raise CorruptFileError(f"{path}: shard {shard!r} is itself an index; shards must be weight files")
    metadata = index.get("metadata") or {}
    return weight_map, metadata if isinstance(metadata, dict) else {}
