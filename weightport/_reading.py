"""Reading tensors into their destinations: in parallel on CPU, through pinned buffers to a GPU.

A :class:`ReadJob` is one source tensor read straight into one new tensor (a meta-built
target, or a target changing device or dtype). :func:`run_reads` performs a list of them:

* CPU destinations: ``preadv`` from the file into the destination, on a few threads when
  the transfer is large (the reads release the GIL; page faults and copies from the page
  cache scale with cores).
* CUDA destinations: each tensor is read into a page-locked (pinned) staging buffer, then
  copied with ``non_blocking=True`` so the next read overlaps the transfer; staging memory
  in flight is bounded and everything is synchronised before returning.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import compress
from operator import not_
from typing import Any, NamedTuple

import torch

from weightport._progress import Progress

#: Below this many bytes a transfer reads on the calling thread only.
PARALLEL_MIN_BYTES = 64 * 2**20
#: Most pinned staging bytes in flight to a GPU before waiting for the oldest copy.
PINNED_IN_FLIGHT_BYTES = 512 * 2**20


class ReadJob(NamedTuple):
    """Read source tensor ``key`` into ``out`` (same shape; any dtype and device)."""

    key: str
    out: torch.Tensor
    nbytes: int  # source bytes, for progress


def read_workers(total_bytes: int, jobs: int) -> int:
    """Threads to read with: ``WEIGHTPORT_READ_THREADS`` if set, else up to 4 for large transfers."""
    env = os.environ.get("WEIGHTPORT_READ_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), max(jobs, 1))
    if total_bytes < PARALLEL_MIN_BYTES or jobs < 2:
        return 1
    return max(1, min(4, os.cpu_count() or 1, jobs))


def run_reads(source: Any, jobs: list[ReadJob], bar: Progress) -> None:
    """Perform ``jobs``; the first error is raised after the others stop."""
    if not jobs:
        return
    on_gpu = [j.out.is_cuda for j in jobs]
    cpu = list(compress(jobs, map(not_, on_gpu))) if any(on_gpu) else jobs
    gpu = list(compress(jobs, on_gpu))
    _read_cpu(source, cpu, bar)
    if gpu:
        stager = Stager()
        for job in gpu:
            stager.fill(job.out, functools.partial(source.read_into, job.key))
            bar.update(job.nbytes)
        stager.finish()


def _read_cpu(source: Any, jobs: list[ReadJob], bar: Progress) -> None:
    workers = read_workers(sum(j.nbytes for j in jobs), len(jobs))
    batches = list(_batches(jobs))
    if workers <= 1:
        for batch in batches:
            _read_batch(source, batch)
            bar.update(sum(j.nbytes for j in batch))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="weightport-read") as pool:
        futures: list[Future[None]] = [pool.submit(_read_batch, source, b) for b in batches]
        try:
            for batch, future in zip(batches, futures):
                future.result()
                bar.update(sum(j.nbytes for j in batch))
        except BaseException:
            for f in futures:
                f.cancel()
            raise


#: A batch of reads (for one thread, and one progress step) ends after this many bytes.
BATCH_BYTES = 16 * 2**20


def _batches(jobs: list[ReadJob]) -> Iterator[list[ReadJob]]:
    """The jobs in order, in batches of about :data:`BATCH_BYTES` (however many tensors that takes:
    within a batch, tensors next to each other in the file are read together, whatever their order)."""
    batch: list[ReadJob] = []
    size = 0
    for job in jobs:
        batch.append(job)
        size += job.nbytes
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _read_batch(source: Any, batch: list[ReadJob]) -> None:
    source.read_into_many([j.key for j in batch], [j.out for j in batch])


class Stager:
    """Host-to-GPU copies through pinned buffers, ``non_blocking``, with bounded memory in flight."""

    def __init__(self, limit: int = PINNED_IN_FLIGHT_BYTES) -> None:
        self.limit = limit
        self._in_flight: collections.deque[tuple[Any, torch.Tensor]] = collections.deque()
        self._bytes = 0

    def fill(self, out: torch.Tensor, read: Callable[[torch.Tensor], None]) -> None:
        """Fill GPU tensor ``out`` with what ``read`` writes into a CPU buffer of its shape and dtype."""
        staging = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        read(staging)
        out.copy_(staging, non_blocking=True)
        self._track(staging, out.device)

    def copy(self, out: torch.Tensor, value: torch.Tensor) -> None:
        """``out.copy_(value)`` for a GPU ``out`` and CPU ``value``; never fails for lack of pinned memory."""
        if value.device.type != "cpu" or value.is_pinned():
            out.copy_(value, non_blocking=True)
            return
        try:
            staging = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            staging.copy_(value)
        except RuntimeError:  # no pinned memory left: a plain (synchronous) copy still works
            out.copy_(value)
            return
        out.copy_(staging, non_blocking=True)
        self._track(staging, out.device)

    def _track(self, staging: torch.Tensor, device: torch.device) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._in_flight.append((event, staging))
        self._bytes += staging.nbytes
        while self._bytes > self.limit and len(self._in_flight) > 1:
            done, buf = self._in_flight.popleft()
            done.synchronize()
            self._bytes -= buf.nbytes

    def finish(self) -> None:
        """Wait for every copy; the staging buffers go back to torch's pinned-memory cache."""
        while self._in_flight:
            done, buf = self._in_flight.popleft()
            done.synchronize()
            self._bytes -= buf.nbytes
