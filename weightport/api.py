"""The public entry points: :func:`transfer` and :func:`plan`. Thin orchestration only."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from weightport.errors import PlanError, WeightportError
from weightport.mapping.core import Mapping
from weightport.mapping.rules import Rule
from weightport.plan import TransferPlan, build_plan
from weightport.report import TransferReport
from weightport.sources import open_source

log = logging.getLogger(__name__)


def plan(
    source: Any,
    model: nn.Module,
    *,
    mapping: str | Mapping | None = None,
    rules: Iterable[Rule] = (),
    into: str | None = None,
    on_mismatch: str = "skip",
    strict: bool = False,
    require: Sequence[str] = (),
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    checkpoint_key: str | None = None,
    check_finite: bool | str = False,
    trust_pickle: bool = False,
    check_hash: bool = True,
    expected_sha256: str | None = None,
    zero_copy: bool = False,
    progress: bool | None = None,
) -> TransferPlan:
    """Decide what :func:`transfer` would do, reading no tensor data and changing nothing.

    Takes the same arguments as :func:`transfer`. ``plan.report`` is the preview;
    ``plan.apply()`` performs it.
    """
    src = open_source(
        source,
        checkpoint_key=checkpoint_key,
        trust_pickle=trust_pickle,
        check_hash=check_hash,
        expected_sha256=expected_sha256,
    )
    resolved = _mapping(mapping).with_rules(rules)
    planned = build_plan(
        src,
        model,
        resolved,
        into=into,
        on_mismatch=on_mismatch,
        strict=strict,
        require=require,
        dtype=_dtype(dtype),
        device=as_device(device),
        check_finite=check_finite,
    )
    planned.zero_copy, planned.progress = bool(zero_copy), progress
    return planned


def transfer(
    source: Any,
    model: nn.Module,
    *,
    mapping: str | Mapping | None = None,
    rules: Iterable[Rule] = (),
    into: str | None = None,
    on_mismatch: str = "skip",
    strict: bool = False,
    require: Sequence[str] = (),
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    checkpoint_key: str | None = None,
    check_finite: bool | str = False,
    trust_pickle: bool = False,
    check_hash: bool = True,
    expected_sha256: str | None = None,
    zero_copy: bool = False,
    progress: bool | None = None,
) -> TransferReport:
    """Load ``source`` into ``model``: plan everything first, then change all or nothing.

    Args:
        source: A path (file or folder), a state dict or nested checkpoint, an ``nn.Module``,
            a :class:`~weightport.Source`, or a spec (``"torchvision:resnet50"``, ``"timm:NAME"``,
            ``"hf:org/name"``).
        model: The target. May be built on the meta device (see :func:`init_empty`): then only
            tensors that load nothing are initialised, by their modules' ``reset_parameters``.
        mapping: A shipped mapping name, a mapping file path, or a :class:`Mapping`.
        rules: Extra rules, applied before the mapping's own.
        into: Load into this submodule (dotted name); the rest of the model is untouched.
        on_mismatch: For a source tensor whose shape differs from its target: ``"skip"`` keeps
            the target's initialisation and reports it, ``"adapt"`` uses a shape adapter,
            ``"error"`` refuses.
        strict: Every target tensor must load and every source tensor be used.
        require: Glob patterns of target tensors that must load (``"backbone.*"``).
        dtype: Cast floating-point tensors in scope to this dtype.
        device: Place tensors in scope on this device (the ``map_location`` idea).
        checkpoint_key: Key of the weights inside a nested checkpoint.
        check_finite: ``True``: refuse source tensors holding NaN or Inf (naming them); ``"report"``:
            load them and list them in ``report.warnings``; ``False`` (default): do not look.
        trust_pickle: Allow full pickle loading of torch files (runs code from the file).
        check_hash: Verify the hash a zoo file name carries (torchvision weights); ``False`` skips it.
        expected_sha256: Refuse a local file whose sha256 differs (checked before it is parsed);
            the digest is recorded in ``report.source.provenance``.
        zero_copy: For tensors of a meta-built target that a safetensors (or other mapped) file
            holds with the same dtype and layout on CPU, assign read-only memory-mapped views of the
            file instead of owning copies: near-instant and no extra memory, but the file must not
            change while the model lives, and writing to those tensors (training) raises. Default
            ``False``: owning copies. See docs/performance.md.
        progress: Show a progress bar (tqdm) while reading. ``None`` (default): only when stderr
            is a terminal and the transfer reads more than 256 MiB; ``False``: never; ``True``:
            always (when tqdm is installed).

    Returns:
        A :class:`TransferReport` naming the fate of every target and source tensor.

    Raises:
        WeightportError: On any bad input or failed check; the model is then bitwise unchanged.

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> report = weightport.transfer("resnet18.pth", model)
        >>> print(report.summary())
    """
    planned = plan(
        source,
        model,
        mapping=mapping,
        rules=rules,
        into=into,
        on_mismatch=on_mismatch,
        strict=strict,
        require=require,
        dtype=dtype,
        device=device,
        checkpoint_key=checkpoint_key,
        check_finite=check_finite,
        trust_pickle=trust_pickle,
        check_hash=check_hash,
        expected_sha256=expected_sha256,
        zero_copy=zero_copy,
        progress=progress,
    )
    report = planned.apply()
    log.info("%s", report.summary().splitlines()[0])
    return report


def _mapping(mapping: str | Mapping | None) -> Mapping:
    if mapping is None:
        return Mapping()
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, str):
        from weightport.mapping.files import load_mapping

        return load_mapping(mapping)
    raise PlanError(f"mapping must be a name, a path or a weightport.Mapping, not {type(mapping).__name__}")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise PlanError(f"dtype={dtype!r} is not a torch dtype (try 'float16', 'bfloat16', 'float32')")
    return resolved


def as_device(
    value: torch.device | str | None, argument: str = "device", error: type[WeightportError] = PlanError
) -> torch.device | None:
    """``value`` as a ``torch.device`` (``None`` stays ``None``); anything else raises ``error``
    naming the ``argument`` it was given as."""
    if value is None or isinstance(value, torch.device):
        return value
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise error(f"{argument}={value!r} is not a torch device such as 'cpu', 'cuda' or 'cuda:1' ({e})") from e
