"""The opcode table of the restricted machine: every opcode it runs, each implemented on purpose.

``OPS`` maps an opcode byte to a handler that takes the running machine. STOP (``.``) is handled
by the machine's loop; EXT1/2/4, NEXT_BUFFER and anything not in the table are refused.
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from weightport.errors import CorruptFileError
from weightport.sources.safepickle._stream import F8, I4, U1, U2, U4, U8

if TYPE_CHECKING:
    from weightport.sources.safepickle.machine import RestrictedUnpickler

OPS: dict[int, Callable[[RestrictedUnpickler], Any]] = {}


def _read_int(m: RestrictedUnpickler, fmt: struct.Struct) -> int:
    return int(m.reader.unpack(fmt))


def _simple(code: bytes, make: Callable[[RestrictedUnpickler], Any]) -> None:
    """An opcode that pushes one value (computed first: it may pop a mark and switch stacks)."""

    def push(m: RestrictedUnpickler) -> None:
        value = make(m)
        m.stack.append(value)

    OPS[code[0]] = push


def _sized(fmt: struct.Struct) -> Callable[[RestrictedUnpickler], bytes]:
    return lambda m: m.reader.read(_read_int(m, fmt))


def _memo_index(fmt: struct.Struct | None) -> Callable[[RestrictedUnpickler], int]:
    return lambda m: int(m.reader.line()) if fmt is None else _read_int(m, fmt)


def _text(raw: bytes) -> Any:
    """A Python 2 byte string: text when it decodes as UTF-8, else the bytes (numpy payloads)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


# -- opcodes that push a value -----------------------------------------------------------------------

_Make = Callable[["RestrictedUnpickler"], Any]


def _const(value: Any) -> _Make:
    return lambda m: value


def _int_of(fmt: struct.Struct) -> _Make:
    return lambda m: _read_int(m, fmt)


def _long_of(fmt: struct.Struct) -> _Make:
    return lambda m: int.from_bytes(_sized(fmt)(m), "little", signed=True)


def _unicode_of(fmt: struct.Struct) -> _Make:
    return lambda m: str(_sized(fmt)(m), "utf-8", "surrogatepass")


def _py2_string_of(fmt: struct.Struct) -> _Make:
    return lambda m: _text(_sized(fmt)(m))


def _empty_of(kind: type) -> _Make:
    return lambda m: kind()


def _get_of(fmt: struct.Struct | None) -> _Make:
    return lambda m: m.memo_get(_memo_index(fmt)(m))


for _code, _make in {
    b"N": _const(None),
    b"\x88": _const(True),
    b"\x89": _const(False),  # NONE NEWTRUE NEWFALSE
    b"J": _int_of(I4),
    b"K": _int_of(U1),
    b"M": _int_of(U2),  # BININT BININT1 BININT2
    b"\x8a": _long_of(U1),
    b"\x8b": _long_of(I4),  # LONG1 LONG4
    b"X": _unicode_of(U4),
    b"\x8c": _unicode_of(U1),
    b"\x8d": _unicode_of(U8),  # BINUNICODE …
    b"B": _sized(U4),
    b"C": _sized(U1),
    b"\x8e": _sized(U8),  # BINBYTES SHORT_BINBYTES BINBYTES8
    b"T": _py2_string_of(I4),
    b"U": _py2_string_of(U1),  # BINSTRING SHORT_BINSTRING (Python 2)
    b")": _empty_of(tuple),
    b"]": _empty_of(list),
    b"}": _empty_of(dict),
    b"\x8f": _empty_of(set),
    b"g": _get_of(None),
    b"h": _get_of(U1),
    b"j": _get_of(U4),  # GET BINGET LONG_BINGET
}.items():
    _simple(_code, _make)
