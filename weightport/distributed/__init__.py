"""Sharded targets: loading into models whose parameters are DTensors (FSDP2, tensor parallel).

Planning is the single-process planner, unchanged: it sees global names and shapes, so every rank
plans the same transfer without reading a tensor. Applying goes through PyTorch's distributed
checkpointing (:mod:`torch.distributed.checkpoint`): :mod:`weightport.distributed.reader` presents
the plan's targets to DCP as a checkpoint, DCP's own load planner decides which box of each target
a rank holds, and the reader computes exactly that box from the source boxes the region maps of
:mod:`weightport.distributed.regions` name. :mod:`weightport.distributed.load` stages, agrees across
ranks and commits.
"""
