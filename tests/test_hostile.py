"""No code runs from a weight file: the hostile corpus through open_source, transfer and the CLI.

Each payload in ``hostile_corpus`` would create a sentinel file; the control test proves
CPython's pickle really runs the live ones, every other test proves weightport runs none.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import digest
from hostile_corpus import Hostile, build_corpus, run_with_real_pickle, save_gone_model
from torch import nn

import weightport as wp
from weightport.cli import main
from weightport.errors import CorruptFileError, UnsafeFileError, WeightportError
from weightport.sources.safepickle import RestrictedUnpickler

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Hostile], Path]:
    base = tmp_path_factory.mktemp("hostile")
    return build_corpus(base / "files", base / "sentinels"), base / "sentinels"


def _fired(sentinels: Path) -> list[str]:
    return sorted(p.name for p in sentinels.iterdir())


def holder(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module whose state dict has exactly ``state``'s names and shapes, filled with zeros."""
    root = nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, torch.zeros_like(t))
    return root


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="the control's payloads call POSIX `touch`")
def test_corpus_is_big_varied_and_really_hostile(tmp_path):
    entries = build_corpus(tmp_path / "files", tmp_path / "sentinels")
    assert len(entries) >= 20
    assert {e.kind for e in entries} == {"zip", "legacy", "pkl"}
    live = [e for e in entries if e.live]
    assert len(live) >= 20
    run_with_real_pickle(live)  # the control: the standard loaders run every live payload
    assert _fired(tmp_path / "sentinels") == sorted(e.name for e in live)


def test_open_source_runs_nothing_and_recovers_or_refuses(corpus):
    entries, sentinels = corpus
    problems = []
    for e in entries:
        try:
            src = wp.open_source(str(e.path))
        except WeightportError as err:
            if e.weights is not None:
                problems.append(f"{e.name}: refused ({err}) but holds recoverable weights")
            elif str(e.path) not in str(err):
                problems.append(f"{e.name}: the error does not name the file: {err}")
            continue
        if e.weights is None:
            problems.append(f"{e.name}: opened, but holds no weights: {sorted(src.keys())}")
        elif sorted(src.keys()) != sorted(e.weights):
            problems.append(f"{e.name}: names {sorted(src.keys())} != {sorted(e.weights)}")
        elif not all(torch.equal(src[k], v) for k, v in e.weights.items()):
            problems.append(f"{e.name}: values differ")
    assert not problems, "\n".join(problems)
    assert _fired(sentinels) == []


def test_transfer_runs_nothing_and_loads_exact_values(corpus):
    entries, sentinels = corpus
    for e in entries:
        if e.weights is None:
            model = nn.Linear(4, 3)
            before = digest(model)
            with pytest.raises(WeightportError):
                wp.transfer(str(e.path), model)
            assert digest(model) == before, e.name
            continue
        model = holder(e.weights)
        report = wp.transfer(str(e.path), model, strict=True)
        assert len(report.loaded) == len(e.weights), e.name
        assert all(torch.equal(model.get_buffer(k), v) for k, v in e.weights.items()), e.name
    assert _fired(sentinels) == []


def test_cli_runs_nothing(corpus, capsys):
    entries, sentinels = corpus
    codes = {}
    for e in entries:
        codes[e.name] = main(["inspect", str(e.path)])
        main(["port", str(e.path), "torch.nn:Identity", "--dry-run", "--json"])
    capsys.readouterr()
    assert all(codes[e.name] == (0 if e.weights is not None else 2) for e in entries), codes
    assert _fired(sentinels) == []


