"""Agreement between ranks: each rank says whether its step failed, and every rank learns of every
failure, so that every rank raises or none does. The one place that exchanges outcomes and words
them, for sharded transfers, sharded saves and sharded checkpoints alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

__all__ = ["dcp_failures", "describe", "exchange", "failed"]


def exchange(failure: str | None, value: Any = None, group: Any = None) -> list[tuple[str | None, Any]]:
    """Every rank's ``(failure, value)`` in rank order: one ``all_gather_object`` on ``group`` (the
    default group when ``None``), bounded by that group's timeout. Call it on every rank."""
    answers: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(answers, (failure, value), group=group)
    return answers


def failed(answers: list[tuple[str | None, Any]]) -> dict[int, str]:
    """``{rank: failure}`` for the ranks of :func:`exchange`'s answers that failed."""
    return {r: f for r, (f, _) in enumerate(answers) if f is not None}


def describe(failures: Mapping[int, str], world_size: int | None = None) -> str:
    """``"rank 1 of 2: message"`` (``"ranks 0, 1 of 2: …"`` for a message several ranks gave), each
    distinct message once; without ``world_size``, ``"rank 1: message"``."""
    by_message: dict[str, list[int]] = {}
    for r, m in sorted(failures.items()):
        by_message.setdefault(m, []).append(r)
    of = f" of {world_size}" if world_size is not None else ""
    return "; ".join(
        f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}{of}: {m}"
        for m, ranks in by_message.items()
    )


def dcp_failures(e: BaseException) -> dict[int, str]:
    """The failures a DCP ``CheckpointException`` carries (each rank's exception and traceback), as
    ``{rank: "Type: message"}`` (empty for any other exception)."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return {}
    out = {}
    for r, pair in failures.items():
        exc = pair[0] if isinstance(pair, tuple) and pair else pair
        out[int(r)] = f"{type(exc).__name__}: {exc}"
    return out
