"""Sharded targets: loading into models whose parameters are DTensors (FSDP2, tensor parallel).

Planning is the single-process planner, unchanged: it sees global names and shapes, so every rank
plans the same transfer without reading a tensor. Applying goes through PyTorch's distributed
checkpointing (:mod:`torch.distributed.checkpoint`): :mod:`weightport.distributed.reader` presents
the plan's targets to DCP as a checkpoint, DCP's own load planner decides which box of each target
a rank holds, and the reader computes exactly that box from the source boxes the region maps of
:mod:`weightport.distributed.regions` name. :mod:`weightport.distributed.load` stages, agrees across
ranks and commits.

The modules, in the order data flows through them:

- ``detect``: whether a plan is sharded (without importing DCP), and the preview's whole-read note.
- ``regions``: the region map of each op: which source box a target box needs.
- ``reader``: the DCP ``StorageReader`` that serves a plan, box by box.
- ``load``: stage, read through DCP, check, agree, commit.
- ``agree``: the one exchange of the ranks' outcomes, also used by sharded saves and checkpoints.
"""
