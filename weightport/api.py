"""The public entry points: :func:`transfer` and :func:`plan`. Thin orchestration only.

Their keyword options are declared once, in :mod:`weightport.options`.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from weightport.errors import OptionError
from weightport.mapping.core import Mapping
from weightport.options import ApplyOptions, OpenOptions, PlanOptions, split_options, takes_options
from weightport.planning.build import build_plan
from weightport.planning.data import TransferPlan
from weightport.report import TransferReport
from weightport.sources import open_source

log = logging.getLogger(__name__)


@takes_options(OpenOptions, PlanOptions, ApplyOptions)
def plan(source: Any, model: nn.Module, **options: Any) -> TransferPlan:
    """Decide what :func:`transfer` would do, reading no tensor data and changing nothing.

    Takes the same arguments as :func:`transfer`. ``plan.report`` is the preview;
    ``plan.apply()`` performs it (the apply-time options given here are its defaults, and
    ``plan.apply(...)`` can override them).

    Args:
        source: As for :func:`transfer`.
        model: As for :func:`transfer`.
        {options}

    Raises:
        StrictnessError: ``strict``/``require`` not met; ``error.report`` is the full preview.
        WeightportError: Any other bad input; nothing was changed.
    """
    opening, planning, applying = split_options(options, where="weightport.plan")
    return _plan(source, model, opening, planning, applying)


@takes_options(OpenOptions, PlanOptions, ApplyOptions)
def transfer(source: Any, model: nn.Module, **options: Any) -> TransferReport:
    """Load ``source`` into ``model``: plan everything first, then change all or nothing.

    Args:
        source: A path (file or folder), a state dict or nested checkpoint, an ``nn.Module``,
            a :class:`~weightport.Source`, or a spec (``"torchvision:resnet50"``, ``"timm:NAME"``,
            ``"hf:org/name"``).
        model: The target. May be built on the meta device (see :func:`init_empty`): then only
            tensors that load nothing are initialised, by their modules' ``reset_parameters``.
        {options}

    Returns:
        A :class:`TransferReport` naming the fate of every target and source tensor.

    Raises:
        StrictnessError: ``strict``/``require`` not met; ``error.report`` is the full preview.
        WeightportError: On any other bad input or failed check; the model is then bitwise unchanged.

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> report = weightport.transfer("resnet18.pth", model)
        >>> print(report.summary())
    """
    opening, planning, applying = split_options(options, where="weightport.transfer")
    report = _plan(source, model, opening, planning, applying).apply()
    log.info("%s", report.summary().splitlines()[0])
    return report


def _plan(
    source: Any, model: nn.Module, opening: OpenOptions, planning: PlanOptions, applying: ApplyOptions
) -> TransferPlan:
    src = open_source(source, **vars(opening))
    mapping = _mapping(planning.mapping).with_rules(planning.rules)
    return build_plan(src, model, mapping, planning, applying)


def _mapping(mapping: str | Mapping | None) -> Mapping:
    if mapping is None:
        return Mapping()
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, str):
        from weightport.mapping.files import load_mapping

        return load_mapping(mapping)
    raise OptionError(f"mapping must be a name, a path or a weightport.Mapping, not {type(mapping).__name__}")
