"""Recognising a weightport training checkpoint among weights files, and exposing its model part.

A file written by :func:`weightport.checkpoint.save` says what it is: its metadata (the
safetensors header, or the ``"__metadata__"`` entry of the torch form) carries
``weightport.format = "checkpoint"``. Given as a plain path to ``transfer``, ``plan`` or
``open_source``, such a file yields its model part under the model's own names (no ``model/``
prefix), with a note that the optimizer and scheduler state were left for
:func:`weightport.checkpoint.resume`. The marker's keys are declared here, in the sources layer,
so the checkpoint package (which builds on the sources) and the file openers share them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from weightport.sources.base import Source, SourceInfo, TensorMeta

__all__ = ["BODY_KEY", "FORMAT", "FORMAT_KEY", "KIND", "PartSource", "is_training_checkpoint", "model_part"]

FORMAT_KEY = "weightport.format"
BODY_KEY = "weightport.checkpoint"
FORMAT = "checkpoint"
#: ``SourceInfo.kind`` of a checkpoint's part.
KIND = "weightport-checkpoint"


def is_training_checkpoint(metadata: Mapping[str, str]) -> bool:
    """Whether a file's metadata marks a weightport training checkpoint."""
    return metadata.get(FORMAT_KEY) == FORMAT and BODY_KEY in metadata


class PartSource(Source):
    """The tensors of one part (``model/...``) of an opened checkpoint, under their own names.

    Attributes:
        whole: The source of the whole file, every tensor under its namespaced key.
    """

    def __init__(self, inner: Source, part: str, info: SourceInfo, hide: frozenset[str] = frozenset()) -> None:
        prefix = f"{part}/"
        super().__init__({k[len(prefix) :]: k for k in inner if k.startswith(prefix) and k not in hide}, info)
        self.whole = inner
        self._inner = inner

    def _meta_of(self, handle: str) -> TensorMeta:
        return self._inner.meta(handle)

    def _view_of(self, handle: str) -> torch.Tensor:
        return self._inner.view(handle)

    def _mapped_view_of(self, handle: str) -> torch.Tensor | None:
        return self._inner.mapped_view(handle)

    def _read_into(self, handle: str, out: torch.Tensor) -> None:
        self._inner.read_into(handle, out)

    def _read_many(self, handles: list[str], outs: list[torch.Tensor]) -> None:
        self._inner.read_into_many(handles, outs)

    def _alias_key(self, handle: str) -> Any:
        inner = self._inner
        return inner._alias_key(inner._handle(handle))

    def _release(self, handle: str) -> None:
        self._inner.release(handle)

    def close(self) -> None:
        self._inner.close()


def model_part(whole: Source) -> PartSource:
    """The model part of an opened training checkpoint, with a note on what was left out."""
    body = _body(whole.info.metadata)
    step = body.get("step")
    parts = [p for p in ("optimizer", "scheduler", "scaler", "rng", "extra") if p in body]
    left = f"; {', '.join(parts)} state ignored" if parts else ""
    note = (
        f"weightport training checkpoint ({f'step {step}' if isinstance(step, int) else 'no step saved'}): "
        f"model part taken{left}; use weightport.checkpoint.resume to resume training"
    )
    info = SourceInfo(
        kind=KIND,
        location=whole.info.location,
        files=whole.info.files,
        metadata=whole.info.metadata,
        provenance=whole.info.provenance,
        notes=(note,),
    )
    return PartSource(whole, "model", info)


def _body(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The checkpoint's JSON document, or ``{}`` when it does not parse (the note then says less;
    :func:`weightport.checkpoint.resume` checks the document and names what is wrong)."""
    try:
        body = json.loads(metadata[BODY_KEY])
    except (ValueError, RecursionError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}
