"""weightport: move pretrained weights into the architecture you train, and say what happened.

>>> import weightport as wp
>>> report = wp.transfer("resnet50.pth", model)
>>> print(report.summary())
"""

from weightport import checkpoint, errors, models
from weightport.api import plan, transfer
from weightport.errors import WeightportError
from weightport.mapping import (
    Mapping,
    add_prefix,
    drop,
    fuse,
    list_adapters,
    list_ops,
    register_op,
    rename,
    split,
    stack,
    strip_prefix,
    tie,
    transform,
    unstack,
)
from weightport.mapping.files import list_mappings, load_mapping
from weightport.mapping.suggest import Suggestion, suggest
from weightport.meta import init_empty
from weightport.planning.data import TransferPlan
from weightport.report import Entry, TransferReport
from weightport.saving import save
from weightport.sources import Source, SourceInfo, open_source

__version__ = "0.1.0"

__all__ = [
    "Entry",
    "Mapping",
    "Source",
    "SourceInfo",
    "Suggestion",
    "TransferPlan",
    "TransferReport",
    "WeightportError",
    "add_prefix",
    "checkpoint",
    "drop",
    "errors",
    "fuse",
    "init_empty",
    "list_adapters",
    "list_mappings",
    "list_ops",
    "load_mapping",
    "models",
    "open_source",
    "plan",
    "register_op",
    "rename",
    "save",
    "split",
    "stack",
    "strip_prefix",
    "suggest",
    "tie",
    "transfer",
    "transform",
    "unstack",
]
