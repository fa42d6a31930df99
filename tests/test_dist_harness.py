"""The test harness for distributed tests: 2 gloo processes, results back, failures and hangs end every process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks, shard_rows

pytestmark = pytest.mark.slow


def _sum_of_ranks(rank: int, world_size: int, scale: int) -> int:
    t = torch.tensor([rank * scale])
    dist.all_reduce(t)
    return int(t.item())


def _fails_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("injected on rank 1")


def _hangs_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        import time

        time.sleep(600)


def test_run_ranks_returns_each_rank_result() -> None:
    assert run_ranks(_sum_of_ranks, 10) == [10, 10]


def test_run_ranks_raises_when_a_rank_fails() -> None:
    with pytest.raises(Exception, match="injected on rank 1"):
        run_ranks(_fails_on_rank_1)


def test_run_ranks_kills_every_process_on_timeout() -> None:
    with pytest.raises(TimeoutError):
        run_ranks(_hangs_on_rank_1, timeout=8)


def test_shard_rows_follows_torch_chunk() -> None:
    for rows in (1, 5, 7, 8):
        chunks = torch.arange(rows).chunk(2)
        for rank in range(2):
            start, length = shard_rows(rank, 2, rows)
            got = chunks[rank].tolist() if rank < len(chunks) else []
            assert list(range(start, start + length)) == got
