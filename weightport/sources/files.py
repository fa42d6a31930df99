"""Opening a local path: one weights file of any supported format, or a folder.

The format is decided by the file's first bytes, not its name: a safetensors file
named ``.bin`` opens as safetensors, and an HTML error page or a Git LFS pointer
saved as ``model.pth`` is named for what it is instead of failing deep in a parser.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from weightport.errors import (
    CorruptFileError,
    HashMismatchError,
    SourceError,
    SourceNotFoundError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from weightport.sources.base import Source, SourceInfo
from weightport.sources.folder import ShardedSource, choose_weights_file
from weightport.sources.memory import FileSource, TensorSource
from weightport.sources.safetensors import looks_like_safetensors, open_safetensors
from weightport.sources.torchfile import ZIP_MAGICS, parse_torch_file, torch_unsafe_globals
from weightport.sources.training import is_training_checkpoint, model_part
from weightport.sources.unwrap import find_weights

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".pickle", ".pth.tar", ".model")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
#: The entry of a torch file's top-level dict that holds string metadata, as a safetensors header does.
METADATA = "__metadata__"
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")

# First bytes of files that are often mistaken for weights, and what to tell the user.
_NOT_WEIGHTS: tuple[tuple[Callable[[bytes], bool], str], ...] = (
    (
        lambda h: h.startswith(b"version https://git-lfs"),
        "a Git LFS pointer, not the weights; run `git lfs pull` in its repository",
    ),
    (
        lambda h: h.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html", b"<?xml")),
        "an HTML/XML page, not weights (a failed download or a login page?)",
    ),
    (lambda h: h.lstrip()[:1] in (b"{", b"["), "a JSON or text file, not weights"),
    (lambda h: h.startswith(b"\x1f\x8b"), "gzip-compressed; decompress it first"),
    (lambda h: h.startswith(b"GGUF"), "a GGUF file (llama.cpp), which weightport does not read"),
    (lambda h: h.startswith(b"\x89HDF"), "an HDF5 file (Keras), which weightport does not read"),
    (lambda h: h.startswith(b"\x93NUMPY"), "a numpy .npy file; load it with numpy and pass a dict of tensors"),
)


def open_path(
    path: str,
    *,
    checkpoint_key: str | None = None,
    trust_pickle: bool = False,
    expected_sha256: str | None = None,
    ema: bool | None = None,
) -> Source:
    """Open a file or folder of weights lazily.

    A weightport training checkpoint (:func:`weightport.checkpoint.save`) yields its model part,
    under the model's own names; ``source.whole`` is every tensor of the file.

    Args:
        path: A weights file, a shard index (``*.index.json``), a folder holding one, or a
            ``torch.distributed.checkpoint`` folder (``.metadata`` and ``*.distcp`` files).
        checkpoint_key: Key of the weights inside a nested checkpoint.
        ema: A checkpoint's EMA weights (``True``), its raw weights (``False``), or its raw
            weights when it has both (``None``); see :func:`weightport.sources.unwrap.find_weights`.
        trust_pickle: Read torch files with full pickle (runs code from the file).
        expected_sha256: Refuse the file unless its sha256 matches; checked *before* parsing.

    Raises:
        SourceNotFoundError: nothing at ``path``, or a folder without weights.
        UnsupportedFormatError: a file that is no weights format weightport reads.
        CorruptFileError: a damaged file (empty, truncated, malformed).
        UnsafeFileError: a pickle whose weights cannot be recovered without running its code.
        HashMismatchError: ``expected_sha256`` does not match.
    """
    if is_dcp_folder(path) or (os.path.basename(path) == ".metadata" and is_dcp_folder(os.path.dirname(path) or ".")):
        if expected_sha256 is not None:
            raise SourceError(f"{path}: expected_sha256 applies to a single file; a DCP checkpoint folder has several")
        from weightport.sources.dcp import open_dcp  # imports torch.distributed.checkpoint: only when needed

        return open_dcp(path, checkpoint_key=checkpoint_key, trust_pickle=trust_pickle, ema=ema)
    if os.path.isdir(path):
        return open_path(
            choose_weights_file(path),
            checkpoint_key=checkpoint_key,
            trust_pickle=trust_pickle,
            expected_sha256=expected_sha256,
            ema=ema,
        )
    if not os.path.exists(path):
        raise SourceNotFoundError(_not_found(path))
    provenance: dict[str, Any] = {}
    if expected_sha256 is not None:
        if path.endswith(".index.json"):
            raise SourceError(
                f"{path}: expected_sha256 applies to a single file; a sharded checkpoint has several "
                "(check each shard, or the repository revision)"
            )
        provenance["sha256"] = verify_sha256(path, expected_sha256)
    if path.endswith(".index.json"):
        return ShardedSource(path, lambda p: open_path(p, trust_pickle=trust_pickle))
    if sniff(path) == "safetensors":
        if checkpoint_key is not None:
            raise SourceError(f"{path}: checkpoint_key= does not apply to a flat safetensors file")
        source: Source = open_safetensors(path)
    else:
        source = _open_torch(path, checkpoint_key, trust_pickle, ema)
    if is_training_checkpoint(source.info.metadata):
        source = model_part(source)
    return source.renamed({}, provenance={**source.info.provenance, **provenance}) if provenance else source


def is_dcp_folder(folder: str) -> bool:
    """Whether ``folder`` is (or was meant to be) a ``torch.distributed.checkpoint`` folder: it holds
    a ``.metadata`` file or ``*.distcp`` data files (:mod:`weightport.sources.dcp` opens it)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return ".metadata" in names or any(n.endswith(".distcp") for n in names)


