"""State trees as JSON plus tensors: how a checkpoint stores structure without pickle.

An optimizer's, scheduler's or scaler's ``state_dict()``, the RNG states and the
user's ``extra`` are trees of dicts, lists, tuples, numbers, strings and tensors.
:func:`encode` splits such a tree into a strict-JSON document, in which every
tensor is replaced by ``{"$tensor": key}``, and a flat ``{key: tensor}`` table that
goes into the safetensors file. :func:`decode` reverses it exactly: tuples stay
tuples, integer dict keys stay integers, ``inf``/``nan`` survive, floats round-trip
bit for bit (JSON writes the shortest exact ``repr``).

Markers (a JSON object whose keys start with ``$``): ``$tensor``, ``$tuple``,
``$dict`` (non-string or ``$``-prefixed keys), ``$float`` (non-finite),
``$ndarray`` (numpy arrays, stored as bytes), ``$dtype``, ``$device``. Anything
else (a function, a class instance) is refused with the path that holds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from weightport.errors import CheckpointError, WeightportError
from weightport.sources.safetensors import DTYPE_NAMES

__all__ = ["decode", "encode", "render_path"]

_Path = tuple[Any, ...]

# Deeper than any state dict torch or a user builds; no tree, saved or crafted, can exhaust the stack.
MAX_DEPTH = 100


def render_path(root: str, path: _Path) -> str:
    """``optimizer['state'][0]['exp_avg']``: where a value sits, for messages."""
    return root + "".join(f"[{p!r}]" for p in path)


class _Encoder:
    def __init__(self, root: str) -> None:
        self.root = root
        self.tensors: dict[str, torch.Tensor] = {}

    def key_for(self, path: _Path) -> str:
        key = "/".join([self.root, *(str(p) for p in path)])
        n = 1
        while key in self.tensors:  # "0" and 0 as keys of one dict, or a key holding "/"
            key, n = f"{key}~{n}", n + 1
        return key

    def encode(self, x: Any, path: _Path) -> Any:
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if len(path) > MAX_DEPTH:
            raise CheckpointError(
                f"{render_path(self.root, path[:3])}… is nested deeper than {MAX_DEPTH} levels "
                "(a list or dict that contains itself?); a checkpoint stores trees of bounded depth"
            )
        for kind, handler in _HANDLERS:
            if isinstance(x, kind):
                return handler(self, x, path)
        numpy_value = _numpy_encode(self, x, path)
        if numpy_value is not _NOT_NUMPY:
            return numpy_value
        raise CheckpointError(
            f"{render_path(self.root, path)} is a {type(x).__module__}.{type(x).__qualname__}; a checkpoint "
            "holds only tensors, numbers, strings, None, lists, tuples and dicts (no pickled objects). "
            "Store its state (a dict of those) instead"
        )


def _float(enc: _Encoder, x: float, path: _Path) -> Any:
    x = float(x)
    return x if math.isfinite(x) else {"$float": repr(x)}


def _tensor(enc: _Encoder, t: torch.Tensor, path: _Path) -> Any:
    where = render_path(enc.root, path)
    if t.is_meta:
        raise CheckpointError(f"{where} is on the meta device and has no values to save")
    if t.layout != torch.strided:
        raise CheckpointError(f"{where} is a {t.layout} tensor; convert it with .to_dense() before saving")
    if t.dtype not in DTYPE_NAMES:
        raise CheckpointError(f"{where} has dtype {t.dtype}, which safetensors cannot store")
    key = enc.key_for(path)
    enc.tensors[key] = t.detach()
    return {"$tensor": key}


def _sequence(enc: _Encoder, x: list | tuple, path: _Path) -> Any:
    items = [enc.encode(v, (*path, i)) for i, v in enumerate(x)]
    return {"$tuple": items} if isinstance(x, tuple) else items


def _mapping(enc: _Encoder, x: Mapping, path: _Path) -> Any:
    plain = all(isinstance(k, str) and not k.startswith("$") for k in x)
    if plain:
        return {k: enc.encode(v, (*path, k)) for k, v in x.items()}
    pairs = []
    for k, v in x.items():
        if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
            raise CheckpointError(
                f"{render_path(enc.root, path)} has a key of type {type(k).__name__}; "
                "keys must be strings, numbers or tuples of them"
            )
        pairs.append([enc.encode(k, (*path, "<key>")), enc.encode(v, (*path, k))])
    return {"$dict": pairs}


def _dtype(enc: _Encoder, x: torch.dtype, path: _Path) -> Any:
    return {"$dtype": str(x).replace("torch.", "")}


def _device(enc: _Encoder, x: torch.device, path: _Path) -> Any:
    return {"$device": str(x)}


_HANDLERS: tuple[tuple[type | tuple[type, ...], Callable[[_Encoder, Any, _Path], Any]], ...] = (
    (float, _float),
    (torch.Tensor, _tensor),
    ((list, tuple), _sequence),
    (Mapping, _mapping),
    (torch.dtype, _dtype),
    (torch.device, _device),
)

_NOT_NUMPY = object()


def _numpy_encode(enc: _Encoder, x: Any, path: _Path) -> Any:
    np = _numpy()
    if np is None:
        return _NOT_NUMPY
    if isinstance(x, np.generic) and not isinstance(x, (np.void, np.object_)):
        return enc.encode(x.item(), path)
    if isinstance(x, np.ndarray):
        if x.dtype.hasobject:
            raise CheckpointError(
                f"{render_path(enc.root, path)} is a numpy array of Python objects; only numeric arrays can be saved"
            )
        raw = torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.uint8).copy())
        key = enc.key_for(path)
        enc.tensors[key] = raw
        return {"$ndarray": key, "dtype": x.dtype.str, "shape": list(x.shape)}
    return _NOT_NUMPY


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional for checkpoints
        return None
    return numpy


def encode(tree: Any, root: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``tree`` into a strict-JSON document and its tensors, keyed ``root/...``.

    Raises:
        CheckpointError: a value cannot be stored without pickle; the message names where it is.
    """
    enc = _Encoder(root)
    return enc.encode(tree, ()), enc.tensors


