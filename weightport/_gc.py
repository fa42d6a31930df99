"""Pausing the cyclic garbage collector around bulk work that creates many objects and no cycles."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Planning and opening a 100k-key source allocate several objects per key and free none of them
    in cycles: with the collector on, it would rescan the growing heap again and again, for nothing
    (docs/performance.md has the figures).

    On a normal exit, what the pause made is moved straight to the oldest generation
    (``gc.freeze()`` then ``gc.unfreeze()``: no scan), where the next full collection looks at it
    as it would have anyway. Left young, it would all be scanned by the first collection after the
    pause only to be promoted there. Not done when the block raised
    (a traceback's frames form cycles, which a young collection should free soon) nor when the
    process has frozen objects of its own (``unfreeze`` would release them too).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    except BaseException:
        if enabled:
            gc.enable()
        raise
    if enabled:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        gc.enable()
