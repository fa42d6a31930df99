"""A restricted pickle machine: reads torch files and plain pickles without importing or
calling anything the file names.

Python's unpickler is not used: a pickle is a program, and CPython's ``Unpickler``
runs it with ``getattr``, ``__setstate__``, ``extend`` … on whatever objects the
program builds (and its C implementation pre-allocates memo tables as large as an
index the file chooses). Here every opcode is implemented on purpose; an opcode
not in the table is refused.

* ``GLOBAL`` / ``STACK_GLOBAL`` / ``INST`` resolve names through :data:`_SAFE`, a
  fixed table of stand-ins (our own versions of torch's tensor rebuild functions,
  which record where bytes live instead of reading them; ``OrderedDict``; dtypes;
  numpy array reconstruction from raw bytes). Every other name becomes an
  :class:`Inert` placeholder class made for this load only. Nothing is imported.
* ``REDUCE`` / ``NEWOBJ`` / ``NEWOBJ_EX`` / ``OBJ`` / ``INST`` call only those
  stand-ins; calling a placeholder records its arguments.
* ``BUILD`` records state on placeholders (a pickled ``nn.Module``'s
  ``_parameters``/``_buffers``/``_modules``), completes numpy records, or sets
  the attributes of an ``OrderedDict`` (a state dict's ``_metadata``); nothing else.
* ``APPEND(S)`` / ``SETITEM(S)`` / ``ADDITEMS`` touch only lists, dicts, sets and
  placeholders. Dict keys and set members are checked *before* they are hashed
  (hashing a deeply nested tuple crashes CPython).
* ``EXT1/2/4`` (the global extension registry) and out-of-band buffers are refused.
* Every length is checked against the bytes left before anything is allocated, and
  a work budget proportional to the stream's size bounds time and memory.

Anything wrong raises :class:`~weightport.errors.CorruptFileError`.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import struct
from collections.abc import Callable
from typing import Any

import torch

from weightport.errors import CorruptFileError
from weightport.sources._standins import (
    SAFE,
    TORCH_ONLY,
    Inert,
    NpDtype,
    NumpyArray,
    PickledTensor,
    StandIn,
    StorageRef,
    inert_name,
)

__all__ = ["Inert", "NeedsTorchLoad", "NumpyArray", "PickledTensor", "RestrictedUnpickler", "StorageRef", "inert_name"]

BASE_WORK = 10_000_000  # work units any pickle may use, plus WORK_PER_BYTE per byte of the stream
WORK_PER_BYTE = 4
MAX_GLOBALS = 10_000  # distinct pickled globals; real checkpoints name a few hundred at most
MAX_KEY_DEPTH = 8


class NeedsTorchLoad(Exception):
    """A tensor kind we do not rebuild lazily (quantized, sparse …); torch's own
    ``weights_only=True`` loader reads the whole file instead."""


# -- reading -------------------------------------------------------------------------------------


class _Reader:
    """Bytes of a pickle stream (``bytes`` or an ``mmap``); never reads past the end."""

    def __init__(self, data: Any, pos: int = 0) -> None:
        self._data = data
        self._view = memoryview(data)
        self.pos = pos
        self.end = len(data)

    def _need(self, n: int) -> None:
        if n < 0 or n > self.end - self.pos:
            raise CorruptFileError(
                f"the pickle is truncated: {n} bytes wanted at byte {self.pos}, {self.end - self.pos} left"
            )

    def read(self, n: int) -> bytes:
        self._need(n)
        start, self.pos = self.pos, self.pos + n
        return self._view[start : self.pos].tobytes()

    def byte(self) -> int:
        pos = self.pos
        if pos >= self.end:
            self._need(1)
        self.pos = pos + 1
        return int(self._data[pos])

    def unpack(self, fmt: struct.Struct) -> Any:
        pos = self.pos
        if pos + fmt.size > self.end:
            self._need(fmt.size)
        self.pos = pos + fmt.size
        return fmt.unpack_from(self._data, pos)[0]

    def line(self) -> bytes:
        stop = self._data.find(b"\n", self.pos)
        if stop < 0:
            raise CorruptFileError(f"the pickle is truncated: a line starting at byte {self.pos} never ends")
        start, self.pos = self.pos, stop + 1
        return self._view[start:stop].tobytes()

    def release(self) -> None:
        self._view.release()


_U1, _U2, _I4, _U4, _U8, _F8 = (struct.Struct(f) for f in ("<B", "<H", "<i", "<I", "<Q", ">d"))


class _Budget:
    """Work allowed to one load: charged per opcode and per element copied or checked."""

    def __init__(self, stream_bytes: int) -> None:
        self.left = BASE_WORK + WORK_PER_BYTE * stream_bytes

    def charge(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise CorruptFileError(
                "the pickle asks for far more work than its size justifies (a denial-of-service "
                "pattern); refusing to read further"
            )


# -- the machine ---------------------------------------------------------------------------------

_KEY_ATOMS = (str, bytes, int, float, bool, type(None), complex, torch.dtype, torch.device, Inert)
_OPS: dict[int, Callable[[RestrictedUnpickler], Any]] = {}


class RestrictedUnpickler:
    """Runs one pickle stream under the rules in the module docstring.

    Args:
        data: The stream: ``bytes`` or an ``mmap`` (read from ``start``; the stream ends at its STOP).
        storage: ``persistent_load``: turns a persistent id into a :class:`StorageRef` (or refuses).
        start: Offset of the stream in ``data``.
        budget: Work budget shared with an enclosing load (embedded storages).

    Attributes:
        unsafe_globals: Every ``module.name`` replaced by a placeholder, in order of first use.
        pos: Where the stream ended (after :meth:`load`).
    """

    def __init__(
        self,
        data: Any,
        storage: Callable[[Any], Any] | None = None,
        *,
        start: int = 0,
        budget: _Budget | None = None,
        embedded: bool = False,
    ) -> None:
        self._reader = _Reader(data, start)
        self._storage = storage
        self.budget = budget or _Budget(len(data) - start)
        self.embedded = embedded
        self.unsafe_globals: list[str] = []
        self._classes: dict[str, type[Inert]] = {}
        self.memo: dict[int, Any] = {}
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []

    @property
    def pos(self) -> int:
        return self._reader.pos

    def load(self) -> Any:
        """Run the stream to its STOP and return the object it built.

        Raises:
            CorruptFileError: The stream is damaged, hostile, or uses something torch never writes.
            NeedsTorchLoad: A tensor kind only torch's own loader rebuilds.
        """
        try:
            return self._run()
        except (CorruptFileError, NeedsTorchLoad):
            raise
        except RecursionError as e:
            raise CorruptFileError("the pickle nests too deeply to read") from e
        except Exception as e:
            raise CorruptFileError(f"the pickle cannot be read ({type(e).__name__}: {e})") from e
        finally:
            self._reader.release()

    def _run(self) -> Any:
        reader, budget, ops = self._reader, self.budget, _OPS
        data, steps = reader._data, 0
        while True:
            pos = reader.pos
            if pos >= reader.end:
                reader._need(1)
            code = data[pos]
            reader.pos = pos + 1
            if code == 0x2E:  # STOP
                budget.charge(steps)
                if not self.stack:
                    raise CorruptFileError("the pickle stops with nothing built")
                return self.stack.pop()
            handler = ops.get(code)
            if handler is None:
                raise CorruptFileError(
                    f"the pickle uses opcode {bytes([code])!r} at byte {pos}, which weightport does not run"
                )
            steps += 1
            if steps == 1024:  # one opcode, one unit of work: charged in batches
                budget.charge(steps)
                steps = 0
            handler(self)

    # -- used by the opcodes and the stand-ins ---------------------------------------------------------
    def placeholder(self, qualname: str) -> type[Inert]:
        """The placeholder class for ``qualname``, made once per load."""
        cls = self._classes.get(qualname)
        if cls is None:
            if len(self._classes) >= MAX_GLOBALS:
                raise CorruptFileError(f"the pickle names more than {MAX_GLOBALS} distinct globals")
            cls = type("Inert", (Inert,), {"__slots__": (), "qualname": qualname, "__module__": __name__})
            self._classes[qualname] = cls
        return cls

    def check_key(self, key: Any, depth: int = 0) -> None:
        """Refuse a dict key or set member whose hashing could run code or crash the interpreter."""
        self.budget.charge(1)
        if isinstance(key, _KEY_ATOMS):
            return
        if isinstance(key, (tuple, frozenset)) and depth < MAX_KEY_DEPTH:
            for k in key:
                self.check_key(k, depth + 1)
            return
        raise CorruptFileError(f"the pickle uses a {type(key).__name__} (or one nested too deeply) as a key")

    def check_keys(self, items: list[Any]) -> list[Any]:
        for item in items:
            self.check_key(item)
        return items

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 spellings (``__builtin__.set``)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = SAFE.get((module, name))
        if found is not None:
            return found
        if (module, name) in TORCH_ONLY:
            raise NeedsTorchLoad(f"{module}.{name}")
        qualname = _printable(f"{module}.{name}")
        if qualname not in self._classes:
            self.unsafe_globals.append(qualname)
        return self.placeholder(qualname)

    def stack_global(self, name: Any, module: Any) -> Any:
        if type(name) is not str or type(module) is not str:
            raise CorruptFileError("the pickle names a global with something that is not a string")
        return self.find_class(module, name)

    def call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        if not isinstance(args, tuple) or not (kwargs is None or isinstance(kwargs, dict)):
            raise CorruptFileError("the pickle calls something with malformed arguments")
        if kwargs and not all(type(k) is str for k in kwargs):
            raise CorruptFileError("the pickle passes keyword arguments that are not strings")
        self.budget.charge(len(args) + len(kwargs or ()) + sum(_width(a) for a in args))
        if isinstance(func, StandIn):
            return func(self, *args, **(kwargs or {}))
        if isinstance(func, type) and issubclass(func, Inert):
            return func(args, kwargs)
        if isinstance(func, Inert):
            name = func.qualname if func.qualname.endswith("(...)") else f"{func.qualname}(...)"
            return self.placeholder(name)(args, kwargs)  # nested calls share one name: no growth
        raise CorruptFileError(f"the pickle calls a {type(func).__name__}, which weightport never calls")

    def call_object(self, items: list[Any]) -> Any:
        if not items:
            raise CorruptFileError("the pickle builds an object without a class")
        return self.call(items[0], tuple(items[1:]))

    def build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, Inert):
            obj.state = state
        elif isinstance(obj, (NumpyArray, NpDtype)):
            obj.build(state)
        elif type(obj) is collections.OrderedDict:  # a state dict's ``_metadata`` attribute
            for part in state if isinstance(state, tuple) and len(state) == 2 else (state,):
                if part is None:
                    continue
                if not isinstance(part, dict) or not all(type(k) is str for k in part):
                    raise CorruptFileError("the pickle sets malformed attributes on a dict")
                shadowing = [k for k in part if k.startswith("__") or hasattr(collections.OrderedDict, k)]
                if shadowing:  # ``items``, ``get``, ``__setstate__`` … would shadow the dict's own methods
                    raise CorruptFileError(
                        f"the pickle sets attribute {_printable(shadowing[0])!r} on a dict, which would hide its "
                        "methods"
                    )
                self.budget.charge(len(part))
                obj.__dict__.update(part)
        else:
            raise CorruptFileError(f"the pickle sets the state of a {type(obj).__name__}, which torch never does")

    def extend(self, target: Any, items: list[Any]) -> None:
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, Inert):
            target.appended.extend(items)
        else:
            raise CorruptFileError(f"the pickle appends to a {type(target).__name__}")

    def setitems(self, target: Any, items: list[Any]) -> Any:
        if len(items) % 2:
            raise CorruptFileError("the pickle sets items from an odd number of values")
        pairs = list(zip(items[::2], items[1::2]))
        if isinstance(target, Inert):
            target.setitems.extend(pairs)
        elif type(target) in (dict, collections.OrderedDict):
            for k, v in pairs:
                self.check_key(k)
                target[k] = v
        else:
            raise CorruptFileError(f"the pickle sets items on a {type(target).__name__}")
        return target

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise CorruptFileError("the pickle pops a mark it never set")
        items, self.stack = self.stack, self.marks.pop()
        self.budget.charge(len(items))
        return items

    def memo_get(self, index: int) -> Any:
        if index not in self.memo:
            raise CorruptFileError(f"the pickle reads memo entry {index}, which was never stored")
        return self.memo[index]

    def persistent(self, pid: Any) -> Any:
        if self._storage is None:
            raise CorruptFileError("the pickle references external storage, which this stream cannot have")
        return self._storage(pid)

    def _text(self, raw: bytes) -> Any:
        """A Python 2 byte string: text when it decodes as UTF-8, else the bytes (numpy payloads)."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw


