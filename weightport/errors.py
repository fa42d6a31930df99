"""Every error weightport raises on bad input.

Each class derives from :class:`WeightportError` and from the builtin a caller
would naturally catch (``FileNotFoundError``, ``KeyError``, ``ValueError`` …), so
``except FileNotFoundError`` keeps working for code that does not know
weightport. Messages name the file, key or rule at fault and say what to do. Errors about many tensors
also carry them as data: :class:`CollisionError` its :class:`Collision` list,
:class:`ShapeMismatchError` its :class:`Mismatch` list, :class:`StrictnessError` the full
preview report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from weightport.report import TransferReport

__all__ = [
    "CheckpointError",
    "CollisionError",
    "CorruptFileError",
    "DistributedError",
    "HashMismatchError",
    "MappingError",
    "NonFiniteError",
    "NothingLoadedError",
    "OpError",
    "OptionError",
    "PatternError",
    "PlanError",
    "SaveError",
    "ShapeMismatchError",
    "SourceError",
    "SourceNotFoundError",
    "StrictnessError",
    "TargetError",
    "TensorNotFoundError",
    "UnsafeFileError",
    "UnsupportedFormatError",
    "WeightportError",
]


class WeightportError(Exception):
    """Base class of every error weightport raises on purpose."""


class SourceError(WeightportError):
    """A weight source could not be opened or read."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The file, folder, repository or cached download does not exist."""


class UnsupportedFormatError(SourceError, ValueError):
    """The file exists but is not a weight format weightport reads."""


class CorruptFileError(SourceError, ValueError):
    """The file claims a known format but its contents are damaged."""


class UnsafeFileError(SourceError, ValueError):
    """The file can only be read by running code it names (pickled globals)."""


class HashMismatchError(SourceError, ValueError):
    """The file's contents do not match the hash it is expected to have."""


class TensorNotFoundError(SourceError, KeyError):
    """A named tensor is not in the source."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class PatternError(WeightportError, ValueError):
    """A name pattern or template has invalid syntax."""


class MappingError(WeightportError, ValueError):
    """A rule or mapping file is invalid, or cannot do what was asked of it."""


class OpError(WeightportError, ValueError):
    """A tensor op or shape adapter failed on a tensor."""


class PlanError(WeightportError, ValueError):
    """The transfer cannot be planned as asked."""


class OptionError(PlanError, TypeError):
    """An option of ``transfer``/``plan`` is unknown or has a value it cannot take."""


class Collision(NamedTuple):
    """Several source tensors that would write one target tensor.

    Attributes:
        target: The target key.
        sources: The source keys, in source order.
        rules: The rule that routed each source there, as written (``None``: same name).
        detail: What the sources clash over, when that is more than the target (a fuse's part).
    """

    target: str
    sources: tuple[str, ...]
    rules: tuple[str | None, ...]
    detail: str | None = None

    def __str__(self) -> str:
        described = ", ".join(
            f"{k!r} (rule {r if r is not None else 'none: same name'})" for k, r in zip(self.sources, self.rules)
        )
        return f"{self.target!r} <- {described}" + (f" ({self.detail})" if self.detail else "")


class Mismatch(NamedTuple):
    """A source tensor (after its rule's ops) whose shape is not its target's.

    Attributes:
        target: The target key.
        sources: The source key(s) feeding it.
        source_shape: The shape the source gives after the rule's ops (``None``: the ops failed).
        target_shape: The target's shape.
        detail: What failed, when the ops could not run.
    """

    target: str
    sources: tuple[str, ...]
    source_shape: tuple[int, ...] | None
    target_shape: tuple[int, ...]
    detail: str | None = None

    def __str__(self) -> str:
        if self.detail is not None:
            return f"{self.target!r}: {self.detail}"
        sources = ", ".join(self.sources)
        return f"{self.target!r}: source {sources!r} gives {self.source_shape}, target is {self.target_shape}"


def _listed(items: Sequence[object], limit: int = 20) -> str:
    more = f"\n  … and {len(items) - limit} more" if len(items) > limit else ""
    return "\n  ".join(map(str, items[:limit])) + more


class CollisionError(PlanError):
    """Two source tensors would write the same target tensor.

    Attributes:
        collisions: Every :class:`Collision` found (the message lists the first 20).
    """

    def __init__(self, collisions: Sequence[Collision]) -> None:
        self.collisions = tuple(collisions)
        super().__init__(
            "two source tensors would write one target:\n  "
            + _listed(self.collisions)
            + "\nadd a drop rule for one of them, or fix the rule that renames it"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.collisions,))


class ShapeMismatchError(PlanError):
    """A source tensor does not fit its target and ``on_mismatch='error'``.

    Attributes:
        mismatches: Every :class:`Mismatch` found (the message lists the first 20); empty when
            raised while applying (an op produced a shape its plan did not foresee).
    """

    def __init__(self, message: str | Sequence[Mismatch]) -> None:
        if isinstance(message, str):
            self.mismatches: tuple[Mismatch, ...] = ()
            super().__init__(message)
            return
        self.mismatches = tuple(message)
        super().__init__(
            "shape mismatch (on_mismatch='error'):\n  "
            + _listed(self.mismatches)
            + "\nadd a rule or adapter for them, or pass on_mismatch='skip' (keep the target's init) "
            "or on_mismatch='adapt'"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.mismatches or str(self),))


class StrictnessError(PlanError):
    """``strict=True`` or ``require=`` was not satisfied.

    Attributes:
        report: The full plan's :class:`~weightport.TransferReport` (``applied=False``):
            ``print(e.report)`` shows what would have loaded; ``None`` when raised elsewhere.
        problems: One line per unmet requirement.
    """

    def __init__(self, message: str, *, report: TransferReport | None = None, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.report = report
        self.problems = tuple(problems)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_strictness, (str(self), self.report, self.problems))


class NothingLoadedError(StrictnessError):
    """A transfer would load no tensor at all (and ``allow_empty`` is not set): the message says
    what the names suggest; ``report`` is the preview."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_nothing, (str(self), self.report))


def _rebuild_nothing(message: str, report: TransferReport | None) -> NothingLoadedError:
    return NothingLoadedError(message, report=report)


def _rebuild_strictness(message: str, report: TransferReport | None, problems: tuple[str, ...]) -> StrictnessError:
    return StrictnessError(message, report=report, problems=problems)


class TargetError(WeightportError, LookupError):
    """The target model, submodule or factory cannot be found or built."""


class NonFiniteError(WeightportError, ValueError):
    """A tensor holds NaN or Inf values and ``check_finite=True``."""


class SaveError(WeightportError, OSError):
    """A file cannot be written where or as asked (a folder, a missing folder, an unknown
    extension, no permission, a full disk)."""

    def __str__(self) -> str:  # OSError would format its arguments as a tuple
        return str(self.args[0]) if self.args else ""


class CheckpointError(WeightportError):
    """A training checkpoint cannot be saved or resumed."""


class DistributedError(WeightportError, RuntimeError):
    """A transfer into a sharded model failed on some rank: every rank raises it, and no rank's
    model changed.

    Attributes:
        failures: ``{rank: message}`` for each rank that failed.
    """

    def __init__(self, message: str, failures: Mapping[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.failures))
