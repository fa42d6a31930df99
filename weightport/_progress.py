"""A byte-counting progress bar for long transfers: tqdm on a terminal, silent otherwise."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

#: Transfers reading less than this show no bar in automatic mode (``progress=None``).
THRESHOLD_BYTES = 256 * 2**20


class Progress:
    """Counts bytes; draws a tqdm bar when enabled. Never raises from :meth:`update`."""

    def __init__(self, bar: Any | None) -> None:
        self._bar = bar

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def update(self, nbytes: int) -> None:
        if self._bar is None:
            return
        try:
            self._bar.update(nbytes)
        except Exception:  # noqa: BLE001 - a broken terminal must not break a transfer
            self._bar = None

    def close(self) -> None:
        if self._bar is not None:
            try:
                self._bar.close()
            except Exception:  # noqa: BLE001 - see update()
                pass
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wanted(enabled: bool | None, total_bytes: int, stream: Any = None) -> bool:
    """Whether to draw a bar: ``enabled`` if given, else a terminal and a large transfer.

    ``WEIGHTPORT_PROGRESS=0`` (or ``TQDM_DISABLE=1``) in the environment turns the automatic
    mode off, e.g. for CI logs that claim to be terminals.
    """
    if enabled is not None:
        return enabled
    if os.environ.get("WEIGHTPORT_PROGRESS", "").strip() in ("0", "false", "no", "off"):
        return False
    if os.environ.get("TQDM_DISABLE", "").strip() not in ("", "0"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):
        tty = False
    return tty and total_bytes >= THRESHOLD_BYTES


def progress(enabled: bool | None, total_bytes: int, desc: str = "weightport", stream: Any = None) -> Progress:
    """A :class:`Progress` over ``total_bytes``; a silent one unless :func:`wanted` says so."""
    if not wanted(enabled, total_bytes, stream):
        return Progress(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if enabled:
            log.warning("progress=True needs tqdm (pip install tqdm); continuing without a progress bar")
        return Progress(None)
    bar = tqdm(
        total=total_bytes,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr if stream is None else stream,
        leave=False,
        dynamic_ncols=True,
        disable=False,
    )
    return Progress(bar)