def _width(x: Any) -> int:
    return len(x) if isinstance(x, (list, tuple, dict, set, frozenset, str, bytes, bytearray)) else 0


def _printable(text: str, limit: int = 200) -> str:
    if len(text) <= limit and text.isprintable():
        return text
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("…" if len(text) > limit else "")


def _read_int(m: RestrictedUnpickler, fmt: struct.Struct) -> int:
    return int(m._reader.unpack(fmt))


def _simple(code: bytes, make: Callable[[RestrictedUnpickler], Any]) -> None:
    """An opcode that pushes one value (computed first: it may pop a mark and switch stacks)."""

    def push(m: RestrictedUnpickler) -> None:
        value = make(m)
        m.stack.append(value)

    _OPS[code[0]] = push


def _sized(fmt: struct.Struct) -> Callable[[RestrictedUnpickler], bytes]:
    return lambda m: m._reader.read(_read_int(m, fmt))


def _memo_index(fmt: struct.Struct | None) -> Callable[[RestrictedUnpickler], int]:
    return lambda m: int(m._reader.line()) if fmt is None else _read_int(m, fmt)


# -- opcodes that push a value -----------------------------------------------------------------------

_Make = Callable[[RestrictedUnpickler], Any]


def _const(value: Any) -> _Make:
    return lambda m: value