@pytest.mark.slow
def test_cli_subprocess_runs_nothing(corpus):
    entries, sentinels = corpus
    pick = [e for e in entries if e.name in ("op_eval", "pkl_statedict_os_system", "zip_payload_in_modules")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    code = "import sys; from weightport.cli import main; sys.exit(max(main(['inspect', p]) for p in sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *(str(e.path) for e in pick)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr  # op_eval refused, the others listed
    assert "posix.system" in done.stdout + done.stderr or "os.system" in done.stdout + done.stderr
    assert _fired(sentinels) == []


def test_refusal_lists_the_globals_and_what_to_do(corpus):
    entries, _ = corpus
    by_name = {e.name: e for e in entries}
    with pytest.raises(UnsafeFileError) as err:
        wp.open_source(str(by_name["op_eval"].path))
    msg = str(err.value)
    assert "builtins.eval" in msg and "trust_pickle=True" in msg and "checkpoint_key=" in msg
    with pytest.raises(UnsafeFileError) as err:
        wp.open_source(str(by_name["zip_op_global_in_dict"].path))
    msg = str(err.value)
    assert "os.system" in msg or "posix.system" in msg
    assert "torch.load(weights_only=True) would need" in msg  # torch's own static scan, for zips
    with pytest.raises(UnsafeFileError, match="trust_pickle=True"):
        wp.open_source(str(by_name["zip_quantized_with_payload"].path))


def test_placeholders_are_recorded_on_the_source(corpus):
    entries, _ = corpus
    e = next(e for e in entries if e.name == "zip_statedict_eval")
    src = wp.open_source(str(e.path))
    assert "builtins.eval" in src.info.placeholders
    assert "evil" in src.info.ignored


def test_hostile_tricks_on_weightports_own_machine_are_refused(corpus):
    entries, sentinels = corpus
    by_name = {e.name: e for e in entries}
    with pytest.raises(CorruptFileError, match="opcode"):
        wp.open_source(str(by_name["op_ext1"].path))
    with pytest.raises(CorruptFileError, match="hide its methods"):
        wp.open_source(str(by_name["op_build_setstate"].path))
    with pytest.raises(CorruptFileError):
        wp.open_source(str(by_name["zip_persistent_id_payload"].path))
    with pytest.raises(CorruptFileError):
        wp.open_source(str(by_name["op_torch_load_nested"].path))
    assert _fired(sentinels) == []


def test_trust_pickle_is_the_explicit_opt_in(tmp_path, monkeypatch):
    entries = build_corpus(tmp_path / "files", tmp_path / "sentinels")
    e = next(e for e in entries if e.name == "zip_statedict_exec")
    for var in ("WEIGHTPORT_TRUST_PICKLE", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        monkeypatch.setenv(var, "1")  # no environment variable turns full pickle on
    wp.open_source(str(e.path))
    fallback = next(e for e in entries if e.name == "zip_quantized_with_payload")  # torch's own loader
    with pytest.raises(UnsafeFileError):
        wp.open_source(str(fallback.path))
    assert _fired(tmp_path / "sentinels") == []
    wp.open_source(str(e.path), trust_pickle=True)  # the loud opt-in really is full pickle
    assert _fired(tmp_path / "sentinels") == [e.name]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_whole_model_of_a_vanished_class_yields_exact_state_dict(tmp_path, legacy):
    path = tmp_path / "gone.pth"
    expected = save_gone_model(path, legacy=legacy)
    with pytest.raises(Exception):
        torch.load(path, weights_only=False)
    src = wp.open_source(str(path))
    assert list(src.keys()) == list(expected)  # same names, same order; non-persistent 'cache' left out
    assert "cache" not in src
    for k, v in expected.items():
        assert src[k].dtype == v.dtype and torch.equal(src[k], v), k
    assert any("safe extraction" in n for n in src.info.notes)
    assert any(p.endswith("GoneNet") for p in src.info.placeholders)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_are_rebuilt_from_raw_bytes(tmp_path, monkeypatch, protocol):
    """detectron2-style .pkl dicts of ndarrays; numpy's own unpickling code never runs."""
    np = pytest.importorskip("numpy")
    arrays = {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "big_endian": np.arange(5, dtype=">i4"),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "half": np.arange(3, dtype=np.float16),
        "flags": np.array([True, False]),
        "scalar": np.float32(2.5),
    }
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "someone", "junk": np.array([1, "x"], dtype=object)}, f, protocol)
    core = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
    for name in ("_reconstruct", "scalar"):
        monkeypatch.setattr(f"{core}.{name}", _forbidden)
    with open(path, "rb") as f, pytest.raises(AssertionError, match="numpy's unpickling code ran"):
        pickle.load(f)  # the trap works: the standard unpickler does call numpy
    src = wp.open_source(str(path))
    assert sorted(src) == sorted(arrays)
    for k, v in arrays.items():
        want = torch.from_numpy(np.ascontiguousarray(v).astype(v.dtype.newbyteorder("="))).reshape(v.shape)
        assert src[k].dtype == want.dtype and torch.equal(src[k], want), k


def _forbidden(*args: object, **kwargs: object) -> None:
    raise AssertionError("numpy's unpickling code ran")


def test_nested_placeholder_calls_do_not_grow_names():
    """``os.system()()()…`` 20 000 times: one placeholder class, no quadratic name growth."""
    stream = b"\x80\x02cos\nsystem\n" + b")R" * 20_000 + b"."
    machine = RestrictedUnpickler(stream)
    result = machine.load()
    assert result.qualname == "os.system(...)"
    assert machine.unsafe_globals == ["os.system"]


def test_trust_pickle_reads_whole_models_too(tmp_path):
    """With the opt-in, a real unpickled module gives its state_dict (bare, or inside a checkpoint)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    for name, obj in (("bare.pth", model), ("nested.pth", {"model": model, "epoch": 4})):
        torch.save(obj, tmp_path / name)
        safe = wp.open_source(str(tmp_path / name))
        trusted = wp.open_source(str(tmp_path / name), trust_pickle=True)
        assert list(safe) == list(trusted) == list(model.state_dict())
        assert all(torch.equal(trusted[k], v) for k, v in model.state_dict().items())
        assert any("trust_pickle=True" in n for n in trusted.info.notes) or trusted.info.wrapper == "model"
