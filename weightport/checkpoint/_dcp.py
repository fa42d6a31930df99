"""Training checkpoints of sharded models: one DCP folder, written and read by every rank.

A model whose parameters are DTensors (FSDP2's ``fully_shard``, tensor parallelism) is saved with
PyTorch's distributed checkpointing (``torch.distributed.checkpoint``, through
``weightport.save(..., format="dcp")``): every rank writes its own shards, nobody gathers a full
tensor, and the folder appears whole or not at all. Tensor keys are those of the file form
(``model/<name>``, ``optimizer/state/<index>/exp_avg``, ``rng/<rank>/torch`` ...), each under its
global shape; the JSON document the file form keeps in its metadata is the folder's
``__metadata__`` entry, with every rank's RNG states (``rng_by_rank``) and the world size. The
folder opens as a source (:mod:`weightport.sources.dcp`) like any DCP folder.

This module holds what only the sharded form needs: the state dicts through DCP's
``get_state_dict``, the agreement between ranks, and the save.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from weightport.checkpoint._format import BODY_KEY, FORMAT, FORMAT_KEY, VERSION
from weightport.distributed.agree import dcp_failures, describe, exchange, failed
from weightport.errors import CheckpointError


def distributed() -> bool:
    """Whether this process is in an initialised ``torch.distributed`` process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if distributed() else 1


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2, tensor parallel)."""
    if not distributed():  # a DTensor lives on a device mesh, which needs a process group
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def model_class(model: nn.Module) -> str:
    """The model's own class, not the one FSDP2 makes for it (``FSDP<Name>``, a subclass of it and ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    cls: type = type(model)
    if issubclass(cls, FSDPModule):
        cls = next((b for b in cls.__bases__ if not issubclass(b, FSDPModule)), cls)
    return f"{cls.__module__}.{cls.__qualname__}"


# -- agreement between ranks ---------------------------------------------------------------------------


def agree(error: BaseException | None, where: str, what: str) -> None:
    """Every rank says whether its step failed; if any did, every rank raises a CheckpointError naming
    the ranks and their messages. One ``all_gather_object`` under the process group's own timeout;
    on one process this raises ``error`` itself. Call it on every rank, with or without an error."""
    if not distributed() or world_size() == 1:
        if error is not None:
            raise error
        return
    own = None if error is None else (str(error) or type(error).__name__)
    answers = exchange(own)
    if failed(answers):
        raise CheckpointError(f"{where}: {what} failed on {describe(failed(answers), len(answers))}") from error


@contextlib.contextmanager
def agreement(sharded: bool, where: str, what: str) -> Iterator[None]:
    """Run the block, then :func:`agree` on its outcome when ``sharded`` (so every rank raises or none).

    The block must hold no collective: a rank that fails before one would leave the others waiting
    in it (until the process group's timeout)."""
    if not sharded:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
        error = e
    agree(error, where, what)


@contextlib.contextmanager
def dcp_errors(where: str, what: str) -> Iterator[None]:
    """DCP's ``CheckpointException`` (a ``BaseException``, raised on every rank when any rank failed)
    as a CheckpointError that names the failing ranks."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        yield
    except CheckpointException as e:
        raise CheckpointError(f"{where}: {what} failed ({describe(dcp_failures(e)) or e})") from None


# -- reading -------------------------------------------------------------------------------------------


def own_rng(body: dict[str, Any]) -> Any:
    """This rank's saved RNG states (rank 0's on a single process), or ``None`` when there are none for it
    (saved with ``rng=False``, or by fewer ranks than there are now)."""
    per_rank = body.get("rng_by_rank")
    if not isinstance(per_rank, list):
        return body.get("rng")
    return per_rank[rank()] if rank() < len(per_rank) else None


def reader(folder: str) -> Any:
    """A DCP ``FileSystemReader`` of ``folder`` that reads ``.metadata`` with weightport's restricted
    unpickler (DCP's own reader unpickles it with ``pickle.load``)."""
    from torch.distributed.checkpoint import FileSystemReader

    from weightport.sources._dcp_metadata import read_metadata

    index = read_metadata(folder).metadata

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return index

    return _Reader(folder)


# -- saving -------------------------------------------------------------------------------------------


def state_dicts(model: nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any] | None, list[list[str]]]:
    """The model's state dict (DTensors stay sharded) and the optimizer's in torch's own form
    (state by parameter index), with the model name of each index, through DCP's ``get_state_dict``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model), None, []
    with _state_kept_empty(optimizer):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        if not optimizer.state:
            optim_sd = {**optim_sd, "state": {}}
    by_index, names = indexed(optim_sd)
    return model_sd, by_index, names


@contextlib.contextmanager
def _state_kept_empty(optimizer: Any) -> Iterator[None]:
    """``get_state_dict`` gives an optimizer without state zero state (a step at lr 0); an optimizer
    that had none keeps none, so a run saved before its first step continues as it would have."""
    empty = not optimizer.state
    try:
        yield
    finally:
        if empty:
            optimizer.state.clear()


def indexed(optim_sd: Mapping[str, Any]) -> tuple[dict[str, Any], list[list[str]]]:
    """DCP's optimizer state dict (keyed by parameter name) in torch's form (keyed by index)."""
    order = [name for group in optim_sd["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    state = {index[name]: value for name, value in optim_sd["state"].items() if name in index}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]
    return {"state": state, "param_groups": groups}, [[name] for name in order]


def check_folder_path(path: str) -> None:
    """A sharded checkpoint is a folder: refuse a file name, or a file in the way."""
    if path.endswith((".safetensors", ".pt", ".pth", ".bin")) or os.path.isfile(path):
        raise CheckpointError(
            f"{path}: the model is sharded (DTensor parameters), so its checkpoint is a DCP folder that every "
            f"rank writes its shards into; pass a folder path without a file extension "
            f"(e.g. {os.path.splitext(path)[0]})"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{path}: the folder {parent} does not exist; create it first")


def write(
    path: str, tensors: dict[str, torch.Tensor], body: dict[str, Any], rng_doc: Any, prepared: BaseException | None
) -> None:
    """Every rank: agree on what each prepared (its RNG states; rank 0's document for all), then write the
    folder together with ``weightport.save(..., format="dcp")`` (each rank its shards, atomically)."""
    from weightport.saving import save

    own = None if prepared is None else (str(prepared) or type(prepared).__name__)
    text = None if prepared is not None else _text(body)
    outcome: list[Any] = [(own, (rng_doc, text))]
    if distributed() and world_size() > 1:
        outcome = exchange(own, (rng_doc, text))
    if failed(outcome):
        raise CheckpointError(
            f"{path}: preparing the checkpoint failed on {describe(failed(outcome), len(outcome))}; nothing was written"
        ) from prepared
    outcome = [(o[0], *o[1]) for o in outcome]  # (failure, rng_doc, text) per rank
    document = json.loads(outcome[0][2])  # rank 0's, so that every rank stores the same document
    document["world_size"] = len(outcome)
    if rng_doc is not None:
        document["rng_by_rank"] = [o[1] for o in outcome]
    save(tensors, path, metadata={FORMAT_KEY: FORMAT, BODY_KEY: _text(document)}, format="dcp")


def _text(body: dict[str, Any]) -> str:
    try:
        return json.dumps({"version": VERSION, **body}, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:  # the encoder makes this unreachable; keep the message useful
        raise CheckpointError(f"checkpoint metadata is not JSON ({e})") from e
