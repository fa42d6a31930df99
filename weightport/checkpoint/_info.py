"""Describing a checkpoint without loading it: :func:`info` (what ``weightport inspect`` shows)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from weightport._text import byte_size
from weightport.checkpoint._format import PARTS, is_checkpoint, parse_body
from weightport.checkpoint._tree import decode
from weightport.errors import CheckpointError, WeightportError
from weightport.sources import open_source
from weightport.sources.base import Source
from weightport.sources.training import PartSource

_SCHEDULER_FIELDS = ("last_epoch", "_last_lr", "_step_count")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a training checkpoint holds, read from its header only.

    Attributes:
        path: The file.
        version: Checkpoint format version.
        created: When it was written (ISO 8601, UTC).
        epoch: Saved epoch counter.
        step: Saved step counter.
        metrics: Saved metrics.
        model_type: The model's class; ``unwrapped`` lists wrappers removed on save.
        unwrapped: Wrapper classes (DDP, ``torch.compile``) removed on save.
        optimizer_type: The optimizer's class, if saved.
        param_groups: Per group: its hyper-parameters and ``params`` (the number of parameters).
        params_with_state: Optimizer parameters that have state (were stepped).
        scheduler_type: The scheduler's class, if saved.
        scheduler: A few scheduler counters (``last_epoch``, ``_last_lr``).
        scaler: The grad scaler's state, if saved.
        rng: Random streams saved.
        extra_keys: Keys of ``extra``.
        parts: ``{part: (tensors, bytes)}``, plus ``"metadata"`` (JSON bytes).
        torch_version: The torch that wrote it.
    """

    path: str
    version: int
    created: str | None = None
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    model_type: str | None = None
    unwrapped: tuple[str, ...] = ()
    optimizer_type: str | None = None
    param_groups: tuple[dict[str, Any], ...] = ()
    params_with_state: int = 0
    scheduler_type: str | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None
    rng: tuple[str, ...] = ()
    extra_keys: tuple[str, ...] = ()
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)
    torch_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "version": self.version,
            "created": self.created,
            "epoch": self.epoch,
            "step": self.step,
            "metrics": _jsonable(self.metrics),
            "model_type": self.model_type,
            "unwrapped": list(self.unwrapped),
            "optimizer_type": self.optimizer_type,
            "param_groups": [_jsonable(g) for g in self.param_groups],
            "params_with_state": self.params_with_state,
            "scheduler_type": self.scheduler_type,
            "scheduler": _jsonable(self.scheduler),
            "scaler": _jsonable(self.scaler),
            "rng": list(self.rng),
            "extra_keys": list(self.extra_keys),
            "parts": {k: {"tensors": n, "nbytes": b} for k, (n, b) in self.parts.items()},
            "torch_version": self.torch_version,
        }

    def lines(self) -> list[str]:
        """Human-readable lines, as ``weightport inspect`` prints them."""
        out = [
            f"weightport training checkpoint (format {self.version})"
            + (f", saved {self.created}" if self.created else "")
            + (f" with torch {self.torch_version}" if self.torch_version else "")
        ]
        counters = ", ".join(f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.step)) if v is not None)
        if counters:
            out.append(counters)
        if self.metrics:
            out.append("metrics: " + ", ".join(f"{k}={_short(v)}" for k, v in self.metrics.items()))
        if self.model_type:
            out.append(
                f"model: {self.model_type}"
                + (f" (saved from inside {', '.join(self.unwrapped)})" if self.unwrapped else "")
            )
        out.extend(self._optimizer_lines())
        if self.scheduler_type:
            fields = ", ".join(f"{k.lstrip('_')}={_short(v)}" for k, v in self.scheduler.items())
            out.append(f"scheduler: {self.scheduler_type}" + (f" ({fields})" if fields else ""))
        if self.scaler is not None:
            out.append(
                "scaler: " + (", ".join(f"{k.lstrip('_')}={_short(v)}" for k, v in self.scaler.items()) or "disabled")
            )
        if self.rng:
            out.append("rng: " + ", ".join(self.rng))
        if self.extra_keys:
            out.append("extra: " + ", ".join(self.extra_keys))
        out.append(
            "size: "
            + ", ".join(
                f"{k} {n} tensors {byte_size(b)}" if k != "metadata" else f"metadata {byte_size(b)}"
                for k, (n, b) in self.parts.items()
            )
        )
        return out

    def _optimizer_lines(self) -> list[str]:
        if not self.optimizer_type:
            return []
        total = sum(int(g.get("params", 0)) for g in self.param_groups)
        out = [f"optimizer: {self.optimizer_type}, state for {self.params_with_state} of {total} parameters"]
        for i, group in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={_short(v)}" for k, v in group.items() if k != "params" and v is not None)
            out.append(f"  group {i} ({group.get('params', 0)} parameters): {hyper}")
        return out


