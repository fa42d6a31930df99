"""Memory-mapped weight files and lazy references to the tensors inside them.

A :class:`MappedFile` maps a file copy-on-write (writes never reach the disk)
and hands out zero-copy tensor views. Nothing is read until a view is touched;
:meth:`MappedFile.release` drops the pages of a view from this process once its
values have been copied, so reading a whole checkpoint never holds more than
the tensor in flight beyond the destination.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Callable
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

import torch

from weightport.errors import CorruptFileError, SourceNotFoundError
from weightport.sources._dtypes import check_viewable
from weightport.sources.base import TensorMeta

_PAGE = mmap.PAGESIZE
#: Most buffers one ``preadv`` call takes (the system's limit, 1024 on Linux).
IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024))


class MappedFile:
    """A read-only, copy-on-write mapping of one file, mapped on first use.

    The file is opened when the object is made and the descriptor kept until :meth:`close`: a file
    deleted or renamed over after a source was opened (between plan and apply) is still read whole,
    as it was. Changing its bytes in place is not guarded against (see SECURITY.md).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._fd = _open(self.path)
        self.size = os.fstat(self._fd).st_size

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with self._lock:
                if self._mm is None:
                    if self.size == 0:
                        raise CorruptFileError(f"{self.path}: the file is empty")
                    self._mm = mmap.mmap(self._descriptor(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def check_range(self, offset: int, nbytes: int, what: str) -> None:
        """Raise :class:`CorruptFileError` if ``[offset, offset+nbytes)`` is outside the file."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CorruptFileError(
                f"{self.path}: {what} spans bytes {offset}..{offset + nbytes} but the file has "
                f"{self.size} bytes; the file is truncated or damaged, download or save it again"
            )

    def view(self, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat zero-copy tensor over ``nbytes`` bytes at ``offset``."""
        check_viewable(dtype, self.path, f"the tensor at byte {offset}")
        itemsize = _itemsize(dtype)
        count = nbytes // itemsize
        if count == 0:
            return torch.empty(0, dtype=dtype)
        mapped = self._map()
        if offset + count * itemsize > len(mapped):
            raise CorruptFileError(
                f"{self.path}: bytes {offset}..{offset + nbytes} are past the end of the file "
                f"({len(mapped)} bytes); it was truncated or replaced after it was opened; open it again"
            )
        return torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset)

    def _descriptor(self) -> int:
        fd = self._fd
        if fd is None:  # closed, then used again: open the path anew
            fd = self._fd = _open(self.path)
        return fd

    def read_run(self, offset: int, outs: list[torch.Tensor]) -> None:
        """Fill contiguous CPU tensors ``outs`` (one or many) from the bytes that follow one another
        from ``offset``: one ``preadv`` for up to :data:`IOV_MAX` tensors. Every read of a file into
        a tensor goes through here."""
        fd = self._descriptor()
        bufs = list(map(_buffer_of, outs))
        sizes = list(map(_nbytes, outs))
        for i in range(0, len(bufs), IOV_MAX):
            chunk = bufs[i : i + IOV_MAX]
            n = os.preadv(fd, chunk, offset)
            for buf, size in zip(chunk, sizes[i : i + IOV_MAX]):  # a short read (rare): finish it
                if n < size:
                    done = max(n, 0)
                    self._read_exact(fd, memoryview(buf).cast("B")[done:], offset + done)
                n -= size
                offset += size

    def _read_exact(self, fd: int, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n <= 0:
                raise CorruptFileError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += n

    def release(self, offset: int, nbytes: int) -> None:
        """Drop the pages of ``[offset, offset+nbytes)`` from this process (a hint)."""
        if self._mm is None or nbytes <= 0:
            return
        start = offset - offset % _PAGE
        end = min(self.size, offset + nbytes)
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError, AttributeError):  # a hint only; not on every platform
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive; the mapping goes with them
                return
            self._mm = None

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # os.close is bound at definition: at interpreter exit the os module may already be gone
        fd = getattr(self, "_fd", None)  # absent when __init__ failed
        if fd is not None:
            self._fd = None
            try:
                _close(fd)
            except OSError:  # already closed at interpreter exit; nothing left to release
                pass


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise SourceNotFoundError(f"{path}: the file is gone (deleted or moved after it was found)") from e
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot be opened for reading ({e.strerror or e})") from e


_nbytes = attrgetter("nbytes")


def _buffer_of(out: torch.Tensor) -> Any:
    """A writable buffer over contiguous CPU tensor ``out``: its numpy array where numpy knows the
    dtype (the cheapest to make), else a byte view."""
    try:
        return out.numpy()
    except (TypeError, RuntimeError):  # bfloat16, float8 …: no numpy dtype
        return memoryview(out.reshape(-1).view(torch.uint8).numpy().data)


def first_overlap(spans: list[tuple[int, int, str]]) -> tuple[tuple[int, int, str], tuple[int, int, str]] | None:
    """Two of the byte ranges ``(begin, end, name)`` that overlap, or ``None``; empty ranges overlap nothing.

    A damaged or forged file can make two tensors share bytes; both readers refuse that.
    """
    furthest: tuple[int, int, str] | None = None  # the non-empty range reaching furthest so far
    for span in sorted(s for s in spans if s[1] > s[0]):
        if furthest is not None and span[0] < furthest[1]:
            return furthest, span
        if furthest is None or span[1] > furthest[1]:
            furthest = span
    return None


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


class TensorRef(NamedTuple):
    """Where one tensor lives in a mapped file: a (possibly strided) view of a storage.

    A named tuple: a source holds one per tensor, and 100k of them must be cheap to make.

    Attributes:
        file: The mapped file.
        offset: Byte offset of the storage's first element in the file.
        storage_numel: Number of elements in the storage.
        dtype: Element type.
        shape: Shape of the tensor.
        stride: Strides in elements, or ``None`` for contiguous.
        storage_offset: Offset of the tensor's first element in the storage, in elements.
        byteswap: The file stores big-endian data.
    """

    file: MappedFile
    offset: int
    storage_numel: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None
    storage_offset: int = 0
    byteswap: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def meta(self) -> TensorMeta:
        return TensorMeta._make((self.shape, self.dtype))

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    @property
    def contiguous(self) -> bool:
        return self.stride is None or self.stride == _contiguous_stride(self.shape)

    def validate(self, what: str) -> None:
        """Check that every element the view can touch lies inside the file."""
        itemsize = _itemsize(self.dtype)
        self.file.check_range(self.offset, self.storage_numel * itemsize, what)
        if self.numel == 0:
            return
        stride = self.stride or _contiguous_stride(self.shape)
        if any(s < 0 for s in stride) or self.storage_offset < 0:
            raise CorruptFileError(f"{self.file.path}: {what} has negative strides or offset")
        last = self.storage_offset + sum((n - 1) * s for n, s in zip(self.shape, stride))
        if last >= self.storage_numel:
            raise CorruptFileError(
                f"{self.file.path}: {what} reads element {last} of a storage of "
                f"{self.storage_numel}; the file is damaged"
            )

    def view(self) -> torch.Tensor:
        """A zero-copy tensor (a copy only when the file is big-endian)."""
        itemsize = _itemsize(self.dtype)
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        flat = self.file.view(self.offset, self.storage_numel * itemsize, self.dtype)
        if self.byteswap:
            flat = _byteswap(flat)
        stride = self.stride or _contiguous_stride(self.shape)
        return flat.as_strided(self.shape, stride, self.storage_offset)

    def direct_offset(self, out: torch.Tensor) -> int | None:
        """The file offset to read ``out``'s bytes from as they are, or ``None`` when they need a
        view and a copy (strided, big-endian, another dtype or device, empty)."""
        if (
            out.dtype == self.dtype
            and out.is_cpu
            and not self.byteswap
            and self.contiguous
            and out.is_contiguous()
            and out.numel() > 0
        ):
            return self.offset + self.storage_offset * _itemsize(self.dtype)
        return None

    def read_into(self, out: torch.Tensor) -> None:
        """Fill ``out`` (same shape) with this tensor's values, reading once."""
        offset = self.direct_offset(out)
        if offset is not None:
            self.file.read_run(offset, [out])
            return
        out.copy_(self.view())
        self.release()

    def read_region(self, box: tuple[tuple[int, int], ...], out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The values inside ``box`` ((start, length) per dimension) in ``out`` (contiguous, on the
        CPU, the box's shape and this dtype) or a new tensor, reading only the box's byte ranges:
        one ``preadv`` per run of bytes that lie together in the file (one for a block of whole
        rows, one per row for a block of columns). ``None`` when the tensor is not one native block
        (strided, big-endian): then the caller reads it whole."""
        if self.byteswap or not self.contiguous or not box:
            return None
        if out is None:
            out = torch.empty(tuple(length for _, length in box), dtype=self.dtype)
        if out.numel() == 0:
            return out
        # the innermost dimensions the box covers whole are read with the first one it cuts
        cut = len(box) - 1
        while cut > 0 and box[cut] == (0, self.shape[cut]):
            cut -= 1
        itemsize = _itemsize(self.dtype)
        stride = _contiguous_stride(self.shape)
        run = box[cut][1] * stride[cut] * itemsize  # bytes per run
        base = self.offset + self.storage_offset * itemsize + box[cut][0] * stride[cut] * itemsize
        flat = out.view(-1, run // itemsize)
        fd_offsets = [0]
        for d in range(cut - 1, -1, -1):  # every index of the dimensions before the cut, in row-major order
            start, length = box[d]
            step = stride[d] * itemsize
            fd_offsets = [(start + i) * step + o for i in range(length) for o in fd_offsets]
        for row, off in zip(flat, fd_offsets):
            self.file.read_run(base + off, [row])
        return out

    def release(self) -> None:
        itemsize = _itemsize(self.dtype)
        self.file.release(self.offset, self.storage_numel * itemsize)


def read_refs(refs: list[TensorRef], outs: list[torch.Tensor]) -> None:
    """``ref.read_into(out)`` for each pair; tensors lying back to back in one file are read by
    :meth:`MappedFile.read_run`, in file order."""
    direct: list[tuple[int, int, MappedFile, torch.Tensor]] = []
    for ref, out in zip(refs, outs):
        offset = ref.direct_offset(out)
        if offset is None:
            ref.read_into(out)
        else:
            direct.append((id(ref.file), offset, ref.file, out))
    direct.sort(key=itemgetter(0, 1))  # by file, then offset
    run: list[torch.Tensor] = []
    start = end = 0
    file: MappedFile | None = None
    for _, offset, f, out in direct:
        if f is not file or offset != end:
            if run:
                file.read_run(start, run)  # type: ignore[union-attr]
            run, start, end, file = [], offset, offset, f
        run.append(out)
        end += out.nbytes
    if run:
        file.read_run(start, run)  # type: ignore[union-attr]


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _byteswap(flat: torch.Tensor) -> torch.Tensor:
    itemsize = flat.element_size()
    raw = flat.view(torch.uint8).reshape(-1, itemsize).flip(1).contiguous()
    return raw.view(flat.dtype).reshape(-1)
