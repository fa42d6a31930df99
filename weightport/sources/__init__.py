"""Where tensors come from. :func:`open_source` turns any accepted spec into a :class:`Source`.

Zoo schemes (``torchvision:``, ``timm:``, ``hf:``) are openers in a registry, imported on first
use; see :func:`register_scheme` and :func:`list_schemes`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from weightport._gc import gc_paused
from weightport.errors import SourceError
from weightport.sources._schemes import find_opener, list_schemes, register_scheme
from weightport.sources.base import Source, SourceInfo, TensorMeta
from weightport.sources.files import open_mapping, open_path, verify_sha256
from weightport.sources.memory import TensorSource
from weightport.sources.unwrap import EMA_KEYS, strip_wrapper_prefixes

__all__ = ["Source", "SourceInfo", "TensorMeta", "list_schemes", "open_source", "register_scheme"]

_SPEC = re.compile(r"^(?P<scheme>[a-z][a-z0-9_+-]+):(?!//)(?P<rest>.+)$")


def open_source(
    source: Any,
    *,
    checkpoint_key: str | None = None,
    check_hash: bool = True,
    trust_pickle: bool = False,
    expected_sha256: str | None = None,
    ema: bool | None = None,
) -> Source:
    """Open weights lazily: names, shapes and dtypes are known, no tensor data is read.

    Args:
        source: A path (file or folder), a ``Mapping[str, Tensor]`` (possibly a nested
            checkpoint), an ``nn.Module``, a :class:`Source`, a spec string
            (``torchvision:resnet50``, ``timm:NAME``, ``hf:org/name``), or a torchvision weights
            enum member (``torchvision.models.ResNet18_Weights.IMAGENET1K_V1``: its file in torch
            hub's cache, as ``torchvision:`` opens it).
        checkpoint_key: Take the weights from this key of a nested checkpoint
            (``"state_dict_ema"``; ``"a/b"`` for deeper nesting).
        check_hash: Verify the hash a zoo file name carries (torchvision).
        trust_pickle: Load torch files with full pickle, which can run code from the
            file. Only for files you trust; never needed for plain state dicts.
        expected_sha256: Refuse a local file whose sha256 differs.
        ema: For a checkpoint holding raw weights and an EMA copy of them (timm's
            ``state_dict_ema``, ``model_ema`` …): ``True`` takes the EMA copy (timm's
            ``use_ema=True``) and raises if there is none, ``False`` the raw weights, ``None``
            the raw weights where both exist (the EMA copy where it is all there is).
            ``source.info.notes`` says which was taken and that the other exists.

    Returns:
        A read-only :class:`Source`. ``module.`` / ``_orig_mod.`` prefixes carried by every
        key are already stripped (see ``source.info.prefixes``).

    Raises:
        SourceNotFoundError: Nothing at the path, or a zoo source not cached while offline.
        UnsupportedFormatError, CorruptFileError, UnsafeFileError: The file cannot be read safely.
        HashMismatchError: ``expected_sha256`` or a zoo hash does not match.

    Example:
        >>> src = weightport.open_source("resnet18.pth")
        >>> src.meta("fc.weight").shape
        (1000, 512)
    """
    with gc_paused():
        opened = _open(source, checkpoint_key, check_hash, trust_pickle, expected_sha256, ema)
        if ema and opened.info.wrapper not in EMA_KEYS:
            opened.close()
            raise SourceError(_no_ema(opened.info))
        if expected_sha256 is not None and "sha256" not in opened.info.provenance:
            opened = _verify_sha256(opened, expected_sha256)  # a zoo spec or Source: hash the file it read
        renames, stripped = strip_wrapper_prefixes(opened.keys())
        if stripped:
            opened = opened.renamed(renames, prefixes=opened.info.prefixes + tuple(stripped))
        return opened


def _open(
    source: Any,
    checkpoint_key: str | None,
    check_hash: bool,
    trust_pickle: bool,
    expected_sha256: str | None,
    ema: bool | None,
) -> Source:
    if isinstance(source, Source):
        return source
    if isinstance(source, torch.nn.Module):
        state = source.state_dict()
        info = SourceInfo(kind="module", location=type(source).__name__)
        return TensorSource(state, info, state_dict_metadata=getattr(state, "_metadata", None))
    if isinstance(source, Mapping):
        return open_mapping(source, "<dict>", checkpoint_key, ema)
    if _is_torchvision_weights(source):  # ResNet18_Weights.IMAGENET1K_V1: the file it names, from the cache
        from weightport.sources.zoo_torchvision import open_weights

        return open_weights(source, checkpoint_key=checkpoint_key, check_hash=check_hash, trust_pickle=trust_pickle)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        match = _SPEC.match(text) if isinstance(text, str) else None
        opener = find_opener(match["scheme"]) if match and not os.path.exists(text) else None
        if match and opener is not None:
            return opener(
                match["rest"],
                checkpoint_key=checkpoint_key,
                check_hash=check_hash,
                trust_pickle=trust_pickle,
            )
        # A local file is hashed before it is parsed.
        return open_path(
            text, checkpoint_key=checkpoint_key, trust_pickle=trust_pickle, expected_sha256=expected_sha256, ema=ema
        )
    raise SourceError(
        f"cannot open a {type(source).__name__} as weights: pass a path, a state dict, "
        "an nn.Module, a Source, or a spec such as 'torchvision:resnet50'"
    )


def _no_ema(info: SourceInfo) -> str:
    held = f"its weights are under {info.wrapper!r}" if info.wrapper else "it holds one set of weights"
    return (
        f"{info.location}: ema=True, but it holds no EMA weights (looked for the entries "
        f"{', '.join(map(repr, EMA_KEYS))}); {held}: pass ema=None to take them"
    )


def _is_torchvision_weights(obj: Any) -> bool:
    """A torchvision ``WeightsEnum`` member, told without importing torchvision or the zoo module."""
    return any(c.__name__ == "WeightsEnum" and c.__module__.startswith("torchvision.") for c in type(obj).__mro__)


def _verify_sha256(source: Source, expected: str) -> Source:
    files = [f for f in source.info.files if os.path.isfile(f)]
    if len(files) != 1:
        raise SourceError(
            f"{source.info.location}: expected_sha256 applies to a single file, this source has {len(files)}"
        )
    provenance = {**source.info.provenance, "sha256": verify_sha256(files[0], expected)}
    return source.renamed({}, provenance=provenance)
