"""A corpus of hostile weight files, built in a temporary folder for the tests.

Every payload, if it ever runs, creates a file named after its entry in a sentinel
folder. ``live`` entries are genuinely dangerous: CPython's pickle (or
``torch.load(weights_only=False)``) runs their payload, which ``test_hostile``
checks in a subprocess so that the corpus cannot silently rot into harmless files.
Entries with ``live=False`` attack weightport's own machine (opcodes or tricks the
standard unpickler does not turn into code) and must be refused or read inertly.

Formats: torch zip (``torch.save``), torch legacy (``_use_new_zipfile_serialization=False``)
and plain pickles (``.pkl``). Payloads are written two ways: by objects whose
``__reduce__`` returns a dangerous callable (as an attacker's ``torch.save`` would), and
by hand-assembled opcode streams (GLOBAL, STACK_GLOBAL, INST, OBJ, NEWOBJ, BUILD,
memo, extension codes, persistent ids, Python 2 spellings).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


@dataclass
class Hostile:
    """One hostile file.

    Attributes:
        name: Entry name; also the sentinel file its payload would create.
        path: The file.
        kind: ``"zip"``, ``"legacy"`` or ``"pkl"``.
        live: Whether the standard loader runs the payload.
        weights: The tensors safe extraction must recover exactly, or ``None`` when the
            file holds no weights (weightport must refuse it with a ``WeightportError``).
    """

    name: str
    path: Path
    kind: str
    live: bool
    weights: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


# -- payloads as objects (what ``torch.save`` of an attacker's object writes) -----------------------


class Payload:
    """Pickles as ``func(*args)``; unpickling it with pickle runs ``func``."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def _touch_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


def _payloads(sentinels: Path) -> dict[str, Callable[[str], Payload]]:
    """Payload factories by flavour: ``make(entry_name) -> Payload``."""
    return {
        "os_system": lambda n: Payload(os.system, f"touch {sentinels / n}"),
        "eval": lambda n: Payload(eval, _touch_code(sentinels / n)),
        "exec": lambda n: Payload(exec, _touch_code(sentinels / n)),
        "subprocess": lambda n: Payload(subprocess.call, ("touch", str(sentinels / n))),
    }


# -- a tiny pickle assembler (protocol 2 opcodes unless stated) --------------------------------------