def sniff(path: str) -> str:
    """``"safetensors"`` or ``"torch"`` (zip, legacy, tar or plain pickle), from the first bytes.

    Raises:
        CorruptFileError: The file is empty.
        UnsupportedFormatError: The file is something else; the message says what, where it can tell.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CorruptFileError(f"{path}: the file is empty (0 bytes); the download or save did not complete")
    if looks_like_safetensors(head):
        return "safetensors"
    if head.startswith(ZIP_MAGICS) or head[:1] == b"\x80" or head[257:262] == b"ustar":
        return "torch"
    lower = path.lower()
    for test, what in _NOT_WEIGHTS:
        if test(head):
            raise UnsupportedFormatError(f"{path}: this file is {what}")
    if lower.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"  # not a valid header: the reader says what is wrong
    if lower.endswith(TORCH_SUFFIXES):
        return "torch"  # perhaps a protocol 0/1 pickle: the reader says what is wrong
    raise UnsupportedFormatError(
        f"{path}: unknown weights format (extension {os.path.splitext(path)[1] or 'none'!r}, first bytes "
        f"{head[:8]!r}); weightport reads safetensors, torch.save files (zip or legacy), pickles of tensors "
        "or numpy arrays, shard indexes (*.index.json) and Hugging Face style folders"
    )


def verify_sha256(path: str, expected: str) -> str:
    """The file's sha256, after checking it equals ``expected``.

    Raises:
        SourceError: ``expected`` is not 64 hex digits.
        HashMismatchError: The digests differ.
    """
    if not isinstance(expected, str) or not _SHA256.match(expected):
        raise SourceError(f"expected_sha256={expected!r} is not a sha256 hex digest (64 hex digits)")
    digest = sha256_file(path)
    if digest != expected.lower():
        raise HashMismatchError(
            f"{path}: sha256 is {digest} but {expected.lower()} was expected; the file is damaged, "
            "incomplete, or not the one you meant"
        )
    return digest


def sha256_file(path: str, chunk: int = 16 * 1024 * 1024) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open_torch(path: str, checkpoint_key: str | None, trust_pickle: bool, ema: bool | None) -> Source:
    parsed = parse_torch_file(path, trust_pickle=trust_pickle)
    metadata = _file_metadata(parsed.obj) if checkpoint_key is None else {}
    try:
        found = find_weights(parsed.obj, path, checkpoint_key, ema)
    except CorruptFileError as e:
        if str(e).startswith(path):
            raise
        raise CorruptFileError(f"{path}: {e}") from e
    except SourceError as e:
        if parsed.unsafe_globals and checkpoint_key is None:
            raise UnsafeFileError(_unrecoverable(path, parsed.unsafe_globals)) from e
        raise
    info = SourceInfo(
        kind=parsed.kind,
        location=path,
        files=(path,),
        wrapper=found.wrapper,
        ignored=tuple(k for k in found.ignored if not (metadata and k == METADATA)),
        placeholders=tuple(parsed.unsafe_globals),
        metadata=metadata,
        notes=tuple(found.notes),
    )
    if parsed.files:
        return FileSource(found.tensors, info, parsed.files, state_dict_metadata=found.metadata)
    return TensorSource(found.tensors, info, state_dict_metadata=found.metadata)


def _file_metadata(obj: Any) -> dict[str, str]:
    """The ``"__metadata__"`` entry (``str -> str``) of a torch file holding one dict: where the torch
    form of a training checkpoint keeps what safetensors keeps in its header."""
    meta = obj.get(METADATA) if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        return dict(meta)
    return {}


def _unrecoverable(path: str, found: list[str]) -> str:
    torch_view = torch_unsafe_globals(path)
    listed = ", ".join(found[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
    extra = f" torch.load(weights_only=True) would need: {', '.join(torch_view[:20])}." if torch_view else ""
    return (
        f"{path}: no weights could be recovered without running code from the file. It references "
        f"these globals (kept inert, nothing was imported or run): {listed}.{extra} What you can do: pass "
        "checkpoint_key= if the weights sit inside one of its entries; or, where the classes are importable "
        "and you trust the file, load it once and re-save model.state_dict() with weightport.save(); or pass "
        "trust_pickle=True, which runs the file's code"
    )


def _not_found(path: str) -> str:
    msg = f"{path}: no such file or folder"
    if ":" in path and not os.path.isabs(path):
        msg += "; for a zoo source use a spec like 'torchvision:resnet50', 'timm:NAME' or 'hf:org/name'"
    return msg


def open_mapping(obj: Any, location: str, checkpoint_key: str | None, ema: bool | None = None) -> TensorSource:
    found = find_weights(obj, location, checkpoint_key, ema)
    info = SourceInfo(
        kind="dict", location=location, wrapper=found.wrapper, ignored=tuple(found.ignored), notes=tuple(found.notes)
    )
    return TensorSource(found.tensors, info, state_dict_metadata=found.metadata)