def _int_of(fmt: struct.Struct) -> _Make:
    return lambda m: _read_int(m, fmt)


def _long_of(fmt: struct.Struct) -> _Make:
    return lambda m: int.from_bytes(_sized(fmt)(m), "little", signed=True)


def _unicode_of(fmt: struct.Struct) -> _Make:
    return lambda m: str(_sized(fmt)(m), "utf-8", "surrogatepass")


def _py2_string_of(fmt: struct.Struct) -> _Make:
    return lambda m: m._text(_sized(fmt)(m))


def _empty_of(kind: type) -> _Make:
    return lambda m: kind()


def _get_of(fmt: struct.Struct | None) -> _Make:
    return lambda m: m.memo_get(_memo_index(fmt)(m))


for _code, _make in {
    b"N": _const(None),
    b"\x88": _const(True),
    b"\x89": _const(False),  # NONE NEWTRUE NEWFALSE
    b"J": _int_of(_I4),
    b"K": _int_of(_U1),
    b"M": _int_of(_U2),  # BININT BININT1 BININT2
    b"\x8a": _long_of(_U1),
    b"\x8b": _long_of(_I4),  # LONG1 LONG4
    b"X": _unicode_of(_U4),
    b"\x8c": _unicode_of(_U1),
    b"\x8d": _unicode_of(_U8),  # BINUNICODE …
    b"B": _sized(_U4),
    b"C": _sized(_U1),
    b"\x8e": _sized(_U8),  # BINBYTES SHORT_BINBYTES BINBYTES8
    b"T": _py2_string_of(_I4),
    b"U": _py2_string_of(_U1),  # BINSTRING SHORT_BINSTRING (Python 2)
    b")": _empty_of(tuple),
    b"]": _empty_of(list),
    b"}": _empty_of(dict),
    b"\x8f": _empty_of(set),
    b"g": _get_of(None),
    b"h": _get_of(_U1),
    b"j": _get_of(_U4),  # GET BINGET LONG_BINGET
}.items():
    _simple(_code, _make)
