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
from weightport.errors import SaveError, WeightportError
from weightport.sources.safetensors import DTYPE_NAMES

ALIGN = 8


#: File formats by extension: what :func:`save` writes.
FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}


def save(
    state_dict_or_module: Mapping[str, torch.Tensor] | nn.Module,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save tensors atomically, in the format the extension names.

    ``.safetensors`` writes safetensors, streamed tensor by tensor; tensors shared under
    several names (tied weights) are stored once, the other names recorded in the metadata
    (they come back when weightport opens the file). ``.pt``, ``.pth`` and ``.bin`` write a
    torch file of the state dict that ``torch.load(path, weights_only=True)`` reads.

    Args:
        state_dict_or_module: A ``Mapping[str, Tensor]`` or a module (its ``state_dict()``).
        path: Destination file; the previous file stays intact until the new one is complete.
        metadata: String key/values stored in the header (``__metadata__``; safetensors only).

    Raises:
        SaveError: the extension is none of those, the path is a folder, its folder does not
            exist, or it cannot be written (also an ``OSError``).
        WeightportError: a value is not a tensor, is on the meta device, has a dtype the
            format cannot hold, or metadata is not ``str -> str``.
    """
    tensors = state_dict_or_module.state_dict() if isinstance(state_dict_or_module, nn.Module) else state_dict_or_module
    if not isinstance(tensors, Mapping):
        raise WeightportError(f"save() takes a state dict or a module, not {type(tensors).__name__}")
    target = os.fspath(path)
    if file_format(target) == "torch":
        if metadata:
            raise WeightportError(f"save(): {target}: metadata is stored in .safetensors files only")
        write_torch(tensors, target)
        return
    write_safetensors(tensors, target, metadata)


def write_safetensors(tensors: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file at ``path`` whatever its extension (training
    checkpoints use it), atomically; tied tensors stored once (see :func:`save`)."""
    stored, aliases = _dedupe(tensors)
    header, order = _header(stored, _metadata(metadata, aliases))
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
        obj["__metadata__"] = _metadata(metadata, aliases)
    with _writing(path) as f:
        torch.save(obj, f)


def file_format(path: str) -> str:
    """The format ``path``'s extension names; a folder, a missing folder or an unknown extension
    is refused before anything is written."""
    if os.path.isdir(path):
        raise SaveError(
            f"save(): {path} is a folder; give a file name such as {os.path.join(path, 'model.safetensors')}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SaveError(f"save(): {path}: the folder {folder} does not exist; create it first")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise SaveError(
            f"save(): {path}: unknown extension {ext or '(none)'!r}; use .safetensors, or .pt/.pth/.bin for "
            "a torch file"
        )
    return FORMATS[ext]


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
        if not isinstance(name, str):
            raise WeightportError(f"save(): key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise WeightportError(f"save(): {name!r} is a {type(t).__name__}, not a tensor")
        if t.is_meta:
            raise WeightportError(f"save(): {name!r} is on the meta device and has no values; load it first")
        if t.layout != torch.strided:
            raise WeightportError(
                f"save(): {name!r} is a {t.layout} tensor; safetensors stores dense tensors (save {name!r}.to_dense())"
            )
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


def _metadata(metadata: Mapping[str, str] | None, aliases: dict[str, str]) -> dict[str, str]:
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise WeightportError(f"save(): metadata must map str to str; {k!r}: {v!r} does not")
    if aliases:
        meta["weightport.aliases"] = json.dumps(aliases, sort_keys=True)
    return meta


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
