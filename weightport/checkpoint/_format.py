"""The checkpoint file: one safetensors file (or one torch file), no pickled objects anywhere.

Tensors live under namespaced keys: ``model/<state-dict key>``,
``optimizer/state/<index>/<name>``, ``rng/torch``, ``scheduler/...``, ``scaler/...``,
``extra/...``. Everything else (epoch, step, metrics, parameter-group
hyper-parameters, scheduler counters, which optimizer index is which parameter)
is one JSON document in the header metadata under ``weightport.checkpoint``, with
``weightport.format = "checkpoint"`` marking the file. Any safetensors reader can
open it; weightport opens it lazily (memory-mapped, nothing read until used).

A path ending in ``.pt``, ``.pth`` or ``.bin`` gets the torch form: ``torch.save`` of one
dict holding the same namespaced tensors plus a ``"__metadata__"`` dict of the same strings,
which ``torch.load(path, weights_only=True)`` reads (only tensors, strings and dicts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from weightport.errors import CheckpointError, CorruptFileError, SourceError, SourceNotFoundError
from weightport.saving import file_format, write_safetensors, write_torch
from weightport.sources import open_source
from weightport.sources.base import Source, SourceInfo
from weightport.sources.safetensors import read_header
from weightport.sources.training import BODY_KEY, FORMAT, FORMAT_KEY, KIND, PartSource, is_training_checkpoint

__all__ = ["BODY_KEY", "FORMAT", "FORMAT_KEY", "CheckpointFile", "is_checkpoint", "parse_body", "write"]

VERSION = 1
PARTS = ("model", "optimizer", "scheduler", "scaler", "rng", "extra")


def write(path: str, tensors: Mapping[str, torch.Tensor], body: Mapping[str, Any]) -> None:
    """Write tensors and the JSON body atomically (temporary file, fsync, rename), in the format
    the extension names (:func:`weightport.saving.file_format`)."""
    try:
        text = json.dumps({"version": VERSION, **body}, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:  # the encoder makes this unreachable; keep the message useful
        raise CheckpointError(f"{path}: checkpoint metadata is not JSON ({e})") from e
    metadata = {FORMAT_KEY: FORMAT, BODY_KEY: text}
    if file_format(path) == "torch":
        write_torch(tensors, path, metadata)
    else:
        write_safetensors(tensors, path, metadata)


#: Whether file metadata marks a weightport training checkpoint.
is_checkpoint = is_training_checkpoint


def parse_body(metadata: Mapping[str, str], where: str) -> dict[str, Any]:
    """The checkpoint's JSON document, checked for format and version.

    Raises:
        CheckpointError: not a weightport checkpoint, damaged, or from a newer weightport.
    """
    if not is_checkpoint(metadata):
        raise CheckpointError(
            f"{where}: not a weightport training checkpoint (no {FORMAT_KEY!r} metadata). To load plain "
            "weights use weightport.transfer(path, model); checkpoints are written by weightport.checkpoint.save"
        )
    text = metadata[BODY_KEY]
    try:
        body = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError) as e:  # bad JSON, a 5000-digit number, nesting past the stack
        raise CheckpointError(
            f"{where}: the checkpoint metadata is not valid JSON ({type(e).__name__}: {str(e)[:200]}); "
            "the file is damaged"
        ) from e
    if not isinstance(body, dict) or not _is_int(body.get("version")):
        raise CheckpointError(f"{where}: the checkpoint metadata has no version; the file is damaged")
    if body["version"] > VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format version {body['version']} is newer than this "
            f"weightport reads ({VERSION}); upgrade weightport"
        )
    _check_shape(body, where)
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shape(body: dict[str, Any], where: str) -> None:
    """The body's fixed fields have the types the readers rely on (what lies inside the parts'
    state dicts is checked where it is decoded)."""
    problems = []
    for name in ("epoch", "step"):
        if body.get(name) is not None and not _is_int(body[name]):
            problems.append(f"{name} is not an integer")
    for name in ("created", "torch"):
        if body.get(name) is not None and not isinstance(body[name], str):
            problems.append(f"{name} is not a string")
    for name in ("model", "optimizer", "scheduler", "scaler", "rng", "metrics", "extra"):
        if name in body and not isinstance(body[name], dict):
            problems.append(f"{name} is not an object")
    for name in ("model", "optimizer", "scheduler", "scaler"):
        part = body.get(name)
        if isinstance(part, dict) and part.get("type") is not None and not isinstance(part["type"], str):
            problems.append(f"{name}.type is not a string")
    model = body.get("model")
    if isinstance(model, dict) and not _strings(model.get("unwrapped", [])):
        problems.append("model.unwrapped is not a list of strings")
    optimizer = body.get("optimizer")
    names = optimizer.get("param_names", []) if isinstance(optimizer, dict) else []
    if not isinstance(names, list) or not all(_strings(n) for n in names):
        problems.append("optimizer.param_names is not a list of lists of names")
    if problems:
        raise CheckpointError(
            f"{where}: the checkpoint metadata is malformed ({'; '.join(problems)}); the file is damaged"
        )


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_complete_body(path: str) -> dict[str, Any]:
    """Header-only check that ``path`` is a whole checkpoint; returns its body.

    The file must be exactly as long as its header says: a file cut short (a copy
    interrupted, a disk that filled up) is refused even though its header is intact.

    Raises:
        CheckpointError: incomplete, damaged or not a checkpoint.
    """
    try:
        header, start = read_header(path)
    except (OSError, SourceError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    ends = [
        e["data_offsets"][1]
        for e in header.values()
        if isinstance(e, dict) and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
    ]
    try:
        expected = start + max((e for e in ends if isinstance(e, int)), default=0)
        size = os.path.getsize(path)
    except (OSError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from e
    if size != expected:
        raise CheckpointError(f"{path}: incomplete checkpoint: {size} bytes, the header describes {expected}")
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: the safetensors metadata is not a JSON object; the file is damaged")
    return parse_body(metadata, path)


class CheckpointFile:
    """An opened checkpoint: the lazy tensor source and the parsed JSON body.

    Attributes:
        path: The file.
        source: Every tensor of the file, under its namespaced key (nothing read yet).
        body: The JSON document.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise CheckpointError(f"path must be a path (str or os.PathLike), not {type(path).__name__}") from None
        try:
            opened = open_source(self.path)  # a checkpoint opens as its model part; keep the whole file
        except SourceNotFoundError:
            raise
        except CorruptFileError as e:
            raise CheckpointError(f"{self.path}: damaged or incomplete checkpoint ({e})") from e
        except SourceError as e:
            raise CheckpointError(f"{self.path}: cannot open the checkpoint ({e})") from e
        self.source: Source = opened.whole if isinstance(opened, PartSource) else opened
        try:
            self.body = parse_body(self.source.info.metadata, self.path)
        except CheckpointError:
            self.source.close()
            raise

    def part(self, name: str, *, hide: frozenset[str] = frozenset()) -> PartSource:
        """The tensors of one part under their own names, e.g. the model's state-dict keys.

        Args:
            name: The part (``"model"``).
            hide: Full keys to leave out (aliases of a tied tensor that the target ties too).
        """
        info = SourceInfo(kind=KIND, location=self.path, files=(self.path,), metadata=self.source.info.metadata)
        return PartSource(self.source, name, info, hide)

    def aliases(self) -> dict[str, str]:
        """``{alias: canonical}`` full keys of tensors stored once under several names (tied weights)."""
        try:
            table = json.loads(self.source.info.metadata.get("weightport.aliases", "{}"))
        except json.JSONDecodeError:
            return {}
        return {str(k): str(v) for k, v in table.items()} if isinstance(table, dict) else {}

    def tensor(self, key: str, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An owning copy of tensor ``key``, placed and cast in one step."""
        if key not in self.source:
            raise CheckpointError(
                f"{self.path}: the metadata refers to tensor {key!r}, which the file lacks; the file is damaged"
            )
        view = self.source.view(key)
        out = view.to(device=device or torch.device("cpu"), dtype=dtype or view.dtype, copy=True)
        self.source.release(key)
        return out

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)