_simple(b"\x96", lambda m: bytearray(_sized(_U8)(m)))  # BYTEARRAY8
_simple(b"G", lambda m: float(m._reader.unpack(_F8)))  # BINFLOAT
_simple(b"F", lambda m: float(m._reader.line()))  # FLOAT
_simple(b"V", lambda m: str(m._reader.line(), "raw-unicode-escape"))  # UNICODE
_simple(b"I", lambda m: _text_int(m._reader.line()))  # INT
_simple(b"L", lambda m: int(m._reader.line().rstrip(b"L"), 0))  # LONG
_simple(b"S", lambda m: m._text(_quoted(m._reader.line())))  # STRING
_simple(b"c", lambda m: m.find_class(m._reader.line().decode("utf-8"), m._reader.line().decode("utf-8")))
_simple(b"P", lambda m: m.persistent(m._reader.line().decode("ascii")))  # PERSID
_simple(b"Q", lambda m: m.persistent(m.stack.pop()))  # BINPERSID
_simple(b"2", lambda m: m.stack[-1])  # DUP
_simple(b"t", lambda m: tuple(m.pop_mark()))  # TUPLE
_simple(b"l", lambda m: m.pop_mark())  # LIST
_simple(b"d", lambda m: m.setitems({}, m.pop_mark()))  # DICT
_simple(b"\x91", lambda m: frozenset(m.check_keys(m.pop_mark())))  # FROZENSET
_simple(b"\x93", lambda m: m.stack_global(m.stack.pop(), m.stack.pop()))  # STACK_GLOBAL
_simple(b"o", lambda m: m.call_object(m.pop_mark()))  # OBJ
_simple(
    b"i",
    lambda m: m.call(
        m.find_class(m._reader.line().decode("ascii"), m._reader.line().decode("ascii")), tuple(m.pop_mark())
    ),
)  # INST


