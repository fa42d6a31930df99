"""The restricted pickle machine: runs one stream with the opcodes of :mod:`.opcodes` and nothing else.

Python's unpickler is not used: a pickle is a program, and CPython's ``Unpickler``
runs it with ``getattr``, ``__setstate__``, ``extend`` … on whatever objects the
program builds (and its C implementation pre-allocates memo tables as large as an
index the file chooses). Here every opcode is implemented on purpose; an opcode
not in the table is refused.

* ``GLOBAL`` / ``STACK_GLOBAL`` / ``INST`` resolve names through a fixed table of
  stand-ins (:mod:`.standins`: our own versions of torch's tensor rebuild functions,
  which record where bytes live instead of reading them; ``OrderedDict``; dtypes;
  numpy array reconstruction from raw bytes). Every other name becomes an
  :class:`~.records.Inert` placeholder class made for this load only. Nothing is imported.
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
import collections
from collections.abc import Callable
from typing import Any

import torch

from weightport.errors import CorruptFileError
from weightport.sources.safepickle._stream import Budget, Reader
from weightport.sources.safepickle.nparrays import NpDtype, NumpyArray
from weightport.sources.safepickle.opcodes import ITEM_COST, MEMORY_COSTS, OPS
from weightport.sources.safepickle.records import Inert, StandIn, StorageRef
from weightport.sources.safepickle.standins import SAFE, TORCH_ONLY

MAX_GLOBALS = 10_000  # distinct pickled globals; real checkpoints name a few hundred at most
MAX_KEY_DEPTH = 8

EmbeddedReader = Callable[[bytes, Budget], StorageRef]
"""Reads a storage that a pickle embeds as bytes (``torch.storage._load_from_bytes``), charging the budget."""


class NeedsTorchLoad(Exception):
    """A tensor kind we do not rebuild lazily (quantized, sparse …); torch's own
    ``weights_only=True`` loader reads the whole file instead."""


_KEY_ATOMS = (str, bytes, int, float, bool, type(None), complex, torch.dtype, torch.device, Inert)


class RestrictedUnpickler:
    """Runs one pickle stream under the rules in the module docstring.

    Args:
        data: The stream: ``bytes`` or an ``mmap`` (read from ``start``; the stream ends at its STOP).
        storage: ``persistent_load``: turns a persistent id into a :class:`StorageRef` (or refuses).
        start: Offset of the stream in ``data``.
        budget: Work budget shared with an enclosing load (embedded storages).
        embedded_storage: Reads a storage the stream embeds as bytes, under this load's budget. The
            machine cannot read one itself (it would be a second file format); without a reader an
            embedded storage is refused, which is how a storage embedded in an embedded storage is.

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
        budget: Budget | None = None,
        embedded_storage: EmbeddedReader | None = None,
    ) -> None:
        self.reader: Reader = Reader(data, start)
        self._storage = storage
        self._embedded_storage = embedded_storage
        self.budget = budget or Budget(len(data) - start)
        self.unsafe_globals: list[str] = []
        self._classes: dict[str, type[Inert]] = {}
        self.memo: dict[int, Any] = {}
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []

    @property
    def pos(self) -> int:
        return self.reader.pos

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
            self.reader.release()

    def _run(self) -> Any:
        reader, budget, ops = self.reader, self.budget, OPS
        data, steps, memory, costs = reader.data, 0, 0, MEMORY_COSTS
        while True:
            pos = reader.pos
            if pos >= reader.end:
                reader.need(1)
            code = data[pos]
            reader.pos = pos + 1
            if code == 0x2E:  # STOP
                budget.charge(steps)
                budget.allocate(memory)
                if not self.stack:
                    raise CorruptFileError("the pickle stops with nothing built")
                return self.stack.pop()
            handler = ops.get(code)
            if handler is None:
                raise CorruptFileError(
                    f"the pickle uses opcode {bytes([code])!r} at byte {pos}, which weightport does not run"
                )
            steps += 1
            memory += costs[code]
            if steps == 1024:  # one opcode, one unit of work: charged in batches
                budget.charge(steps)
                budget.allocate(memory)
                steps = memory = 0
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
        self.budget.allocate(ITEM_COST * len(items))
        return items

    def memo_get(self, index: int) -> Any:
        if index not in self.memo:
            raise CorruptFileError(f"the pickle reads memo entry {index}, which was never stored")
        return self.memo[index]

    def persistent(self, pid: Any) -> Any:
        if self._storage is None:
            raise CorruptFileError("the pickle references external storage, which this stream cannot have")
        return self._storage(pid)

    def embedded_storage(self, data: bytes) -> StorageRef:
        """A storage the stream embeds as bytes, read by the injected reader under this load's budget."""
        if self._embedded_storage is None:
            raise CorruptFileError("the pickle embeds a storage, which this stream cannot have")
        return self._embedded_storage(data, self.budget)


def _width(x: Any) -> int:
    return len(x) if isinstance(x, (list, tuple, dict, set, frozenset, str, bytes, bytearray)) else 0


def _printable(text: str, limit: int = 200) -> str:
    if len(text) <= limit and text.isprintable():
        return text
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("…" if len(text) > limit else "")
