"""Tensors are only ever viewed through plain dtypes: a file claiming a quantized, sub-byte or bit
dtype for a storage is refused by name (torch builds such views without a quantizer and crashes)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from hostile_corpus import call, g, prog, s, tup
from torch import nn

import weightport as wp
from weightport.errors import WeightportError
from weightport.sources._dtypes import VIEWABLE_DTYPES

ALL_DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str)


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _data_pkl(storage_type: str, dtype: str | None, numel: int) -> bytes:
    """``{"weight": tensor}`` over storage ``"0"``: ``_rebuild_tensor_v2``, or ``_v3`` with ``dtype``."""
    pid = tup(s("storage"), g("torch", storage_type), s("0"), s("cpu"), _int(numel)) + b"Q"
    args = [pid, _int(0), tup(_int(2), _int(2)), tup(_int(2), _int(1)), b"\x89", call(g("collections", "OrderedDict"))]
    if dtype is None:
        tensor = call(g("torch._utils", "_rebuild_tensor_v2"), *args)
    else:
        tensor = call(g("torch._utils", "_rebuild_tensor_v3"), *args, g("torch", dtype))
    return prog(b"}" + s("weight") + tensor + b"s")


def zip_file(path: Path, storage_type: str, dtype: str | None = None, nbytes: int = 64) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", _data_pkl(storage_type, dtype, nbytes))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", bytes(range(1, nbytes + 1)))
        z.writestr("archive/version", "3\n")
    return path


def legacy_file(path: Path, storage_type: str) -> Path:
    """A pre-1.6 torch file with one quantized storage of 4 one-byte elements."""
    buf = io.BytesIO()
    torch.save({"weight": torch.ones(2, 2, dtype=torch.uint8)}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue().replace(b"ByteStorage", storage_type.encode())
    path.write_bytes(raw)
    return path


QUANTIZED = [("QUInt8Storage", None), ("QInt8Storage", None), ("QInt32Storage", None), ("ByteStorage", "quint8")]


@pytest.mark.slow
def test_quantized_storage_is_refused_without_crashing_the_process(tmp_path):
    """In a subprocess, since the failure this guards against is a segfault of the interpreter."""
    paths = [zip_file(tmp_path / f"q{i}.pth", st, dt) for i, (st, dt) in enumerate(QUANTIZED)]
    paths.append(legacy_file(tmp_path / "legacy.pth", "QUInt8Storage"))
    script = textwrap.dedent(
        f"""
        from torch import nn
        import weightport as wp
        from weightport.errors import WeightportError
        for path in {[str(p) for p in paths]!r}:
            try:
                wp.transfer(path, nn.Linear(2, 2, bias=False))
                print("LOADED", path)
            except WeightportError as e:
                print("REFUSED", e)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    lines = done.stdout.splitlines()
    assert len(lines) == len(paths) and all(line.startswith("REFUSED") and "torch.q" in line for line in lines), lines


@pytest.mark.parametrize(("storage_type", "dtype"), QUANTIZED)
def test_quantized_storage_in_a_zip_is_refused_by_name(tmp_path, storage_type, dtype):
    path = zip_file(tmp_path / "q.pth", storage_type, dtype)
    with pytest.raises(WeightportError, match=r"'weight'.*torch\.q") as err:
        wp.transfer(str(path), nn.Linear(2, 2, bias=False))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("storage_type", ["QUInt8Storage", "QInt8Storage"])
def test_quantized_storage_in_a_legacy_file_is_refused(tmp_path, storage_type):
    path = legacy_file(tmp_path / "q.pth", storage_type)
    with pytest.raises(WeightportError, match=r"torch\.q") as err:
        wp.transfer(str(path), nn.Linear(2, 2, bias=False), check_finite=True)
    assert str(path) in str(err.value)


def test_quantized_storage_is_refused_for_a_model_on_meta(tmp_path):
    path = zip_file(tmp_path / "q.pth", "QUInt8Storage")
    with wp.init_empty():
        model = nn.Linear(2, 2, bias=False)
    with pytest.raises(WeightportError, match="quint8"):
        wp.transfer(str(path), model)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_torch_dtype_is_read_or_refused_by_name(tmp_path, dtype):
    """Over every dtype torch has, a v3 override on a byte storage is read faithfully or refused by name."""
    path = zip_file(tmp_path / "t.pth", "UntypedStorage", str(dtype).removeprefix("torch."))
    if dtype in VIEWABLE_DTYPES:
        got = wp.open_source(str(path))["weight"]
        raw = torch.frombuffer(bytearray(range(1, 65)), dtype=torch.uint8)
        assert torch.equal(got.view(torch.uint8).reshape(-1), raw[: 4 * dtype.itemsize].view(torch.uint8))
    else:
        with pytest.raises(WeightportError) as err:
            src = wp.open_source(str(path))
            src["weight"].clone()
        assert str(dtype) in str(err.value) and "'weight'" in str(err.value)
