"""The dtypes weightport views file bytes through: an explicit allow-list of plain element types.

Viewing bytes as a quantized dtype (``torch.quint8`` …) builds a tensor without a quantizer, and
touching it kills the interpreter; sub-byte and bit dtypes have no copy kernels. A file claiming any
dtype outside :data:`VIEWABLE_DTYPES` for a tensor is refused by name before anything is viewed.
"""

from __future__ import annotations

import torch

from weightport.errors import CorruptFileError

_NAMES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)
#: Element types whose bytes can be viewed and copied as they are (those this torch has).
VIEWABLE_DTYPES: frozenset[torch.dtype] = frozenset(
    d for d in (getattr(torch, n, None) for n in _NAMES) if isinstance(d, torch.dtype)
)


def check_viewable(dtype: torch.dtype, where: str, what: str) -> None:
    """Refuse ``dtype`` unless weightport can view bytes through it.

    Raises:
        CorruptFileError: ``dtype`` is quantized, sub-byte, a bit type or otherwise not plain.
    """
    if dtype not in VIEWABLE_DTYPES:
        raise CorruptFileError(
            f"{where}: {what} has dtype {dtype}, which weightport cannot read as plain values (quantized, "
            "sub-byte and bit dtypes need torch's own kernels; torch never stores them as a plain tensor). "
            "If the file is genuine, load it with torch.load(weights_only=True) and pass the state dict"
        )
