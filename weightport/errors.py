"""Every error weightport raises on bad input.

Each class derives from :class:`WeightportError` and from the builtin a caller
would naturally catch (``FileNotFoundError``, ``KeyError``, ``ValueError`` …), so
``except FileNotFoundError`` keeps working for code that does not know
weightport. Messages name the file, key or rule at fault and say what to do.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CollisionError",
    "CorruptFileError",
    "HashMismatchError",
    "MappingError",
    "NonFiniteError",
    "OpError",
    "PatternError",
    "PlanError",
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


class CollisionError(PlanError):
    """Two source tensors would write the same target tensor."""


class ShapeMismatchError(PlanError):
    """A source tensor does not fit its target and ``on_mismatch='error'``."""


class StrictnessError(PlanError):
    """``strict=True`` or ``require=`` was not satisfied."""


class TargetError(WeightportError, LookupError):
    """The target model, submodule or factory cannot be found or built."""


class NonFiniteError(WeightportError, ValueError):
    """A tensor holds NaN or Inf values and ``check_finite=True``."""


class CheckpointError(WeightportError):
    """A training checkpoint cannot be saved or resumed."""
