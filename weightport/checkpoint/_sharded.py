"""Resuming a sharded model (DTensor parameters) from its DCP folder in place, every rank its own shards.

Used when the architecture is the saved one (no ``mapping=`` / ``rules=``): every rank asks DCP for
exactly the shards its parameters and optimizer moments hold, into fresh tensors of the same
placements (``torch.empty_like``), so nothing changes until everything is read; then the model
and the optimizer take them through DCP's ``set_model_state_dict`` / ``set_optimizer_state_dict``.
A changed architecture resumes through a transfer instead (``_resume``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from weightport.checkpoint import _dcp
from weightport.checkpoint._format import CheckpointFile
from weightport.checkpoint._optim import OptimizerReport
from weightport.checkpoint._save import type_name
from weightport.checkpoint._tree import decode
from weightport.errors import CheckpointError
from weightport.report import Entry, TransferReport

__all__ = ["Loader", "plan"]


@dataclass(frozen=True)
class _Stored:
    key: str


@dataclass
class Loader:
    """What one rank will read (``table``: key to destination tensor) and how it is applied."""

    ckpt: CheckpointFile
    model: nn.Module
    optimizer: Any
    table: dict[str, torch.Tensor] = field(default_factory=dict)
    model_keys: dict[str, str] = field(default_factory=dict)  # the model's name -> saved key
    entries: list[Entry] = field(default_factory=list)
    unused: tuple[str, ...] = ()
    optimizer_state: dict[str, Any] | None = None
    optimizer_report: OptimizerReport | None = None
    storage: Any = None  # DCP's reader of the folder, made while planning (it reads the index)

    def read(self) -> None:
        """Every rank together: DCP reads each rank's part of every tensor in ``table``."""
        import torch.distributed.checkpoint as dcp

        with _dcp.dcp_errors(self.ckpt.path, "reading the checkpoint's shards"):
            dcp.load(self.table, storage_reader=self.storage)

    def optimizer_action(self) -> Callable[[], None] | None:
        """Setting the optimizer's state, after :meth:`read` (``None`` without an optimizer)."""
        if self.optimizer is None or self.optimizer_state is None:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = _resolve(self.optimizer_state, self.table)
        # not strict: a parameter left out (not loaded, never stepped) starts with no state, as on one process
        options = StateDictOptions(strict=False)
        return lambda: set_optimizer_state_dict(self.model, self.optimizer, state, options=options)

    def apply(self) -> TransferReport:
        """The model takes the shards read (every rank its own)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state: dict[str, Any] = {name: self.table[key] for name, key in self.model_keys.items()}
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=False))
        info = self.ckpt.part("model").info
        return TransferReport(entries=self.entries, unused=self.unused, source=info)


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def plan(ckpt: CheckpointFile, model: nn.Module, optimizer: Any, strict: bool, on_mismatch: str) -> Loader:
    """Match the model's and the optimizer's state to the saved tensors by name and global shape (no
    collective, nothing read). A mismatch raises under ``strict`` and leaves that tensor as it is otherwise.

    Raises:
        CheckpointError: a strict mismatch (the message names the tensors and the fix).
    """
    model_sd, optim_sd, names = _dcp.state_dicts(model, optimizer)
    loader = Loader(ckpt, model, optimizer, storage=_dcp.reader(ckpt.source.info.location))
    source = ckpt.source
    params = {n for n, _ in model.named_parameters()}
    problems: list[str] = []
    for name, value in model_sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = f"model/{name}"
        shape = tuple(value.shape)
        reason = None
        if key not in source:
            reason = "missing"
            problems.append(f"{name} is not in the checkpoint")
        elif tuple(source.meta(key).shape) != shape:
            reason = "shape mismatch"
            problems.append(f"{name} has shape {shape}, the saved one {tuple(source.meta(key).shape)}")
        if reason is None:
            loader.table[key] = torch.empty_like(value)
            loader.model_keys[name] = key
        saved_shape = tuple(source.meta(key).shape) if key in source else None
        loader.entries.append(
            Entry(
                target=name,
                status="fresh" if reason else "loaded",
                sources=() if reason == "missing" else (name,),
                source_shape=saved_shape,
                target_shape=shape,
                reason=reason,
                numel=value.numel(),
                is_parameter=name in params,
            )
        )
    loader.unused = tuple(k[6:] for k in source if k.startswith("model/") and k[6:] not in model_sd)
    problems.extend(f"the checkpoint's {u} has no place in the model" for u in loader.unused)
    if problems and (strict or on_mismatch == "error"):
        shown = "; ".join(problems[:5]) + (f"; … ({len(problems)} in all)" if len(problems) > 5 else "")
        raise CheckpointError(
            f"{ckpt.path}: the sharded model differs from the saved one ({shown}); pass mapping= or rules= "
            "to resume into a changed architecture, or strict=False to load what matches"
        )
    saved_type = ckpt.body.get("optimizer", {}).get("type")
    if optimizer is not None and saved_type == type_name(optimizer):  # another class: resume says so
        _plan_optimizer(loader, optim_sd, names)
    return loader


def _plan_optimizer(loader: Loader, current: Any, names: list[list[str]]) -> None:
    """Each current parameter's saved state, found by its name; destinations shaped like its own state."""
    ckpt = loader.ckpt
    part = ckpt.body["optimizer"]
    saved = decode(part.get("state_dict"), _Stored, ckpt.path)
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        raise CheckpointError(f"{ckpt.path}: the saved optimizer state has no param_groups; the file is damaged")
    saved_index = {n: i for i, group in enumerate(part.get("param_names", [])) for n in group}
    state: dict[str, Any] = {}
    carried: dict[str, str] = {}
    fresh: dict[str, str] = {}
    for index, (name,) in enumerate(names):
        entry = saved.get("state", {}).get(saved_index.get(name, -1))
        if name not in loader.model_keys:  # its weight is not loaded (strict=False): neither is its state
            fresh[name] = "its weight was not loaded"
            continue
        if not entry:
            fresh[name] = "no saved state" if name in saved_index else "not in the checkpoint"
            continue
        mine = current["state"].get(index, {})
        out: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, _Stored):
                like = mine.get(key)
                if not isinstance(like, torch.Tensor) or tuple(like.shape) != tuple(ckpt.source.meta(value.key).shape):
                    raise CheckpointError(
                        f"{ckpt.path}: the saved optimizer state {key!r} of {name} does not fit the optimizer "
                        "passed; build it as in the run that saved it, or resume without optimizer="
                    )
                loader.table[value.key] = torch.empty_like(like)
            out[key] = value
        state[name] = out
        carried[name] = name
    groups = current["param_groups"]
    if len(groups) != len(saved["param_groups"]):
        raise CheckpointError(
            f"{ckpt.path}: the optimizer has {len(groups)} parameter groups, the saved one "
            f"{len(saved['param_groups'])}; build it as in the run that saved it"
        )
    by_index = [name for (name,) in names]
    loader.optimizer_state = {
        "state": state,
        "param_groups": [
            {**{k: v for k, v in s.items() if k != "params"}, "params": [by_index[i] for i in g["params"]]}
            for g, s in zip(groups, saved["param_groups"])
        ],
    }
    loader.optimizer_report = OptimizerReport(type_name(loader.optimizer), carried, fresh, tuple(range(len(groups))))


def _resolve(value: Any, table: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, _Stored):
        return table[value.key]
    if isinstance(value, dict):
        return {k: _resolve(v, table) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, table) for v in value)
    return value


def shard_like_parameters(state_dict: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """Optimizer state carried through a transfer is computed whole; a DTensor parameter's state
    takes the parameter's placements (each rank keeps its own part, no communication)."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for index, entries in state_dict.get("state", {}).items():
        param = params[index] if isinstance(index, int) and index < len(params) else None
        if param is None or not _is_dtensor(param):
            out[index] = entries
            continue
        out[index] = {
            k: distribute_tensor(v, param.device_mesh, param.placements, src_data_rank=None)
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(param.shape)
            else v
            for k, v in entries.items()
        }
    return {**state_dict, "state": out}
