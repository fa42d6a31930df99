"""Random number generator states: a registry of streams to capture and restore.

Each stream knows how to read the global state, how to check a saved state on a
private generator (so a bad state fails before anything is restored), and how to
set it. Streams: ``torch`` (CPU), ``cuda`` (every visible device, only when CUDA
was initialised in the saving process: otherwise its state is still the seed's),
``numpy`` (the legacy global ``np.random`` state, when numpy is installed) and
``python`` (``random``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from weightport.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RngStream:
    """One global random stream.

    Attributes:
        name: Key in the checkpoint's ``rng`` part.
        capture: Returns the current state (tensors, numbers, tuples, numpy arrays).
        restore: Sets the state; returns a note when it could only partly do so.
        check: Raises on a state ``restore`` would refuse, touching no global state.
        can_capture: Whether this process has the stream worth saving.
        can_restore: Whether this process can set it (else a note says it was skipped).
    """

    name: str
    capture: Callable[[], Any]
    restore: Callable[[Any], str | None]
    check: Callable[[Any], None]
    can_capture: Callable[[], bool]
    can_restore: Callable[[], bool]


_STREAMS: dict[str, RngStream] = {}


def register_stream(stream: RngStream) -> None:
    """Add or replace a random stream that checkpoints save and restore."""
    _STREAMS[stream.name] = stream


def capture() -> dict[str, Any]:
    """The state of every stream this process has."""
    return {name: s.capture() for name, s in _STREAMS.items() if s.can_capture()}


def prepare(states: Any, where: str) -> tuple[list[tuple[str, Callable[[], str | None]]], list[str]]:
    """Check saved states now; return ``(stream, restore)`` pairs to run later and notes on what is skipped.

    Raises:
        CheckpointError: a saved state is malformed (the checkpoint is damaged).
    """
    if not isinstance(states, dict):
        raise CheckpointError(f"{where}: the saved RNG states are not a table; the checkpoint is damaged")
    actions: list[tuple[str, Callable[[], str | None]]] = []
    notes: list[str] = []
    for name, state in states.items():
        stream = _STREAMS.get(name)
        if stream is None:
            notes.append(f"RNG stream {name!r} saved by another setup is not known here; not restored")
            continue
        if not stream.can_restore():
            notes.append(f"RNG stream {name!r} is not available in this process; not restored")
            continue
        try:
            stream.check(state)
        except Exception as e:  # whatever a damaged state makes torch or numpy raise
            raise CheckpointError(f"{where}: saved RNG state {name!r} is invalid ({e})") from e
        actions.append((name, lambda s=stream, v=state: s.restore(v)))  # type: ignore[misc]
    return actions, notes


# -- the built-in streams -----------------------------------------------------------------------------


def _torch_check(state: Any) -> None:
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        raise TypeError("expected a uint8 tensor")
    torch.Generator().set_state(state)


def _torch_restore(state: torch.Tensor) -> None:
    torch.set_rng_state(state)


def _cuda_capture_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _cuda_check(states: Any) -> None:
    if not isinstance(states, list) or not all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in states):
        raise TypeError("expected a list of uint8 tensors")
    for i, state in enumerate(states[: torch.cuda.device_count()]):
        torch.Generator(device=f"cuda:{i}").set_state(state)


def _cuda_restore(states: list[torch.Tensor]) -> str | None:
    count = torch.cuda.device_count()
    for i, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state, i)
    if len(states) != count:
        return f"CUDA RNG: {len(states)} device states saved, {count} devices here; restored {min(count, len(states))}"
    return None


def _numpy_module() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _numpy_check(state: Any) -> None:
    np = _numpy_module()
    np.random.RandomState().set_state(state)


def _numpy_restore(state: Any) -> None:
    _numpy_module().random.set_state(state)


def _python_capture() -> tuple[Any, ...]:
    version, internal, gauss = random.getstate()
    return version, torch.tensor(internal, dtype=torch.int64), gauss  # 625 words: a tensor, not JSON


def _python_state(state: Any) -> tuple[Any, ...]:
    version, internal, gauss = state
    if isinstance(internal, torch.Tensor):
        internal = tuple(internal.tolist())
    return version, internal, gauss


def _python_check(state: Any) -> None:
    random.Random().setstate(_python_state(state))


def _python_restore(state: Any) -> None:
    random.setstate(_python_state(state))


register_stream(
    RngStream(
        "torch",
        torch.get_rng_state,
        _torch_restore,
        _torch_check,  # type: ignore[arg-type]
        lambda: True,
        lambda: True,
    )
)
register_stream(
    RngStream(
        "cuda", torch.cuda.get_rng_state_all, _cuda_restore, _cuda_check, _cuda_capture_ok, torch.cuda.is_available
    )
)
register_stream(
    RngStream(
        "numpy",
        lambda: _numpy_module().random.get_state(),
        _numpy_restore,  # type: ignore[arg-type]
        _numpy_check,
        lambda: _numpy_module() is not None,
        lambda: _numpy_module() is not None,
    )
)
register_stream(RngStream("python", _python_capture, _python_restore, _python_check, lambda: True, lambda: True))
