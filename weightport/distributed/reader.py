"""A DCP :class:`~torch.distributed.checkpoint.StorageReader` that serves a weightport plan.

To DCP the plan looks like a checkpoint whose tensors are the plan's targets, under their own
names and global shapes, each stored as one chunk. DCP's default load planner then does what it
does for any checkpoint: for each local shard of each DTensor in the state dict being loaded it
asks for a box of the stored tensor (a ``ReadItem``: offsets and lengths). :meth:`PlanReader.read_data`
answers each ask by reading, through :meth:`Source.read_region`, only the source boxes that the
recipe's region maps (:mod:`weightport.distributed.regions`) say that box needs, and computing the
box's values. DCP handles every placement (``Shard(0)``, ``Shard(1)``, ``Replicate``, uneven shards,
2-D meshes) and the collectives; weightport never computes a placement itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint import (
    ChunkStorageMetadata,
    LoadPlan,
    LoadPlanner,
    Metadata,
    StorageReader,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.metadata import TensorProperties
from torch.futures import Future

from weightport.distributed.regions import region_plan
from weightport.errors import ShapeMismatchError
from weightport.planning.data import Recipe
from weightport.sources.base import Box, Source

__all__ = ["PlanReader"]


class PlanReader(StorageReader):
    """The plan's recipes as a DCP checkpoint of their targets (module docstring).

    Attributes:
        bytes_read: Source bytes this rank read so far (:meth:`Source.read_region`'s count: the
            boxes' bytes where the source reads ranges, the whole tensor where it cannot).
    """

    def __init__(self, source: Source, recipes: Sequence[Recipe], targets: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.source = source
        self.recipes = {r.target: r for r in recipes}
        # each target as a meta tensor of its global shape and dtype (a DTensor's shape is global)
        self.targets = {
            r.target: torch.empty(targets[r.target].shape, dtype=targets[r.target].dtype, device="meta")
            for r in recipes
        }
        self.bytes_read = 0

    # -- DCP's StorageReader interface ----------------------------------------------------------------
    def reset(self, checkpoint_id: Any = None) -> None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # served from a plan, never from a path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        entries = {}
        for name, target in self.targets.items():
            shape = target.shape
            chunk = ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=shape)
            entries[name] = TensorStorageMetadata(TensorProperties(dtype=target.dtype), shape, [chunk])
        return Metadata(state_dict_metadata=entries)  # type: ignore[arg-type]

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fill each asked box from the source; raises (and DCP reports it from every rank) on any failure."""
        for item in plan.items:
            name = item.storage_index.fqn
            box = tuple(zip(item.storage_offsets, item.lengths))
            dest = planner.resolve_tensor(item).detach()
            recipe = self.recipes[name]
            if recipe.plain and self._fits(recipe.inputs[0].key, dest):
                self.bytes_read += self.source.read_region(recipe.inputs[0].key, box, out=dest)[
                    1
                ]  # straight into place
            else:
                dest.copy_(self.region(name, box))
            planner.commit_tensor(item, dest)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    # -- weightport ---------------------------------------------------------------------------------
    def _fits(self, key: str, dest: torch.Tensor) -> bool:
        """Whether the source's values can be read into ``dest`` as they are."""
        return dest.is_cpu and dest.is_contiguous() and dest.dtype == self.source.meta(key).dtype

    def region(self, name: str, box: Box) -> torch.Tensor:
        """The values of target ``name`` inside ``box``, read from the source boxes they need."""
        recipe = self.recipes[name]
        keys = [i.key for i in recipe.inputs]
        target = self.targets[name]
        planned = region_plan(recipe, self.source.shapes(keys), target, box)
        values: list[torch.Tensor | None] = []
        for key, read in zip(keys, planned.reads):
            if read is None:
                values.append(None)
                continue
            value, nbytes = self.source.read_region(key, read)
            self.bytes_read += nbytes
            values.append(value)
        out = planned.compute(values)
        want = tuple(n for _, n in box)
        if tuple(out.shape) != want:
            raise ShapeMismatchError(
                f"{', '.join(keys)} -> {name!r}: the ops produced {tuple(out.shape)} for the box {box} of "
                f"{tuple(target.shape)} (want {want}); fix the rule's op"
            )
        return out
