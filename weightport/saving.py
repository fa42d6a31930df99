"""Saving weights, atomically: safetensors streamed tensor by tensor, or a torch file, by extension."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import torch
from torch import nn

from weightport._atomic import atomic_write
from weightport._save_checks import check_value, metadata_strings
from weightport.errors import SaveError, WeightportError
from weightport.sources.safetensors import DTYPE_NAMES

ALIGN = 8


#: File formats by extension: what :func:`save` writes.
FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}
#: What ``save(..., format=)`` accepts.
FORMAT_NAMES = ("safetensors", "torch", "dcp")


def save(
    state_dict_or_module: Mapping[str, torch.Tensor] | nn.Module,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    format: str | None = None,
) -> None:
    """Save tensors atomically, in the format the extension names (or ``format=``).

    ``.safetensors`` writes safetensors, streamed tensor by tensor; tensors shared under
    several names (tied weights) are stored once, the other names recorded in the metadata
    (they come back when weightport opens the file). ``.pt``, ``.pth`` and ``.bin`` write a
    torch file of the state dict that ``torch.load(path, weights_only=True)`` reads.

    ``format="dcp"`` writes a ``torch.distributed.checkpoint`` folder at ``path``, which
    ``torch.distributed.checkpoint.load(state_dict, checkpoint_id=path)`` reads back and weightport
    opens as a source (see :func:`write_dcp`: a sharded model's state dict of DTensors is written
    collectively, every rank calling ``save``).

    Args:
        state_dict_or_module: A ``Mapping[str, Tensor]`` or a module (its ``state_dict()``).
        path: Destination file (a folder for ``"dcp"``); the previous one stays intact until the new
            one is complete.
        metadata: String key/values stored with the tensors: in the header (``__metadata__``) of a
            safetensors file, as one JSON string under ``"__metadata__"`` in a DCP folder; a torch
            file holds none.
        format: ``"safetensors"``, ``"torch"`` or ``"dcp"``; ``None`` chooses by the extension.

    Raises:
        SaveError: an unknown ``format``, an extension that names no format, the path is a folder
            (a file, or a folder of other files, for ``"dcp"``), its folder does not exist, or it
            cannot be written (also an ``OSError``).
        WeightportError: a value is not a tensor, is on the meta device, has a dtype the
            format cannot hold, or metadata is not ``str -> str``.
    """
    tensors = state_dict_or_module.state_dict() if isinstance(state_dict_or_module, nn.Module) else state_dict_or_module
    if not isinstance(tensors, Mapping):
        raise WeightportError(f"save() takes a state dict or a module, not {type(tensors).__name__}")
    target = os.fspath(path)
    if format is not None and format not in FORMAT_NAMES:
        raise SaveError(
            f"save(): {target}: format={format!r} is none of {', '.join(map(repr, FORMAT_NAMES))} "
            "(or None, to choose by the extension)"
        )
    if format == "dcp":
        from weightport._save_dcp import write_dcp  # imports torch.distributed.checkpoint: only when asked

        write_dcp(tensors, target, metadata)
        return
    if format is not None:
        _check_destination(target)
    if (format or file_format(target)) == "torch":
        if metadata:
            raise WeightportError(f"save(): {target}: metadata is stored in safetensors files and DCP folders only")
        write_torch(tensors, target)
        return
    write_safetensors(tensors, target, metadata)


def write_safetensors(tensors: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file at ``path`` whatever its extension (training
    checkpoints use it), atomically; tied tensors stored once (see :func:`save`)."""
    stored, aliases = _dedupe(tensors)
    header, order = _header(stored, metadata_strings(metadata, aliases))
    with _writing(path) as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name in order:
            _write_tensor(f, stored[name])


def write_torch(tensors: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a torch file that ``torch.load(path, weights_only=True)`` reads, atomically.
    With ``metadata`` (training checkpoints), the dict also holds ``"__metadata__"``: those strings and
    the tied names, as a safetensors header holds them; without, it is a plain state dict."""
    _, aliases = _dedupe(tensors, check_dtype=False)  # the same checks: string keys, tensors, none on meta
    obj: dict[str, Any] = {k: t.detach() for k, t in tensors.items()}
    if metadata is not None:
        obj["__metadata__"] = metadata_strings(metadata, aliases)
    with _writing(path) as f:
        torch.save(obj, f)


def file_format(path: str) -> str:
    """The format ``path``'s extension names; a folder, a missing folder or an unknown extension
    is refused before anything is written."""
    _check_destination(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise SaveError(
            f"save(): {path}: unknown extension {ext or '(none)'!r}; use .safetensors, or .pt/.pth/.bin for "
            "a torch file"
        )
    return FORMATS[ext]


def _check_destination(path: str) -> None:
    """Refuse a file destination that is a folder, or whose folder does not exist."""
    if os.path.isdir(path):
        raise SaveError(
            f"save(): {path} is a folder; give a file name such as {os.path.join(path, 'model.safetensors')}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SaveError(f"save(): {path}: the folder {folder} does not exist; create it first")


@contextlib.contextmanager
def _writing(path: str) -> Iterator[BinaryIO]:
    """:func:`atomic_write`, with the operating system's refusals as :class:`SaveError`."""
    try:
        with atomic_write(path) as f:
            yield f
    except OSError as e:
        if isinstance(e, WeightportError):
            raise
        raise SaveError(f"save(): cannot write {path}: {e.strerror or e}") from e


def _dedupe(tensors: Mapping[str, Any], *, check_dtype: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in tensors.items():
        check_value(name, t)
        if check_dtype and t.dtype not in DTYPE_NAMES:
            raise WeightportError(f"save(): {name!r} has dtype {t.dtype}, which safetensors cannot store")
        key = (
            (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if t.numel()
            else None
        )
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        stored[name] = t.detach()
    return stored, aliases


def _header(stored: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[bytes, list[str]]:
    order = sorted(stored)
    entries: dict[str, Any] = {}
    if meta:
        entries["__metadata__"] = meta
    offset = 0
    for name in order:
        t = stored[name]
        nbytes = t.numel() * t.element_size()
        entries[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % ALIGN)
    return raw, order


def _write_tensor(f: Any, t: torch.Tensor) -> None:
    if t.numel() == 0:
        return
    data = t.contiguous().cpu() if t.device.type != "cpu" or not t.is_contiguous() else t
    f.write(data.reshape(-1).view(torch.uint8).numpy().data)
