"""A restricted pickle machine: reads the pickle inside torch files, and plain pickles, as data.

Threat model
------------
**The attacker** controls every byte of the stream (a ``data.pkl`` record, a legacy torch
file, a plain pickle, a storage embedded in one). Their aims: run code (``os.system``,
``eval``, ``getattr`` chains, ``__reduce__`` / ``__setstate__`` / ``BUILD`` payloads, a hostile
dict key), or crash or hang the process (truncation, forged lengths, deep nesting, memo
"billion laughs", huge allocations).

**What the machine guarantees**, for any stream:

* Nothing the stream names is imported, looked up or called. Globals resolve through a fixed
  table of stand-ins (:mod:`.standins`: our own tensor-rebuild functions, which record where
  bytes live instead of reading them; ``OrderedDict``, sets, dtypes, ``torch.Size``; numpy arrays
  rebuilt from their raw bytes, numpy never imported); every other name becomes an
  :class:`Inert` placeholder that only records the arguments and state it is given.
  ``__setstate__`` is never looked up; a dict key or set member is checked to be a plain value
  (or a bounded tuple of them) before it is hashed. Opcodes outside the table (``EXT1/2/4``,
  out-of-band buffers, unknown ones) are refused (:mod:`.machine`, :mod:`.opcodes`).
* Bounded work and memory: every length is checked against the bytes left before anything
  is allocated; a work budget proportional to the stream's size is charged per opcode and per
  element copied or checked, and a memory budget (also proportional to it) by the estimated bytes of
  every object, container entry and memo entry created, both shared with embedded storages; at most
  10 000 distinct globals. Tensors are viewed only through plain dtypes (quantized, sub-byte and bit
  dtypes are refused by :mod:`weightport.sources.torchfile`).
* Every failure is a :class:`~weightport.errors.CorruptFileError`, except
  :class:`NeedsTorchLoad` for tensor kinds it does not rebuild (quantized, sparse …).
* What :meth:`RestrictedUnpickler.load` returns holds only plain values (containers,
  numbers, strings, bytes), ``OrderedDict``, torch dtypes, devices and sizes, tensors rebuilt
  from numpy bytes, and the records of :mod:`.records`.

**What it assumes**: Python, torch's constructors the stand-ins use (``torch.Size``,
``torch.device``, ``torch.frombuffer``) and this package are not under the attacker's
control (an attacker who can already run code in the process is out of scope). Whoever runs
the machine supplies ``persistent_load`` (storage references) and the reader of embedded
storages, and checks what they point at: the machine reads neither file containers nor tensor
bytes (:mod:`weightport.sources.torchfile` does, against the zip records and legacy sections).

**Out of scope**: the values of the weights (a poisoned model loads faithfully); cost within
the stream's size (work is linear in it, so a huge stream still costs its size); the tensor
kinds handed to ``torch.load(weights_only=True)`` on :class:`NeedsTorchLoad` (its security is
PyTorch's); ``trust_pickle=True``, which bypasses this package on purpose. Recovering a
whole pickled ``nn.Module``'s ``state_dict()`` from the placeholders is
:mod:`weightport.sources.unwrap`'s job, bounded there. See SECURITY.md.
"""

from weightport.sources.safepickle._stream import Budget
from weightport.sources.safepickle.machine import EmbeddedReader, NeedsTorchLoad, RestrictedUnpickler
from weightport.sources.safepickle.nparrays import NumpyArray
from weightport.sources.safepickle.records import Inert, PickledTensor, StorageRef, StorageType, inert_name

__all__ = [
    "Budget",
    "EmbeddedReader",
    "Inert",
    "NeedsTorchLoad",
    "NumpyArray",
    "PickledTensor",
    "RestrictedUnpickler",
    "StorageRef",
    "StorageType",
    "inert_name",
]
