"""``torchvision:`` sources: torchvision's pretrained weights, through its weights API and torch hub's cache.

Specs: ``torchvision:resnet50`` (the ``DEFAULT`` weights), ``torchvision:resnet50.IMAGENET1K_V2``,
``torchvision:resnet50.DEFAULT`` and the enum name ``torchvision:ResNet50_Weights.IMAGENET1K_V2``;
the enum member itself (``ResNet50_Weights.IMAGENET1K_V2``) opens the same way (:func:`open_weights`).
The file is read from ``$TORCH_HOME/hub/checkpoints`` when present, downloaded there only when
downloads are allowed, and (``check_hash=True``) verified against the sha256 prefix its name
carries (``resnet50-11ad3fa6.pth``), as torch hub does when it downloads.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from weightport.errors import HashMismatchError, SourceError, SourceNotFoundError
from weightport.sources.base import Source
from weightport.sources.files import open_path, sha256_file
from weightport.sources.zoo_hf import hub_offline

log = logging.getLogger(__name__)

# torch.hub's convention: "name-<first hex digits of the sha256>.ext"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, within one process


@dataclass(frozen=True)
class CachedFile:
    """A zoo file in torch hub's checkpoint cache.

    Attributes:
        path: Where it is on disk.
        url: Where it comes from.
        hash_prefix: The sha256 prefix its name carries, if any.
        sha256: Its full sha256 when it was verified, else ``None``.
        downloaded: Whether this call downloaded it.
    """

    path: str
    url: str
    hash_prefix: str | None
    sha256: str | None
    downloaded: bool


def torch_hub_checkpoints() -> str:
    """``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``), resolved at call time."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def fetch_url(url: str, *, check_hash: bool, fetch_hint: str, label: str | None = None) -> CachedFile:
    """The torch hub cache copy of ``url``, downloading it when allowed; hash-checked when asked.

    Args:
        url: The file's address; its last path segment is the cache file name.
        check_hash: Verify the sha256 prefix the file name carries.
        fetch_hint: A command that fetches the file, for the not-cached error.
        label: The spec the user wrote, to start error messages with.

    Raises:
        SourceNotFoundError: Not cached and downloads are off or failed.
        HashMismatchError: The file's sha256 does not start with the prefix in its name.
    """
    folder = torch_hub_checkpoints()
    name = os.path.basename(urlparse(url).path)
    path = os.path.join(folder, name)
    match = _HASH_IN_NAME.search(name)
    prefix = match.group(1) if match else None
    downloaded = False
    if not os.path.isfile(path):
        _download(url, path, prefix if check_hash else None, fetch_hint, label or url)
        downloaded = True
    digest = verify_prefix(path, prefix) if check_hash and prefix else None
    return CachedFile(path, url, prefix, digest, downloaded)


def verify_prefix(path: str, prefix: str) -> str:
    """The file's sha256, after checking that it starts with ``prefix``.

    Raises:
        HashMismatchError: It does not; the message names the file, both hashes and the way out.
    """
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key) or sha256_file(path)
    if not digest.startswith(prefix):
        raise HashMismatchError(
            f"{path}: sha256 is {digest} but its name promises a hash starting {prefix}; the file is damaged or "
            "not the published one. Delete it to download it again, or pass check_hash=False "
            "(CLI: --no-check-hash) if you trust it"
        )
    _VERIFIED[key] = digest
    return digest


def _download(url: str, path: str, hash_prefix: str | None, fetch_hint: str, label: str) -> None:
    folder = os.path.dirname(path)
    if hub_offline():
        raise SourceNotFoundError(
            f"{label}: {url} is not in torch hub's cache (looked for {path}) and downloads are off "
            f"(HF_HUB_OFFLINE / WEIGHTPORT_OFFLINE); fetch it with `{fetch_hint}`"
        )
    import torch.hub

    os.makedirs(folder, exist_ok=True)
    log.info("downloading %s to %s", url, path)
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix, progress=True)
    except RuntimeError as e:
        if "hash" in str(e):
            raise HashMismatchError(f"{label}: {url}: the download does not match the hash in its name ({e})") from e
        raise SourceError(f"{label}: {url}: the download failed ({e})") from e
    except (urllib.error.URLError, OSError) as e:
        raise SourceNotFoundError(
            f"{label}: {url} is not in torch hub's cache (looked for {path}) and the download failed ({e}); "
            f"fetch it with `{fetch_hint}` where the network is reachable, or copy the file there"
        ) from e


