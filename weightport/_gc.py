"""Pausing the cyclic garbage collector around bulk work that creates many objects and no cycles."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Planning and opening a 100k-key source allocate ~10 objects per key and free none of them in
    cycles: with the collector on, it would rescan the growing heap again and again, for nothing
    (measured: a 100k-entry safetensors header parses in 0.3 s paused, 0.7–0.9 s not)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
