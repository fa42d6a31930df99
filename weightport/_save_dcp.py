"""``wp.save(..., format="dcp")``: a ``torch.distributed.checkpoint`` folder, written atomically.

The folder is written by ``torch.distributed.checkpoint.save`` into a hidden sibling folder and
renamed into place once complete (:func:`weightport._atomic.replace_folder`), so a reader finds
the previous checkpoint or the new one, never a partial one. A state dict holding DTensors (a
sharded model's ``state_dict()``) is saved collectively: every rank of the process group calls
``save``, each writes its own shards, and rank 0 renames the folder after all have finished; a
problem on any rank is agreed by all, which all raise :class:`~weightport.errors.SaveError`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from weightport._atomic import replace_folder, temp_folder_for
from weightport._save_checks import check_value, metadata_strings
from weightport.distributed.agree import dcp_failures, describe, exchange, failed
from weightport.errors import SaveError, WeightportError
from weightport.sources.dcp import METADATA_KEY
from weightport.sources.files import is_dcp_folder


def write_dcp(tensors: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a DCP checkpoint folder at ``path`` (see the module docstring).

    ``metadata`` strings are stored as one JSON string under ``"__metadata__"`` (DCP keeps such a
    value with ``torch.save``; weightport's DCP source reads it back as ``source.info.metadata``).
    Without DTensors the folder is written by this process alone (in a process group, call it on
    one rank, as for the other formats).

    Raises:
        SaveError: ``path`` is a file, or a folder holding other things than a DCP checkpoint,
            its folder does not exist, or writing fails (on any rank).
        WeightportError: a value is not a dense tensor with values, or metadata is not ``str -> str``.
    """
    sharded = dist.is_available() and dist.is_initialized() and any(isinstance(t, DTensor) for t in tensors.values())
    if sharded:
        _write_collectively(tensors, path, metadata)
        return
    state = _state(tensors, metadata)
    tmp = _start(path)
    try:
        _save(state, tmp, path, no_dist=True)
        replace_folder(tmp, path)
    except SaveError:
        raise
    except OSError as e:
        raise SaveError(f"save(): cannot write {path}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_collectively(tensors: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None) -> None:
    rank = dist.get_rank()
    state: dict[str, Any] = {}
    tmp: str | None = None
    problem: str | None = None
    try:
        state = _state(tensors, metadata)
        tmp = _start(path) if rank == 0 else None
    except WeightportError as e:
        problem = str(e)
    agreed = exchange(problem, tmp)
    tmp = agreed[0][1]
    try:
        _agree(path, failed(agreed))
        assert tmp is not None
        problem = None
        try:
            _save(state, tmp, path, no_dist=False)
        except SaveError as e:
            problem = str(e)
        _agree(path, failed(exchange(problem)))
        if rank == 0:
            try:
                replace_folder(tmp, path)
            except OSError as e:
                problem = f"save(): cannot write {path}: {e.strerror or e}"
        outcome = [problem]
        dist.broadcast_object_list(outcome, src=0)
        _agree(path, {0: outcome[0]} if outcome[0] else {})
    finally:
        if rank == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _agree(path: str, problems: Mapping[int, str]) -> None:
    """Raise on every rank what went wrong on any (the same message everywhere)."""
    if problems:
        raise SaveError(f"save(): {path}: the DCP checkpoint was not written: " + describe(problems))


def _state(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name, t in tensors.items():
        check_value(name, t)
        if name == METADATA_KEY:
            raise WeightportError(f"save(): the name {METADATA_KEY!r} is where a DCP folder keeps metadata=; rename it")
        state[name] = t.detach()
    strings = metadata_strings(metadata, {})
    if strings:
        state[METADATA_KEY] = json.dumps(strings, sort_keys=True)
    return state


def _start(path: str) -> str:
    """Check that ``path`` may become a DCP folder, and make the hidden folder to write it in."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SaveError(f"save(): {path}: the folder {folder} does not exist; create it first")
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
        raise SaveError(f"save(): {path} is a file; a DCP checkpoint is a folder: give a new path")
    if os.path.isdir(path) and os.listdir(path) and not is_dcp_folder(path):
        raise SaveError(
            f"save(): {path} is a folder holding other files; format='dcp' replaces only a DCP checkpoint "
            "folder or an empty one: give a new path"
        )
    try:
        return temp_folder_for(path)
    except OSError as e:
        raise SaveError(f"save(): cannot write in {folder}: {e.strerror or e}") from e


def _save(state: dict[str, Any], tmp: str, path: str, *, no_dist: bool) -> None:
    try:
        with warnings.catch_warnings():  # DCP warns that it saves in one process: here, that is the point
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=tmp, no_dist=no_dist)
    except (Exception, dcp.CheckpointException) as e:
        raise SaveError(f"save(): cannot write {path}: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    """One line per failure: DCP's ``CheckpointException`` carries each rank's exception and traceback."""
    failures = dcp_failures(e) if isinstance(e, dcp.CheckpointException) else {}
    return describe(failures) if failures else f"{type(e).__name__}: {e}"
