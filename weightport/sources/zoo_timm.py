"""``timm:`` sources: timm's pretrained weights, resolved through timm's pretrained configs.

Spec: ``timm:MODEL`` (its default pretrained tag), ``timm:MODEL.TAG``
(``timm:vit_base_patch16_224.augreg_in21k``), or timm's ``timm:hf-hub:org/name`` (same as
``hf:org/name``). The config says where the weights live, in timm's own order of preference:
a local ``file``, then the Hugging Face hub repo ``hf_hub_id`` (optionally a ``hf_hub_filename``
in it), read through :mod:`weightport.sources.zoo_hf` and huggingface_hub's cache, then ``url``,
read through torch hub's cache like torchvision's weights.
Offline, a hub repo that is not cached falls back to the url's file when that one is cached.

Files on the hub (``timm/…`` repos) are already in timm's layout. Files from an original ``url``
may need the model's ``checkpoint_filter_fn`` (timm applies it when it loads them); the report's
provenance says which way the weights came.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from weightport.errors import SourceError, SourceNotFoundError
from weightport.sources.base import Source
from weightport.sources.files import open_path
from weightport.sources.zoo_hf import open_hf
from weightport.sources.zoo_torchvision import fetch_url, torch_hub_checkpoints

log = logging.getLogger(__name__)


def pretrained_cfg(spec: str) -> Any:
    """timm's ``PretrainedCfg`` for ``MODEL[.TAG]``.

    Raises:
        SourceError: timm is not installed.
        SourceNotFoundError: Unknown model, unknown tag, or a model without pretrained weights.
    """
    try:
        import timm
        from timm.models import get_pretrained_cfg
    except ImportError as e:
        raise SourceError("timm: sources need timm: pip install 'weightport[zoo]'") from e
    arch, _, tag = spec.partition(".")
    if not timm.is_model(arch):
        raise SourceNotFoundError(f"timm:{spec}: timm has no model {arch!r}; see timm.list_models()")
    try:
        cfg = get_pretrained_cfg(spec, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        tags = timm.list_pretrained(f"{arch}.*")
        known = ", ".join(t.partition(".")[2] for t in tags) or "none"
        what = f"no pretrained tag {tag!r}" if tag else "no pretrained weights"
        raise SourceNotFoundError(f"timm:{spec}: {arch} has {what}; its tags: {known}")
    return cfg


def open_timm(
    rest: str, *, checkpoint_key: str | None = None, check_hash: bool = True, trust_pickle: bool = False
) -> Source:
    """Open timm pretrained weights lazily (the ``timm`` scheme opener).

    Raises:
        SourceNotFoundError: Unknown model or tag, or the weights are not cached while offline.
        HashMismatchError: A url file whose name carries a hash prefix does not match it.
    """
    if rest.startswith("hf-hub:"):  # timm's own spelling of a hub repo: timm:hf-hub:org/name
        source = open_hf(rest[len("hf-hub:") :], checkpoint_key=checkpoint_key, trust_pickle=trust_pickle)
        provenance = {**source.info.provenance, "via": "hf-hub"}
        return source.renamed({}, kind="timm", location=f"timm:{rest}", provenance=provenance)
    cfg = pretrained_cfg(rest)
    options: dict[str, Any] = {"checkpoint_key": checkpoint_key, "trust_pickle": trust_pickle}
    if cfg.file:
        source, via = open_path(os.path.expanduser(cfg.file), **options), "file"
    elif cfg.hf_hub_id:
        source, via = _from_hub(cfg, check_hash, options)
    else:
        source, via = _from_url(cfg, check_hash, options), "url"
    provenance = {
        **source.info.provenance,
        "timm_model": cfg.architecture,
        "timm_tag": cfg.tag,
        "via": via,
        "num_classes": cfg.num_classes,
        "license": cfg.license,
    }
    return source.renamed({}, kind="timm", location=f"timm:{rest}", provenance=provenance)


def _from_hub(cfg: Any, check_hash: bool, options: dict[str, Any]) -> tuple[Source, str]:
    spec = cfg.hf_hub_id + (f":{cfg.hf_hub_filename}" if cfg.hf_hub_filename else "")
    try:
        return open_hf(spec, check_hash=check_hash, **options), "hf-hub"
    except SourceNotFoundError as e:
        if cfg.url and _url_cached(cfg.url):
            log.info("timm:%s: %s is not cached; using the cached %s", cfg.architecture, spec, cfg.url)
            return _from_url(cfg, check_hash, options), "url"
        raise SourceNotFoundError(f"timm:{cfg.architecture}.{cfg.tag}: {e}") from e


def _from_url(cfg: Any, check_hash: bool, options: dict[str, Any]) -> Source:
    name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    hint = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    cached = fetch_url(cfg.url, check_hash=check_hash, fetch_hint=hint, label=f"timm:{name}")
    source = open_path(cached.path, **options)
    extra = {"url": cached.url, "file": cached.path, "hash_prefix": cached.hash_prefix, "format": source.info.kind}
    if cached.sha256:
        extra["sha256"] = cached.sha256
    return source.renamed({}, provenance={**source.info.provenance, **extra})


def _url_cached(url: str) -> bool:
    return os.path.isfile(os.path.join(torch_hub_checkpoints(), url.rstrip("/").rsplit("/", 1)[-1]))