def g(module: str, name: str) -> bytes:
    """GLOBAL: push ``module.name``."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    """REDUCE: ``func(*args)``."""
    return func + tup(*args) + b"R"


def dict_of(**items: bytes) -> bytes:
    return b"}(" + b"".join(s(k) + v for k, v in items.items()) + b"u"


def prog(expr: bytes, proto: int = 2) -> bytes:
    return bytes([0x80, proto]) + expr + b"."


def _touch_cmd(sentinels: Path, n: str) -> bytes:
    return s(f"touch {sentinels / n}")


def _opcode_payloads(sentinels: Path) -> dict[str, tuple[bytes, bool]]:
    """Hand-assembled pickles: name -> (stream, live)."""
    S = sentinels

    def code(n: str) -> bytes:
        return s(_touch_code(S / n))

    os_module = call(g("builtins", "__import__"), s("os"))
    return {
        "op_global_os_system": (prog(call(g("os", "system"), _touch_cmd(S, "op_global_os_system"))), True),
        "op_posix_system": (prog(call(g("posix", "system"), _touch_cmd(S, "op_posix_system"))), True),
        "op_eval": (prog(call(g("builtins", "eval"), code("op_eval"))), True),
        "op_py2_builtin_exec": (prog(call(g("__builtin__", "exec"), code("op_py2_builtin_exec"))), True),
        "op_getattr_import": (
            prog(call(call(g("builtins", "getattr"), os_module, s("system")), _touch_cmd(S, "op_getattr_import"))),
            True,
        ),
        "op_stack_global": (
            prog(s("os") + s("system") + b"\x93" + tup(_touch_cmd(S, "op_stack_global")) + b"R", proto=4),
            True,
        ),
        "op_inst": (b"(" + _touch_cmd(S, "op_inst") + b"ios\nsystem\n.", True),
        "op_obj": (b"(" + g("os", "system") + _touch_cmd(S, "op_obj") + b"o.", True),
        "op_memo_reuse": (
            prog(g("os", "system") + b"q\x01" + b"0" + b"h\x01" + tup(_touch_cmd(S, "op_memo_reuse")) + b"R"),
            True,
        ),
        "op_build_setstate": (  # BUILD sets __setstate__ = exec on an object, a second BUILD calls it
            prog(
                call(g("collections", "OrderedDict"))
                + tup(b"N", dict_of(__setstate__=g("builtins", "exec")))
                + b"b"
                + code("op_build_setstate")
                + b"b"
            ),
            True,
        ),
        "op_reconstructor_popen": (  # copyreg._reconstructor(Popen, Popen, args) runs Popen.__init__
            prog(
                call(
                    g("copyreg", "_reconstructor"),
                    g("subprocess", "Popen"),
                    g("subprocess", "Popen"),
                    tup(s("touch"), s(str(S / "op_reconstructor_popen"))),
                )
            ),
            True,
        ),
        "op_newobj_popen": (  # NEWOBJ then BUILD: not code in CPython, but must stay inert here too
            prog(
                g("subprocess", "Popen")
                + tup(s("touch"))
                + b"\x81"
                + dict_of(args=tup(s("touch"), s(str(S / "op_newobj_popen"))))
                + b"b"
            ),
            False,
        ),
        "op_newobj_ex_system": (
            prog(
                g("os", "system") + tup(_touch_cmd(S, "op_newobj_ex_system")) + b"}" + b"\x92",
                proto=4,
            ),
            False,
        ),
        "op_ext1": (prog(b"\x82\x01" + tup(_touch_cmd(S, "op_ext1")) + b"R"), False),
        "op_dict_key_payload": (  # a payload result used as a dict key, then hashed
            prog(b"}" + call(g("os", "system"), _touch_cmd(S, "op_dict_key_payload")) + s("v") + b"s"),
            True,
        ),
        "op_call_placeholder_result": (  # calling what calling a placeholder's result returned
            prog(
                call(
                    call(call(g("operator", "attrgetter"), s("system")), os_module),
                    _touch_cmd(S, "op_call_placeholder_result"),
                )
            ),
            True,
        ),
        "op_torch_load_nested": (  # torch.storage._load_from_bytes -> torch.load(weights_only=False)
            b"",
            True,
        ),
    }


# -- builders --------------------------------------------------------------------------------------


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.arange(3, dtype=torch.int64)}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("scratch", torch.ones(2), persistent=False)


def _zip_with_pickle(path: Path, data_pkl: bytes) -> None:
    """A torch zip whose ``data.pkl`` is replaced by ``data_pkl`` (no storages)."""
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else src.read(info)
            out.writestr(info.filename, data)


def _legacy_with_pickle(path: Path, obj_pkl: bytes) -> None:
    """A legacy torch file whose object section is ``obj_pkl``, with no storages."""
    sys_info = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True, "type_sizes": {}}
    parts = [pickle.dumps(MAGIC_NUMBER, 2), pickle.dumps(LEGACY_PROTOCOL, 2), pickle.dumps(sys_info, 2)]
    path.write_bytes(b"".join(parts) + obj_pkl + pickle.dumps([], 2))


def _nested_load_from_bytes(sentinels: Path, name: str) -> bytes:
    """A plain pickle calling ``torch.storage._load_from_bytes`` on a hostile legacy file."""
    inner = io.BytesIO()
    torch.save(Payload(os.system, f"touch {sentinels / name}"), inner, _use_new_zipfile_serialization=False)
    raw = inner.getvalue()
    return prog(call(g("torch.storage", "_load_from_bytes"), b"B" + struct.pack("<I", len(raw)) + raw))


def _gone_module_class(module_name: str) -> type[nn.Module]:
    """A module class defined in a module that is removed right after saving (no longer importable)."""
    mod = types.ModuleType(module_name)
    exec(
        "import torch\n"
        "class GoneNet(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.stem = torch.nn.Conv2d(1, 2, 3)\n"
        "        self.body = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))\n"
        "        self.register_buffer('steps', torch.tensor(7))\n"
        "        self.register_buffer('cache', torch.zeros(3), persistent=False)\n",
        mod.__dict__,
    )
    sys.modules[module_name] = mod
    return mod.GoneNet


def save_gone_model(path: Path, *, legacy: bool = False, payload: Payload | None = None) -> dict[str, torch.Tensor]:
    """``torch.save`` a whole model of a class that is then made unimportable; returns its state dict."""
    name = f"_weightport_gone_{os.getpid()}_{abs(hash(str(path)))}"
    try:
        torch.manual_seed(3)
        model = _gone_module_class(name)()
        if payload is not None:
            model.callback = payload  # an attribute: pickled inside the module's __dict__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "couldn't retrieve source code": the class is made up
            torch.save(model, path, _use_new_zipfile_serialization=not legacy)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        sys.modules.pop(name, None)


def build_corpus(folder: Path, sentinels: Path) -> list[Hostile]:
    """Write every hostile file into ``folder``; payloads would touch files in ``sentinels``."""
    folder.mkdir(parents=True, exist_ok=True)
    sentinels.mkdir(parents=True, exist_ok=True)
    out: list[Hostile] = []
    out += _object_payload_files(folder, sentinels)
    out += _model_files(folder, sentinels)
    out += _opcode_files(folder, sentinels)
    return out


def _object_payload_files(folder: Path, sentinels: Path) -> list[Hostile]:
    out: list[Hostile] = []
    for flavour, make in _payloads(sentinels).items():
        for kind in ("zip", "legacy", "pkl"):
            name = f"{kind}_statedict_{flavour}"
            state = _state()
            obj = {**state, "evil": make(name)}
            path = folder / f"{name}.{'pkl' if kind == 'pkl' else 'pth'}"
            _save(obj, path, kind)
            out.append(Hostile(name, path, kind, True, state))
    # nested deeper: inside a wrapper, inside the state dict's _metadata, as a key, inside a list
    for kind in ("zip", "legacy"):
        state = _state(1)
        sd = OrderedDict(state)
        sd._metadata = OrderedDict({"": {"version": make_payload(sentinels, f"{kind}_in_metadata")}})  # type: ignore[attr-defined]
        path = folder / f"{kind}_in_metadata.pth"
        _save({"state_dict": sd, "epoch": 1}, path, kind)
        out.append(Hostile(f"{kind}_in_metadata", path, kind, True, state))
        name = f"{kind}_as_dict_key"
        path = folder / f"{name}.pth"
        _save({"model": dict(state), "extra": {make_payload(sentinels, name): [1]}}, path, kind)
        out.append(Hostile(name, path, kind, True, state))
        name = f"{kind}_in_optimizer_list"
        path = folder / f"{name}.pth"
        _save({"model": dict(state), "optimizer": [make_payload(sentinels, name)]}, path, kind)
        out.append(Hostile(name, path, kind, True, state))
    return out


def make_payload(sentinels: Path, name: str) -> Payload:
    return Payload(os.system, f"touch {sentinels / name}")


def _save(obj: Any, path: Path, kind: str) -> None:
    if kind == "pkl":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "zip")


def _model_files(folder: Path, sentinels: Path) -> list[Hostile]:
    out: list[Hostile] = []
    for kind in ("zip", "legacy"):
        name = f"{kind}_whole_model_payload"
        path = folder / f"{name}.pth"
        state = save_gone_model(path, legacy=kind == "legacy", payload=make_payload(sentinels, name))
        # not live: pickle fails on the vanished class before reaching the payload (the payload
        # inside an importable model is the *_payload_in_modules entry)
        out.append(Hostile(name, path, kind, False, state))
        name = f"{kind}_payload_in_modules"
        path = folder / f"{name}.pth"
        torch.manual_seed(4)
        net = _Net()
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net._modules["evil"] = make_payload(sentinels, name)  # type: ignore[assignment]
        torch.save(net, path, _use_new_zipfile_serialization=kind == "zip")
        out.append(Hostile(name, path, kind, True, state))
    name = "zip_quantized_with_payload"  # forces torch's weights_only loader, which must refuse
    path = folder / f"{name}.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    torch.save({"q": q, "evil": make_payload(sentinels, name)}, path)
    out.append(Hostile(name, path, "zip", True, None))
    return out


def _opcode_files(folder: Path, sentinels: Path) -> list[Hostile]:
    out: list[Hostile] = []
    for name, (stream, live) in _opcode_payloads(sentinels).items():
        if name == "op_torch_load_nested":
            stream = _nested_load_from_bytes(sentinels, name)
        path = folder / f"{name}.pkl"
        path.write_bytes(stream)
        out.append(Hostile(name, path, "pkl", live, None))
    for kind, write in (("zip", _zip_with_pickle), ("legacy", _legacy_with_pickle)):
        name = f"{kind}_op_global_in_dict"
        stream = prog(dict_of(evil=call(g("os", "system"), _touch_cmd(sentinels, name))))
        path = folder / f"{name}.pth"
        write(path, stream)
        out.append(Hostile(name, path, kind, True, None))
    name = "zip_persistent_id_payload"  # the payload sits inside a persistent id tuple
    pid = tup(s("storage"), call(g("os", "system"), _touch_cmd(sentinels, name)), s("0"), s("cpu"), b"K\x04")
    path = folder / f"{name}.pth"
    _zip_with_pickle(path, prog(dict_of(w=pid + b"Q")))
    out.append(Hostile(name, path, "zip", True, None))
    return out


LOADER_SCRIPT = """
import pickle, sys, torch
sys.path.insert(0, sys.argv.pop(1))  # this folder: the corpus's own classes must be importable
for kind, path in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        if kind == "pkl":
            with open(path, "rb") as f:
                pickle.load(f)
        else:
            torch.load(path, weights_only=False)
    except BaseException:
        pass
"""


def run_with_real_pickle(entries: list[Hostile]) -> None:
    """Load ``entries`` with CPython's pickle / full ``torch.load`` in a subprocess (the control)."""
    args = [a for e in entries for a in (e.kind, str(e.path))]
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", LOADER_SCRIPT, here, *args], check=False, capture_output=True, timeout=120)