def _text_int(line: bytes) -> Any:
    return False if line == b"00" else True if line == b"01" else int(line, 0)


def _quoted(line: bytes) -> bytes:
    if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
        raise CorruptFileError("the pickle holds a malformed quoted string")
    return codecs.escape_decode(line[1:-1])[0]


# -- opcodes that change what is already built -------------------------------------------------------


def _tuple_n(n: int) -> Callable[[RestrictedUnpickler], None]:
    def run(m: RestrictedUnpickler) -> None:
        if len(m.stack) < n:
            raise CorruptFileError("the pickle builds a tuple from values it does not have")
        items = tuple(m.stack[len(m.stack) - n :])
        del m.stack[len(m.stack) - n :]
        m.stack.append(items)

    return run


def _frame(m: RestrictedUnpickler) -> None:
    """FRAME: a read-ahead hint; the frame's bytes are the stream itself."""
    if _read_int(m, _U8) > m._reader.end - m.pos:
        raise CorruptFileError("the pickle declares a frame that runs past its end")


def _proto(m: RestrictedUnpickler) -> None:
    if m._reader.byte() > 5:
        raise CorruptFileError("the pickle declares an unknown protocol")


def _put(fmt: struct.Struct | None) -> Callable[[RestrictedUnpickler], None]:
    def run(m: RestrictedUnpickler) -> None:
        index = _memo_index(fmt)(m)
        if index < 0:
            raise CorruptFileError("the pickle stores a negative memo index")
        m.memo[index] = m.stack[-1]

    return run


