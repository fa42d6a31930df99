"""How names and tensors change between source and target: patterns, rules, ops, mappings."""

from weightport.mapping.core import Mapping, Resolution
from weightport.mapping.ops import OpCall, OpSpec, get_op, list_adapters, list_ops, register_op
from weightport.mapping.rules import (
    Drop,
    Fuse,
    Output,
    Rename,
    Rule,
    Split,
    add_prefix,
    drop,
    fuse,
    rename,
    split,
    strip_prefix,
    transform,
)

__all__ = [
    "Mapping", "Resolution", "OpCall", "OpSpec", "get_op", "list_ops", "list_adapters", "register_op",
    "Rule", "Rename", "Drop", "Split", "Fuse", "Output",
    "rename", "drop", "strip_prefix", "add_prefix", "split", "fuse", "transform",
]
