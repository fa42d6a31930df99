"""Training checkpoints: save, resume exactly, rotate, and resume into a changed architecture.

    >>> import weightport as wp
    >>> wp.checkpoint.save("last.safetensors", model=model, optimizer=opt, scheduler=sched, epoch=3, step=1200)
    >>> state = wp.checkpoint.resume("last.safetensors", model=model, optimizer=opt, scheduler=sched)
    >>> state.epoch, state.step
    (3, 1200)

A checkpoint is one safetensors file (or, named ``.pt``/``.pth``/``.bin``, one torch file of the
same tensors and metadata): model weights, optimizer state tensors and RNG states are tensors,
everything else is JSON in the metadata. Nothing is pickled. ``wp.transfer("last.safetensors",
model)`` (or ``"checkpoint:last.safetensors"``) loads only the weights. A sharded model's
(FSDP2, DTensor parameters) checkpoint is one DCP folder that every rank writes its shards into
and resumes from (``_dcp``, ``_sharded``).
"""

from __future__ import annotations

import os
from typing import Any

from weightport.checkpoint._format import CheckpointFile
from weightport.checkpoint._info import CheckpointInfo, info
from weightport.checkpoint._manager import Manager
from weightport.checkpoint._optim import OptimizerReport
from weightport.checkpoint._resume import ResumeState, resume
from weightport.checkpoint._save import register_wrapper, save, unwrap
from weightport.errors import CheckpointError
from weightport.sources import register_scheme
from weightport.sources.training import PartSource

__all__ = [
    "CheckpointInfo",
    "Manager",
    "OptimizerReport",
    "ResumeState",
    "info",
    "register_wrapper",
    "resume",
    "save",
    "unwrap",
    "weights",
]


def weights(path: str | os.PathLike[str]) -> PartSource:
    """The model weights of a checkpoint as a lazy :class:`~weightport.Source`, under the model's own names.

    ``wp.transfer(wp.checkpoint.weights(p), model)`` (or the spec ``"checkpoint:" + p``) loads
    the weights alone, e.g. for evaluation or to fine-tune from them with a new optimizer.

    Raises:
        CheckpointError: ``path`` is not a weightport training checkpoint.
    """
    return CheckpointFile(path).part("model")


def _open_scheme(rest: str, *, checkpoint_key: str | None = None, **_: Any) -> PartSource:
    if checkpoint_key not in (None, "model"):
        raise CheckpointError(
            f"checkpoint:{rest}: checkpoint_key={checkpoint_key!r} does not apply; "
            "the 'checkpoint:' spec gives the model weights"
        )
    return weights(rest)


register_scheme("checkpoint", _open_scheme)
