"""Writing a training checkpoint: :func:`save`."""

from __future__ import annotations

import datetime
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightport.checkpoint import _dcp, _format, _rng
from weightport.checkpoint._tree import encode
from weightport.errors import CheckpointError, WeightportError
from weightport.saving import file_format

log = logging.getLogger(__name__)

# (module, class, attribute): wrappers whose real model is an attribute. Looked up in sys.modules
# only, so checking for torch.compile's wrapper never imports torch._dynamo.
_WRAPPERS: list[tuple[str, str, str]] = [
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
]


def register_wrapper(module: str, cls: str, attribute: str) -> None:
    """Teach checkpoints another model wrapper: instances of ``module.cls`` hold the model in ``attribute``."""
    _WRAPPERS.append((module, cls, attribute))


def unwrap(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """The model inside DataParallel / DDP / ``torch.compile`` wrappers, and the wrappers removed."""
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model must be an nn.Module, not {type(model).__name__}")
    removed: list[str] = []
    while True:
        attribute = _wrapper_attribute(model)
        inner = getattr(model, attribute, None) if attribute else None
        if not isinstance(inner, nn.Module):
            return model, tuple(removed)
        removed.append(type(model).__name__)
        model = inner


def _wrapper_attribute(model: nn.Module) -> str | None:
    for module_name, cls_name, attribute in _WRAPPERS:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if isinstance(cls, type) and isinstance(model, cls):
            return attribute
    return None


def as_path(path: Any, what: str) -> str:
    """``os.fspath(path)``, refusing anything that is no path with a CheckpointError."""
    try:
        return os.fspath(path)
    except TypeError:
        raise CheckpointError(f"{what} must be a path (str or os.PathLike), not {type(path).__name__}") from None


def type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def names_by_id(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter (tied parameters have several), by the parameter's id."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """For each parameter of the optimizer, in its state-dict order, every name it has in the model."""
    names = names_by_id(model)
    return [names.get(id(p), []) for group in optimizer.param_groups for p in group["params"]]


def save(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    epoch: int | None = None,
    step: int | None = None,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> Path:
    """Save everything needed to resume training exactly, in one file, atomically.

    ``.safetensors`` writes safetensors (the recommended form: memory-mapped, read lazily);
    ``.pt``, ``.pth`` and ``.bin`` write the same tensors and metadata as a torch file that
    ``torch.load(path, weights_only=True)`` reads. Both forms resume, and both load as plain
    weights (``wp.transfer(path, model)`` takes the model part).

    Model weights, optimizer state tensors and RNG states are tensors in the file; the
    structure around them (parameter-group hyper-parameters, step counts, scheduler and
    scaler state, epoch, step, metrics, ``extra``) is JSON in its metadata. Nothing is
    pickled, so loading never runs code. DataParallel, DDP and ``torch.compile`` wrappers
    are unwrapped: the keys are those of the model itself.

    A model with DTensor parameters (FSDP2, tensor parallel) is saved by every rank into one DCP
    folder at ``path`` (no extension): each rank writes its shards and its own RNG states, and
    rank 0 puts the folder in place once all are done (see ``docs/checkpoints.md``).

    Args:
        path: Destination (``.safetensors``, ``.pt``, ``.pth`` or ``.bin``; a folder path for a
            sharded model). Written to a
            temporary file in the same folder, fsynced, then renamed, so a run killed mid-save
            leaves the previous file intact.
        model: The model (wrapped or not). Tensors on any device; they are copied to the
            file one at a time.
        optimizer: A ``torch.optim.Optimizer`` (or anything with the same ``state_dict``).
        scheduler: An LR scheduler or anything with ``state_dict()`` / ``load_state_dict()``.
        scaler: A ``torch.amp.GradScaler``.
        epoch: Epoch counter to store.
        step: Global step counter to store.
        metrics: Numbers such as ``{"val_loss": 0.31}`` (used by :class:`Manager` to keep the best).
        extra: Anything else to resume with: numbers, strings, lists, dicts, tensors, numpy arrays.
        rng: Save the torch (CPU and CUDA), numpy and Python ``random`` states.

    Returns:
        The path written.

    Raises:
        CheckpointError: a value cannot be stored without pickle (the message names it), a
            model tensor is on the meta device, or ``epoch``/``step`` is not an integer; for a
            sharded model, a file name, or a failure on any rank (raised on every rank).
        SaveError: another extension, a missing folder, or a path that cannot be written.

    Example:
        >>> wp.checkpoint.save("last.safetensors", model=model, optimizer=opt, scheduler=sched,
        ...                    epoch=epoch, step=step)
    """
    start = time.perf_counter()
    path = as_path(path, "path")
    inner, wrappers = unwrap(model)
    if _dcp.is_sharded(inner):
        _save_sharded(path, inner, wrappers, optimizer, scheduler, scaler, epoch, step, metrics, extra, rng)
        log.info("saved sharded checkpoint %s in %.2fs", path, time.perf_counter() - start)
        return Path(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; pass the checkpoint's file name (e.g. {path}/last.safetensors)")
    file_format(path)  # an unknown extension or a missing folder is refused before any work
    tensors = _model_tensors(inner)
    optimizer_part = None
    if optimizer is not None:
        _check_optimizer(optimizer)
        optimizer_part = _part(optimizer, "optimizer", tensors, param_names=param_names(inner, optimizer))
    body = _body(inner, wrappers, tensors, optimizer_part, scheduler, scaler, epoch, step, metrics, extra)
    if rng:
        body["rng"] = _encoded(_rng.capture(), "rng", tensors)
    _format.write(path, tensors, body)
    log.info("saved checkpoint %s (%d tensors) in %.2fs", path, len(tensors), time.perf_counter() - start)
    return Path(path)


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(getattr(optimizer, "param_groups", None), list):
        raise CheckpointError(f"optimizer={type(optimizer).__name__} is not a torch optimizer (it has no param_groups)")


def _body(
    inner: nn.Module,
    wrappers: tuple[str, ...],
    tensors: dict[str, torch.Tensor],
    optimizer_part: dict[str, Any] | None,
    scheduler: Any,
    scaler: Any,
    epoch: Any,
    step: Any,
    metrics: Mapping[str, float] | None,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The JSON document of every part but the RNG states; their tensors go into ``tensors``."""
    body: dict[str, Any] = {
        **_counters(epoch, step),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
        "torch": torch.__version__,
        "model": {"type": type_name(inner), "unwrapped": list(wrappers)},
    }
    if optimizer_part is not None:
        body["optimizer"] = optimizer_part
    if scheduler is not None:
        body["scheduler"] = _part(scheduler, "scheduler", tensors)
    if scaler is not None:
        body["scaler"] = _part(scaler, "scaler", tensors)
    if metrics:
        body["metrics"] = _metrics(metrics)
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise CheckpointError(f"extra must be a dict, not {type(extra).__name__}")
        body["extra"] = _encoded(dict(extra), "extra", tensors)
    return body


def _save_sharded(
    path: str,
    inner: nn.Module,
    wrappers: tuple[str, ...],
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    epoch: Any,
    step: Any,
    metrics: Mapping[str, float] | None,
    extra: Mapping[str, Any] | None,
    rng: bool,
) -> None:
    """Every rank: its shards and its RNG states into one DCP folder (see ``_dcp``). A failure while
    preparing is handed to the ranks' agreement, so that every rank raises and none waits."""
    tensors: dict[str, torch.Tensor] = {}
    body: dict[str, Any] = {}
    rng_doc = None
    prepared: BaseException | None = None
    try:
        _dcp.check_folder_path(path)
        if optimizer is not None:
            _check_optimizer(optimizer)
        model_sd, optim_sd, names = _dcp.state_dicts(inner, optimizer)
        tensors.update((f"model/{k}", v) for k, v in model_sd.items() if isinstance(v, torch.Tensor))
        optimizer_part = None
        if optimizer is not None:
            optimizer_part = {
                "type": type_name(optimizer),
                "state_dict": _encoded(optim_sd, "optimizer", tensors),
                "param_names": names,
            }
        body = _body(inner, wrappers, tensors, optimizer_part, scheduler, scaler, epoch, step, metrics, extra)
        body["layout"] = "dcp"
        body["model"]["type"] = _dcp.model_class(inner)
        if rng:
            rng_doc = _encoded(_rng.capture(), f"rng/{_dcp.rank()}", tensors)
    except WeightportError as e:
        prepared = e
    except Exception as e:  # noqa: BLE001 - torch's helpers: every rank must still reach the agreement
        prepared = CheckpointError(f"{path}: the sharded state cannot be gathered ({type(e).__name__}: {e})")
    _dcp.write(path, tensors, body, rng_doc, prepared)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            skipped.append(key)
            continue
        if value.is_meta:
            raise CheckpointError(
                f"model tensor {key!r} is on the meta device and has no values; "
                "load or initialise the model before saving it"
            )
        out[f"model/{key}"] = value
    if skipped:
        log.warning("checkpoint: non-tensor model state not saved: %s", ", ".join(skipped))
    return out


def _counters(epoch: Any, step: Any) -> dict[str, int | None]:
    for name, value in (("epoch", epoch), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{name} must be an int or None, not {value!r}")
    return {"epoch": epoch, "step": step}


def _metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(metrics, Mapping):
        raise CheckpointError(f"metrics must be a dict of numbers, not {type(metrics).__name__}")
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(name, str):
            raise CheckpointError(f"metrics[{name!r}] must be a number (e.g. loss.item()), not {value!r}")
        out[name] = value if math.isfinite(value) else {"$float": repr(float(value))}
    return out


def _part(obj: Any, name: str, tensors: dict[str, torch.Tensor], **more: Any) -> dict[str, Any]:
    state_dict = getattr(obj, "state_dict", None)
    if not callable(state_dict):
        raise CheckpointError(f"{name}={type(obj).__name__} has no state_dict(); pass an object that has one")
    return {"type": type_name(obj), "state_dict": _encoded(state_dict(), name, tensors), **more}


def _encoded(tree: Any, root: str, tensors: dict[str, torch.Tensor]) -> Any:
    doc, found = encode(tree, root)
    tensors.update(found)
    return doc
