"""The bytes of one pickle stream and the work one load may do: both bounded before anything is allocated."""

from __future__ import annotations

import struct
from typing import Any

from weightport.errors import CorruptFileError

BASE_WORK = 10_000_000  # work units any pickle may use, plus WORK_PER_BYTE per byte of the stream
WORK_PER_BYTE = 4
#: Estimated bytes of Python objects any pickle may create, plus MEMORY_PER_BYTE per byte of the stream.
#: A real state dict creates about 10 bytes of objects per byte of its pickle; one-byte opcodes that
#: each make an empty set, dict or list would create over 200.
BASE_MEMORY = 64 << 20
MEMORY_PER_BYTE = 64

U1, U2, I4, U4, U8, F8 = (struct.Struct(f) for f in ("<B", "<H", "<i", "<I", "<Q", ">d"))


class Reader:
    """Bytes of a pickle stream (``bytes`` or an ``mmap``); never reads past the end."""

    def __init__(self, data: Any, pos: int = 0) -> None:
        self.data = data
        self._view = memoryview(data)
        self.pos = pos
        self.end = len(data)

    def need(self, n: int) -> None:
        if n < 0 or n > self.end - self.pos:
            raise CorruptFileError(
                f"the pickle is truncated: {n} bytes wanted at byte {self.pos}, {self.end - self.pos} left"
            )

    def read(self, n: int) -> bytes:
        self.need(n)
        start, self.pos = self.pos, self.pos + n
        return self._view[start : self.pos].tobytes()

    def byte(self) -> int:
        pos = self.pos
        if pos >= self.end:
            self.need(1)
        self.pos = pos + 1
        return int(self.data[pos])

    def unpack(self, fmt: struct.Struct) -> Any:
        pos = self.pos
        if pos + fmt.size > self.end:
            self.need(fmt.size)
        self.pos = pos + fmt.size
        return fmt.unpack_from(self.data, pos)[0]

    def line(self) -> bytes:
        stop = self.data.find(b"\n", self.pos)
        if stop < 0:
            raise CorruptFileError(f"the pickle is truncated: a line starting at byte {self.pos} never ends")
        start, self.pos = self.pos, stop + 1
        return self._view[start:stop].tobytes()

    def release(self) -> None:
        self._view.release()


class Budget:
    """Work and memory allowed to one load: work is charged per opcode and per element copied or
    checked; memory by the estimated size of every object, container slot and memo entry created."""

    def __init__(self, stream_bytes: int) -> None:
        self.left = BASE_WORK + WORK_PER_BYTE * stream_bytes
        self.memory_left = BASE_MEMORY + MEMORY_PER_BYTE * stream_bytes

    def allocate(self, nbytes: int) -> None:
        self.memory_left -= nbytes
        if self.memory_left < 0:
            raise CorruptFileError(
                "the pickle builds far more objects than its size justifies (a memory amplification "
                f"pattern: over {MEMORY_PER_BYTE} bytes of objects per byte of stream); refusing to read further"
            )

    def charge(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise CorruptFileError(
                "the pickle asks for far more work than its size justifies (a denial-of-service "
                "pattern); refusing to read further"
            )