# -- decoding --------------------------------------------------------------------------------------

Leaf = Callable[[str], Any]


def decode(doc: Any, leaf: Leaf, where: str = "checkpoint") -> Any:
    """Rebuild the tree; every ``{"$tensor": key}`` becomes ``leaf(key)``.

    Total over any JSON document: whatever the document holds, the only exceptions are a
    :class:`~weightport.errors.WeightportError` and an ``OSError`` from ``leaf`` reading the file.

    Raises:
        CheckpointError: the document holds a marker this version does not know, a malformed
            marker, or is nested deeper than ``MAX_DEPTH``.
    """
    try:
        return _decode(doc, leaf, where, 0)
    except (WeightportError, OSError):  # OSError: ``leaf`` could not read the file
        raise
    except Exception as e:  # any malformed marker is a damaged file, whatever numpy/torch raise
        raise CheckpointError(
            f"{where}: a malformed value in the checkpoint metadata ({type(e).__name__}: {e}); the file is damaged"
        ) from e


def _decode(doc: Any, leaf: Leaf, where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CheckpointError(
            f"{where}: the checkpoint metadata is nested deeper than {MAX_DEPTH}; the file is damaged"
        )
    if isinstance(doc, list):
        return [_decode(v, leaf, where, depth + 1) for v in doc]
    if not isinstance(doc, dict):
        return doc
    marker = next((k for k in doc if isinstance(k, str) and k.startswith("$")), None)
    if marker is None:
        return {k: _decode(v, leaf, where, depth + 1) for k, v in doc.items()}
    decoder = _DECODERS.get(marker)
    if decoder is None:
        raise CheckpointError(
            f"{where}: unknown marker {marker!r}; the checkpoint was written by a newer weightport, or is damaged"
        )
    return decoder(doc, lambda v: _decode(v, leaf, where, depth + 1), leaf, where)


def _key(value: Any, marker: str, where: str) -> str:
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: {marker} names {value!r}, not a tensor key; the file is damaged")
    return value


Inner = Callable[[Any], Any]


def _decode_ndarray(doc: dict, inner: Inner, leaf: Leaf, where: str) -> Any:
    np = _numpy()
    key = _key(doc["$ndarray"], "$ndarray", where)
    if np is None:
        raise CheckpointError(f"{where}: {key!r} is a numpy array; install numpy to read it")
    dtype, shape = doc.get("dtype"), doc.get("shape")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_size(n) for n in shape):
        raise CheckpointError(f"{where}: numpy array {key!r} has a malformed dtype or shape; the file is damaged")
    if np.dtype(dtype).hasobject:
        raise CheckpointError(f"{where}: numpy array {key!r} claims Python objects; the file is damaged")
    raw = leaf(key)
    data = raw.numpy().tobytes() if isinstance(raw, torch.Tensor) else bytes(str(raw), "utf-8")
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def _is_size(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**62


def _decode_dtype(doc: dict, inner: Inner, leaf: Leaf, where: str) -> Any:
    value = getattr(torch, str(doc["$dtype"]), None)
    if not isinstance(value, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype {doc['$dtype']!r}")
    return value


def _decode_float(doc: dict, inner: Inner, leaf: Leaf, where: str) -> float:
    value = doc["$float"]
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: $float holds {value!r}, not a number's text; the file is damaged")
    return float(value)


def _decode_device(doc: dict, inner: Inner, leaf: Leaf, where: str) -> torch.device:
    value = doc["$device"]
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: $device holds {value!r}, not a device name; the file is damaged")
    return torch.device(value)


def _decode_list(doc: dict, marker: str, where: str) -> list:
    value = doc[marker]
    if not isinstance(value, list):
        raise CheckpointError(f"{where}: {marker} holds a {type(value).__name__}, not a list; the file is damaged")
    return value


def _decode_dict(doc: dict, inner: Inner, leaf: Leaf, where: str) -> dict:
    out = {}
    for pair in _decode_list(doc, "$dict", where):
        if not isinstance(pair, list) or len(pair) != 2:
            raise CheckpointError(f"{where}: a $dict entry is not a [key, value] pair; the file is damaged")
        out[_hashable(inner(pair[0]))] = inner(pair[1])
    return out


_DECODERS: dict[str, Callable[[dict, Inner, Leaf, str], Any]] = {
    "$tensor": lambda d, inner, leaf, w: leaf(_key(d["$tensor"], "$tensor", w)),
    "$tuple": lambda d, inner, leaf, w: tuple(inner(v) for v in _decode_list(d, "$tuple", w)),
    "$dict": _decode_dict,
    "$float": _decode_float,
    "$ndarray": _decode_ndarray,
    "$dtype": _decode_dtype,
    "$device": _decode_device,
}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key
