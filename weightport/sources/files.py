"""Opening a local path: one weights file of any supported format, or a folder."""

from __future__ import annotations

import os
import zipfile
from typing import Any

from weightport.errors import SourceError, SourceNotFoundError, UnsafeFileError, UnsupportedFormatError
from weightport.sources.base import Source, SourceInfo
from weightport.sources.folder import ShardedSource, choose_weights_file
from weightport.sources.memory import FileSource, TensorSource
from weightport.sources.safetensors import is_safetensors, open_safetensors
from weightport.sources.torchfile import parse_torch_file
from weightport.sources.unwrap import find_weights

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".pickle", ".pth.tar", ".model")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def open_path(path: str, *, checkpoint_key: str | None = None, trust_pickle: bool = False) -> Source:
    """Open a file or folder of weights lazily.

    Raises:
        SourceNotFoundError: nothing at ``path``, or a folder without weights.
        UnsupportedFormatError: a file that is no weights format weightport reads.
    """
    if os.path.isdir(path):
        return open_path(choose_weights_file(path), checkpoint_key=checkpoint_key, trust_pickle=trust_pickle)
    if not os.path.exists(path):
        raise SourceNotFoundError(_not_found(path))
    if path.endswith(".index.json"):
        return ShardedSource(path, lambda p: open_path(p, trust_pickle=trust_pickle))
    kind = _sniff(path)
    if kind == "safetensors":
        source: Source = open_safetensors(path)
        if checkpoint_key is not None:
            raise SourceError(f"{path}: checkpoint_key= does not apply to a flat safetensors file")
        return source
    return _open_torch(path, checkpoint_key, trust_pickle)


def _sniff(path: str) -> str:
    lower = path.lower()
    if os.path.getsize(path) == 0:
        return "torch"  # the reader raises a clear 'empty file' error
    if is_safetensors(path):
        return "safetensors"
    if lower.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"  # not a valid header: let the reader explain what is wrong
    if lower.endswith(TORCH_SUFFIXES) or zipfile.is_zipfile(path) or _starts_like_pickle(path):
        return "torch"
    raise UnsupportedFormatError(
        f"{path}: unknown weights format (extension {os.path.splitext(path)[1] or 'none'!r}); "
        f"weightport reads {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} files and "
        "Hugging Face style folders"
    )


def _starts_like_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _open_torch(path: str, checkpoint_key: str | None, trust_pickle: bool) -> Source:
    parsed = parse_torch_file(path, trust_pickle=trust_pickle)
    try:
        found = find_weights(parsed.obj, path, checkpoint_key)
    except SourceError as e:
        if parsed.unsafe_globals:
            raise UnsafeFileError(
                f"{path}: no weights could be recovered without running code from the file. "
                f"It references: {', '.join(parsed.unsafe_globals[:20])}. If you trust the file, "
                "pass trust_pickle=True; better, re-save its state_dict() with weightport.save()"
            ) from e
        raise
    info = SourceInfo(
        kind=parsed.kind,
        location=path,
        files=(path,),
        wrapper=found.wrapper,
        ignored=tuple(found.ignored),
        placeholders=tuple(parsed.unsafe_globals),
        notes=tuple(found.notes),
    )
    if parsed.files:
        return FileSource(found.tensors, info, parsed.files, state_dict_metadata=found.metadata)
    return TensorSource(found.tensors, info, state_dict_metadata=found.metadata)


def _not_found(path: str) -> str:
    msg = f"{path}: no such file or folder"
    if ":" in path and not os.path.isabs(path):
        msg += "; for a zoo source use a spec like 'torchvision:resnet50', 'timm:NAME' or 'hf:org/name'"
    return msg


def open_mapping(obj: Any, location: str, checkpoint_key: str | None) -> TensorSource:
    found = find_weights(obj, location, checkpoint_key)
    info = SourceInfo(
        kind="dict", location=location, wrapper=found.wrapper, ignored=tuple(found.ignored), notes=tuple(found.notes)
    )
    return TensorSource(found.tensors, info, state_dict_metadata=found.metadata)
