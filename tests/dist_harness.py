"""Run a function on 2 (or N) CPU processes joined by a gloo process group on localhost.

Every distributed test goes through :func:`run_ranks`: each process joins the group with a
timeout on every collective, runs ``fn(rank, world_size, *args)``, and hands its return value back
(pickled through a file); the test ends every process, on success, failure or timeout alike.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

#: Seconds any one collective may wait before the process group gives up.
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 180) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each in its own process in one gloo group.

    ``fn`` must be importable (a module-level function). A process that raises fails the call
    with its traceback; a process still running after ``timeout`` seconds is killed, and so are the
    others, before this raises.
    """
    with tempfile.TemporaryDirectory(prefix="wp-ranks-") as folder:
        port = free_port()
        ctx = mp.start_processes(
            _entry, args=(fn, args, world_size, port, folder), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world_size} ranks did not finish within {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def _entry(rank: int, fn: Callable[..., Any], args: tuple, world_size: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
        # no rank tears its connections down while another still talks on them (gloo's threads abort then)
        try:
            dist.barrier()
        except RuntimeError:  # a peer failed or left: its own failure is the one the caller hears of
            pass
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def shard_rows(rank: int, world_size: int, rows: int) -> tuple[int, int]:
    """(start, length) of ``rank``'s rows under ``Shard(0)`` (torch.chunk: the last ranks may get fewer)."""
    per = -(-rows // world_size)
    start = min(rank * per, rows)
    return start, min(per, rows - start)


def run_scenarios(calls: dict[str, tuple[Callable[..., Any], tuple]], **kwargs: Any) -> dict[str, list[Any]]:
    """Several scenarios in one spawn of the ranks (each spawn costs seconds): ``{name: (fn, args)}``
    to ``{name: [fn(rank, world_size, *args) for each rank]}``, run one after another on every rank."""
    ranks = run_ranks(_scenarios, calls, **kwargs)
    return {name: [r[name] for r in ranks] for name in calls}


def _scenarios(rank: int, world_size: int, calls: dict[str, tuple[Callable[..., Any], tuple]]) -> dict[str, Any]:
    return {name: fn(rank, world_size, *args) for name, (fn, args) in calls.items()}
