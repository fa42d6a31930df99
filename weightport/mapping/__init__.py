"""How names and tensors change between source and target: patterns, rules, ops, mappings."""

from weightport.mapping import adapters as adapters  # registers the shape adapters
from weightport.mapping.builders import (
    add_prefix,
    drop,
    fuse,
    rename,
    split,
    stack,
    strip_prefix,
    tie,
    transform,
    unstack,
)
from weightport.mapping.core import Mapping, Resolution
from weightport.mapping.ops import OpCall, OpSpec, get_op, list_adapters, list_ops, register_op
from weightport.mapping.rules import Drop, Fuse, Output, Rename, Rule, Split, Stack, Tie, Unstack

__all__ = [
    "Drop",
    "Fuse",
    "Mapping",
    "OpCall",
    "OpSpec",
    "Output",
    "Rename",
    "Resolution",
    "Rule",
    "Split",
    "Stack",
    "Tie",
    "Unstack",
    "add_prefix",
    "drop",
    "fuse",
    "get_op",
    "list_adapters",
    "list_ops",
    "register_op",
    "rename",
    "split",
    "stack",
    "strip_prefix",
    "tie",
    "transform",
    "unstack",
]