_simple(b"\x96", lambda m: bytearray(_sized(U8)(m)))  # BYTEARRAY8
_simple(b"G", lambda m: float(m.reader.unpack(F8)))  # BINFLOAT
_simple(b"F", lambda m: float(m.reader.line()))  # FLOAT
_simple(b"V", lambda m: str(m.reader.line(), "raw-unicode-escape"))  # UNICODE
_simple(b"I", lambda m: _text_int(m.reader.line()))  # INT
_simple(b"L", lambda m: int(m.reader.line().rstrip(b"L"), 0))  # LONG
_simple(b"S", lambda m: _text(_quoted(m.reader.line())))  # STRING
_simple(b"c", lambda m: m.find_class(m.reader.line().decode("utf-8"), m.reader.line().decode("utf-8")))
_simple(b"P", lambda m: m.persistent(m.reader.line().decode("ascii")))  # PERSID
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
        m.find_class(m.reader.line().decode("ascii"), m.reader.line().decode("ascii")), tuple(m.pop_mark())
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
    if _read_int(m, U8) > m.reader.end - m.pos:
        raise CorruptFileError("the pickle declares a frame that runs past its end")


def _proto(m: RestrictedUnpickler) -> None:
    if m.reader.byte() > 5:
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


OPS.update(
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
        ord("q"): _put(U1),
        ord("r"): _put(U4),
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


# -- fast paths for the opcodes every state dict is made of (same semantics as the generic forms) --------


def _next_byte(m: RestrictedUnpickler) -> int:
    r = m.reader
    pos = r.pos
    if pos >= r.end:
        r.need(1)
    r.pos = pos + 1
    return int(r.data[pos])


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
    m.stack.append(str(m.reader.read(n), "utf-8", "surrogatepass"))


OPS.update({ord("q"): _binput, ord("h"): _binget, ord("K"): _binint1, 0x8C: _short_binunicode})


# -- memory: what each opcode makes, in estimated bytes of Python objects (64-bit CPython) -------------

#: Bytes every opcode may add: one stack slot.
SLOT_COST = 8
#: Bytes per value a mark-popping opcode moves into a container (a dict or set entry at its load factor).
ITEM_COST = 64
_OBJECT_COSTS = {
    b"\x8f": 216,  # EMPTY_SET
    b"\x91": 216,  # FROZENSET
    b"}": 64,  # EMPTY_DICT
    b"d": 64,  # DICT
    b"]": 56,  # EMPTY_LIST
    b"l": 56,  # LIST
    b"(": 56,  # MARK: a new stack
    b"t": 40,  # TUPLE
    b"\x85": 48,  # TUPLE1
    b"\x86": 56,  # TUPLE2
    b"\x87": 64,  # TUPLE3
    b"J": 32,  # BININT
    b"M": 32,  # BININT2
    b"I": 32,  # INT
    b"L": 40,  # LONG
    b"\x8a": 40,  # LONG1
    b"\x8b": 40,  # LONG4
    b"G": 24,  # BINFLOAT
    b"F": 24,  # FLOAT
    b"\x8c": 56,  # SHORT_BINUNICODE (its characters come from the stream, byte for byte)
    b"X": 56,  # BINUNICODE
    b"\x8d": 56,  # BINUNICODE8
    b"V": 56,  # UNICODE
    b"U": 56,  # SHORT_BINSTRING
    b"T": 56,  # BINSTRING
    b"S": 56,  # STRING
    b"C": 40,  # SHORT_BINBYTES
    b"B": 40,  # BINBYTES
    b"\x8e": 40,  # BINBYTES8
    b"\x96": 64,  # BYTEARRAY8
    b"p": 64,  # PUT: a memo entry
    b"q": 64,  # BINPUT
    b"r": 64,  # LONG_BINPUT
    b"\x94": 64,  # MEMOIZE
    b"a": 16,  # APPEND
    b"s": 64,  # SETITEM
    b"R": 160,  # REDUCE: a record or placeholder instance and its argument lists
    b"\x81": 160,  # NEWOBJ
    b"\x92": 160,  # NEWOBJ_EX
    b"o": 160,  # OBJ
    b"i": 160,  # INST
    b"Q": 160,  # BINPERSID: a storage reference
    b"P": 160,  # PERSID
}
#: Estimated bytes of objects each opcode creates, indexed by opcode byte (charged to the load's Budget).
MEMORY_COSTS: list[int] = [SLOT_COST + _OBJECT_COSTS.get(bytes([c]), 0) for c in range(256)]