def _pop(m: RestrictedUnpickler) -> None:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()


def _reduce(m: RestrictedUnpickler) -> None:  # REDUCE and NEWOBJ: callable, args
    args = m.stack.pop()
    m.stack[-1] = m.call(m.stack[-1], args)


def _newobj_ex(m: RestrictedUnpickler) -> None:
    kwargs, args = m.stack.pop(), m.stack.pop()
    m.stack[-1] = m.call(m.stack[-1], args, kwargs)


def _item(m: RestrictedUnpickler) -> None:  # SETITEM
    value, key = m.stack.pop(), m.stack.pop()
    m.setitems(m.stack[-1], [key, value])


def _additems(m: RestrictedUnpickler) -> None:
    items = m.pop_mark()
    if type(m.stack[-1]) is not set:
        raise CorruptFileError(f"the pickle adds set items to a {type(m.stack[-1]).__name__}")
    m.stack[-1].update(m.check_keys(items))


def _build(m: RestrictedUnpickler) -> None:
    state = m.stack.pop()
    m.build(m.stack[-1], state)


def _append(m: RestrictedUnpickler) -> None:
    value = m.stack.pop()
    m.extend(m.stack[-1], [value])


def _appends(m: RestrictedUnpickler) -> None:
    items = m.pop_mark()
    m.extend(m.stack[-1], items)


def _setitems(m: RestrictedUnpickler) -> None:
    items = m.pop_mark()
    m.setitems(m.stack[-1], items)


def _readonly_buffer(m: RestrictedUnpickler) -> None:  # a no-op on in-band data
    m.stack[-1]


def _mark(m: RestrictedUnpickler) -> None:
    m.marks.append(m.stack)
    m.stack = []


_OPS.update(
    {
        0x80: _proto,
        0x95: _frame,
        ord("("): _mark,
        ord("0"): _pop,
        ord("1"): lambda m: m.pop_mark() and None,  # POP_MARK
        0x85: _tuple_n(1),
        0x86: _tuple_n(2),
        0x87: _tuple_n(3),
        ord("p"): _put(None),
        ord("q"): _put(_U1),
        ord("r"): _put(_U4),
        0x94: lambda m: m.memo.__setitem__(len(m.memo), m.stack[-1]),  # MEMOIZE
        ord("R"): _reduce,
        0x81: _reduce,
        0x92: _newobj_ex,
        ord("b"): _build,
        ord("a"): _append,
        ord("e"): _appends,
        ord("s"): _item,
        ord("u"): _setitems,
        0x90: _additems,
        0x98: _readonly_buffer,
    }
)
# STOP ('.') is handled by the machine's loop; EXT1/2/4, NEXT_BUFFER and anything else are refused.


# -- fast paths for the opcodes every state dict is made of (same semantics as the generic forms) --------


def _next_byte(m: RestrictedUnpickler) -> int:
    r = m._reader
    pos = r.pos
    if pos >= r.end:
        r._need(1)
    r.pos = pos + 1
    return int(r._data[pos])


def _binput(m: RestrictedUnpickler) -> None:  # q
    m.memo[_next_byte(m)] = m.stack[-1]


def _binget(m: RestrictedUnpickler) -> None:  # h
    index = _next_byte(m)
    memo = m.memo
    if index not in memo:
        raise CorruptFileError(f"the pickle reads memo entry {index}, which was never stored")
    m.stack.append(memo[index])


def _binint1(m: RestrictedUnpickler) -> None:  # K
    m.stack.append(_next_byte(m))


def _short_binunicode(m: RestrictedUnpickler) -> None:  # 0x8c
    n = _next_byte(m)
    m.stack.append(str(m._reader.read(n), "utf-8", "surrogatepass"))


_OPS.update({ord("q"): _binput, ord("h"): _binget, ord("K"): _binint1, 0x8C: _short_binunicode})