def resolve_weights(spec: str) -> Any:
    """The torchvision ``WeightsEnum`` member a spec names.

    Raises:
        SourceError: torchvision is not installed.
        SourceNotFoundError: Unknown model or weights tag (the message lists the known ones).
    """
    try:
        from torchvision.models import get_model_weights, get_weight, list_models
    except ImportError as e:
        raise SourceError("torchvision: sources need torchvision: pip install 'weightport[zoo]'") from e
    if "_Weights." in spec:
        try:
            return get_weight(spec)
        except (ValueError, KeyError, AttributeError) as e:
            raise SourceNotFoundError(f"torchvision:{spec}: torchvision has no weights {spec!r}") from e
    name, _, tag = spec.partition(".")
    if name not in list_models():
        raise SourceNotFoundError(f"torchvision:{spec}: torchvision has no model {name!r}; see list_models()")
    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError) as e:
        raise SourceNotFoundError(f"torchvision:{spec}: torchvision has no pretrained weights for {name!r}") from e
    try:
        return enum[tag or "DEFAULT"]
    except KeyError:
        known = ", ".join(m.name for m in enum)
        raise SourceNotFoundError(
            f"torchvision:{spec}: {name} has no weights {tag!r}; known: {known}, DEFAULT"
        ) from None


def open_torchvision(
    rest: str, *, checkpoint_key: str | None = None, check_hash: bool = True, trust_pickle: bool = False
) -> Source:
    """Open torchvision pretrained weights lazily (the ``torchvision`` scheme opener).

    Raises:
        SourceNotFoundError: Unknown model or weights, or not cached while offline.
        HashMismatchError: ``check_hash`` and the file does not match the hash in its name.
    """
    weights = resolve_weights(rest)
    return open_weights(
        weights,
        checkpoint_key=checkpoint_key,
        check_hash=check_hash,
        trust_pickle=trust_pickle,
        label=f"torchvision:{rest}",
    )


def open_weights(
    weights: Any,
    *,
    checkpoint_key: str | None = None,
    check_hash: bool = True,
    trust_pickle: bool = False,
    label: str | None = None,
) -> Source:
    """Open the file a torchvision ``WeightsEnum`` member names, from torch hub's cache, as the
    ``torchvision:`` scheme does (downloaded only when downloads are allowed).

    Raises:
        SourceNotFoundError: Not cached while offline (the message says where it looked and how to fetch it).
        HashMismatchError: ``check_hash`` and the file does not match the hash in its name.
    """
    label = label or f"torchvision:{weights!r}"
    hint = f"python -c \"from torchvision.models import get_weight; get_weight('{weights!r}').get_state_dict()\""
    cached = fetch_url(weights.url, check_hash=check_hash, fetch_hint=hint, label=label)
    source = open_path(cached.path, checkpoint_key=checkpoint_key, trust_pickle=trust_pickle)
    meta = weights.meta
    provenance: dict[str, Any] = {
        "weights": repr(weights),
        "url": cached.url,
        "file": cached.path,
        "hash_prefix": cached.hash_prefix,
        "hash_checked": cached.sha256 is not None,
        "format": source.info.kind,
    }
    if cached.sha256:
        provenance["sha256"] = cached.sha256
    if isinstance(meta.get("categories"), (list, tuple)):
        provenance["categories"] = len(meta["categories"])
    for key in ("num_params", "recipe", "min_size"):
        if key in meta:
            provenance[key] = meta[key]
    return source.renamed({}, kind="torchvision", location=label, provenance={**source.info.provenance, **provenance})
