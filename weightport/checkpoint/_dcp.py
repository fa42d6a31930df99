"""Training checkpoints of sharded models: one DCP folder, written and read by every rank.

A model whose parameters are DTensors (FSDP2's ``fully_shard``, tensor parallelism) is saved with
PyTorch's distributed checkpointing (``torch.distributed.checkpoint``): every rank writes its own
shards, nobody gathers a full tensor. The folder holds::

    PATH/.metadata        DCP's index: every tensor's global shape and which file holds which chunk
    PATH/__<rank>_0.distcp  each rank's shards (model weights, optimizer moments, its RNG state)
    PATH/weightport.json  the checkpoint's JSON document, the same one the file form keeps in its
                          metadata (epoch, step, hyper-parameters, scheduler, extra; tensors by key)

Tensor keys are those of the file form (``model/<name>``, ``optimizer/state/<index>/exp_avg``,
``rng/<rank>/torch`` ...), each tensor under its global shape. ``weightport.json`` is written
last, into a temporary folder that rank 0 renames into place once every rank is done: a folder
without it is no checkpoint. This module holds the format (reading it on one process too, as a
lazy :class:`~weightport.Source`), the save, and the agreement between ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightport.checkpoint._format import BODY_KEY, FORMAT, FORMAT_KEY, VERSION, CheckpointFile, parse_body
from weightport.errors import CheckpointError, WeightportError
from weightport.sources.base import Source, SourceInfo, TensorMeta

log = logging.getLogger(__name__)

#: The JSON document of a folder checkpoint.
BODY_FILE = "weightport.json"
#: ``SourceInfo.kind`` of a DCP folder checkpoint's tensors.
KIND = "weightport-checkpoint-dcp"


def distributed() -> bool:
    """Whether this process is in an initialised ``torch.distributed`` process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if distributed() else 1


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2, tensor parallel)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def is_folder_checkpoint(path: str) -> bool:
    """Whether ``path`` is a folder written by :func:`weightport.checkpoint.save` for a sharded model."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, BODY_FILE))


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
    messages: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(messages, own)
    failure = failures(messages)
    if failure:
        raise CheckpointError(f"{where}: {what} failed on {failure}") from error


def failures(messages: list[str | None]) -> str:
    """``"ranks 0, 1 of 2: message"`` for the ranks whose message is not ``None`` (``""`` when none),
    each distinct message once."""
    by_message: dict[str, list[int]] = {}
    for r, m in enumerate(messages):
        if m is not None:
            by_message.setdefault(m, []).append(r)
    return "; ".join(
        f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))} of {len(messages)}: {m}"
        for m, ranks in by_message.items()
    )


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
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        failures = "; ".join(f"rank {r}: {type(exc).__name__}: {exc}" for r, (exc, _) in e.failures.items())
        raise CheckpointError(f"{where}: {what} failed ({failures or e})") from None


# -- the folder on one process ---------------------------------------------------------------------------


class DcpSource(Source):
    """The tensors of a DCP folder under their keys and global shapes, read whole and lazily on one process
    (or served from tensors the ranks loaded together, see :meth:`preload`)."""

    def __init__(self, path: str, metadata: Mapping[str, str]) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        try:
            index = FileSystemReader(path).read_metadata().state_dict_metadata
        except Exception as e:  # a missing or damaged .metadata (DCP's own index, a pickle)
            raise CheckpointError(f"{path}: the DCP index (.metadata) cannot be read ({type(e).__name__}: {e})") from e
        tensors = {k: v for k, v in index.items() if isinstance(v, TensorStorageMetadata)}
        files = tuple(sorted(str(p) for p in Path(path).glob("*.distcp")))
        super().__init__(
            {k: k for k in tensors}, SourceInfo(kind=KIND, location=path, files=files, metadata=dict(metadata))
        )
        self._index = tensors
        self._path = path
        self._loaded: dict[str, torch.Tensor] = {}

    def _meta_of(self, handle: str) -> TensorMeta:
        entry = self._index[handle]
        return TensorMeta(tuple(entry.size), entry.properties.dtype)

    def _view_of(self, handle: str) -> torch.Tensor:
        if handle in self._loaded:
            return self._loaded[handle]
        import torch.distributed.checkpoint as dcp

        meta = self._meta_of(handle)
        out = {handle: torch.empty(meta.shape, dtype=meta.dtype)}
        with dcp_errors(self._path, f"reading {handle!r}"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(out, checkpoint_id=self._path, no_dist=True)
        return out[handle]

    def preload(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Serve these tensors (loaded by every rank together) instead of reading them again."""
        self._loaded.update(tensors)