def info(checkpoint: str | os.PathLike[str] | Source) -> CheckpointInfo:
    """Describe a checkpoint from its header: counters, optimizer hyper-parameters, part sizes.

    Args:
        checkpoint: A checkpoint path, or an opened :class:`~weightport.Source` of one.

    Raises:
        CheckpointError: not a weightport training checkpoint.
    """
    if not isinstance(checkpoint, Source):
        try:
            location = os.fspath(checkpoint)
        except TypeError:
            raise CheckpointError(f"checkpoint must be a path or a Source, not {type(checkpoint).__name__}") from None
        with open_source(location) as opened:
            return info(opened)
    whole = checkpoint.whole if isinstance(checkpoint, PartSource) else checkpoint
    body = parse_body(whole.info.metadata, whole.info.location)
    try:
        return _describe(whole, body)
    except WeightportError:
        raise
    except OSError as e:
        raise CheckpointError(f"{whole.info.location}: the checkpoint could not be read ({e})") from e
    except Exception as e:  # a crafted body: whatever shape it has, say the file is damaged
        raise CheckpointError(
            f"{whole.info.location}: the checkpoint metadata is malformed ({type(e).__name__}: {e}); "
            "the file is damaged"
        ) from e


def _describe(whole: Source, body: dict[str, Any]) -> CheckpointInfo:
    opt = body.get("optimizer") or {}
    opt_state = decode(opt.get("state_dict") or {}, _placeholder, whole.info.location)
    if (
        not isinstance(opt_state, dict)
        or not isinstance(opt_state.get("param_groups", []), list)
        or not all(isinstance(g, dict) for g in opt_state.get("param_groups", []))
        or not isinstance(opt_state.get("state", {}), dict)
    ):
        raise CheckpointError(f"{whole.info.location}: the saved optimizer state is damaged")
    sched = body.get("scheduler") or {}
    sched_state = decode(sched.get("state_dict") or {}, _placeholder, whole.info.location)
    scaler = (
        decode(body["scaler"].get("state_dict") or {}, _placeholder, whole.info.location) if "scaler" in body else None
    )
    if scaler is not None and not isinstance(scaler, dict):
        raise CheckpointError(f"{whole.info.location}: the saved scaler state is damaged")
    model = body.get("model") or {}
    return CheckpointInfo(
        path=whole.info.location,
        version=body["version"],
        created=body.get("created"),
        epoch=body.get("epoch"),
        step=body.get("step"),
        metrics=decode(body.get("metrics", {}), _placeholder),
        model_type=model.get("type"),
        unwrapped=tuple(model.get("unwrapped", ())),
        optimizer_type=opt.get("type"),
        param_groups=tuple(_group(g) for g in opt_state.get("param_groups", [])),
        params_with_state=len(opt_state.get("state", {})),
        scheduler_type=sched.get("type"),
        scheduler={k: sched_state[k] for k in _SCHEDULER_FIELDS if isinstance(sched_state, dict) and k in sched_state},
        scaler=scaler,
        rng=tuple(body.get("rng", {})),
        extra_keys=tuple(body.get("extra", {})),
        parts=_parts(whole),
        torch_version=body.get("torch"),
    )


def is_checkpoint_source(source: Source) -> bool:
    """Whether an opened source is (a part of) a weightport training checkpoint."""
    whole = source.whole if isinstance(source, PartSource) else source
    return is_checkpoint(whole.info.metadata)


def _group(group: dict[str, Any]) -> dict[str, Any]:
    hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    return {**hyper, "params": len(group.get("params", []))}


def _parts(source: Source) -> dict[str, tuple[int, int]]:
    sizes: dict[str, list[int]] = {}
    for key in source:
        entry = sizes.setdefault(key.split("/", 1)[0], [0, 0])
        entry[0] += 1
        entry[1] += source.meta(key).nbytes
    order = {p: i for i, p in enumerate(PARTS)}
    out = {k: (v[0], v[1]) for k, v in sorted(sizes.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))}
    out["metadata"] = (0, sum(len(k) + len(v) for k, v in source.info.metadata.items()))
    return out


def _placeholder(key: str) -> str:
    return f"<tensor {key}>"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"[{', '.join(_short(v) for v in value[:6])}, … ({len(value)} values)]"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_short(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