class DcpCheckpoint(CheckpointFile):
    """A folder checkpoint opened like a checkpoint file: ``body``, ``source``, ``part()``, ``tensor()``.

    Its ``body["rng"]`` holds this rank's saved RNG states (rank 0's on a single process); the
    saved world size is ``body["world_size"]``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise CheckpointError(f"path must be a path (str or os.PathLike), not {type(path).__name__}") from None
        metadata = read_metadata(self.path)
        self.body = parse_body(metadata, self.path)
        self.source: Source = DcpSource(self.path, metadata)
        per_rank = self.body.pop("rng_by_rank", None)
        if isinstance(per_rank, list) and rank() < len(per_rank):
            self.body["rng"] = per_rank[rank()]
        elif per_rank is not None:
            log.warning(
                "%s: RNG states were saved for %d ranks; rank %d keeps its own", self.path, len(per_rank), rank()
            )


def read_metadata(path: str) -> dict[str, str]:
    """The folder's ``weightport.json`` as the file form's metadata strings."""
    file = os.path.join(path, BODY_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: no {BODY_FILE}; not a weightport checkpoint folder (or its save did not finish)"
        ) from None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e}); the checkpoint is damaged") from e
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise CheckpointError(f"{file}: not a JSON object of strings; the checkpoint is damaged")
    return data


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointFile:
    """A checkpoint file, or a folder checkpoint of a sharded model, opened."""
    try:
        location = os.fspath(path)
    except TypeError:
        raise CheckpointError(f"path must be a path (str or os.PathLike), not {type(path).__name__}") from None
    if os.path.isdir(location):
        return DcpCheckpoint(location)
    return CheckpointFile(location)


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


def write_folder(
    path: str, tensors: dict[str, torch.Tensor], body: dict[str, Any], rng_doc: Any, prepared: BaseException | None
) -> None:
    """Every rank: agree on the prepared state, write its shards into a temporary folder with DCP,
    then rank 0 writes ``weightport.json`` and renames the folder into place; every rank returns once
    the checkpoint is complete, or raises a CheckpointError when any rank failed."""
    import torch.distributed.checkpoint as dcp

    token = uuid.uuid4().hex[:12] if rank() == 0 else None
    outcome: list[Any] = [None] * world_size()
    if distributed() and world_size() > 1:
        own = None if prepared is None else str(prepared)
        torch.distributed.all_gather_object(outcome, (own, rng_doc, token))
    else:
        outcome = [(None if prepared is None else str(prepared), rng_doc, token)]
    failure = failures([o[0] for o in outcome])
    if failure:
        raise CheckpointError(
            f"{path}: preparing the checkpoint failed on {failure}; nothing was written"
        ) from prepared
    body = {**body, "world_size": len(outcome)}
    if rng_doc is not None:
        body["rng_by_rank"] = [o[1] for o in outcome]
    temporary = _temporary(path, outcome[0][2])
    with dcp_errors(path, "writing the checkpoint's shards"):
        dcp.save(tensors, checkpoint_id=temporary)
    error: str | None = None
    if rank() == 0:
        try:
            _finish(path, temporary, body)
        except (OSError, WeightportError) as e:
            error = f"{type(e).__name__}: {e}"
            shutil.rmtree(temporary, ignore_errors=True)
    if distributed() and world_size() > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(f"{path}: the checkpoint could not be put in place ({error}); nothing was written")


def _temporary(path: str, token: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{token}")


def _finish(path: str, temporary: str, body: dict[str, Any]) -> None:
    """Rank 0: the JSON document last (fsynced), then the folder into place. An existing checkpoint at
    ``path`` is moved aside first and removed after: a crash in between leaves it in ``.NAME.old-*``."""
    try:
        text = json.dumps({"version": VERSION, **body}, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not JSON ({e})") from e
    file = os.path.join(temporary, BODY_FILE)
    with open(file, "w", encoding="utf-8") as f:
        json.dump({FORMAT_KEY: FORMAT, BODY_KEY: text}, f)
        f.flush()
        os.fsync(f.fileno())
    old = None
    if os.path.lexists(path):
        if not is_folder_checkpoint(path):
            raise CheckpointError(f"{path} exists and is not a weightport checkpoint folder; not replacing it")
        old = _temporary(path, uuid.uuid4().hex[:12]).replace(".tmp-", ".old-")
        os.rename(path, old)
    os.rename(temporary, path)
    _fsync_folder(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
