"""Integrity: ``expected_sha256=`` on a source, provenance in the report, ``check_finite=True``."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import TinyNet, digest, trained

import weightport as wp
from weightport.errors import HashMismatchError, NonFiniteError, PlanError, SourceError
from weightport.meta import init_empty
from weightport.sources.files import open_path, sha256_file


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    wp.save(trained(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_expected_sha256_accepts_the_right_file_and_records_it(tmp_path, fmt):
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    state = trained().state_dict()
    if fmt == "safetensors":
        wp.save(state, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
    digest_hex = hashlib.sha256(path.read_bytes()).hexdigest()
    src = wp.open_source(str(path), expected_sha256=digest_hex.upper())  # case does not matter
    assert src.info.provenance["sha256"] == digest_hex
    model = TinyNet()
    report = wp.transfer(src, model)
    assert report.source is not None and report.source.provenance["sha256"] == digest_hex
    assert json.loads(report.to_json())["source"]["provenance"]["sha256"] == digest_hex


def test_expected_sha256_mismatch_refuses_and_names_both_digests(weights):
    path, good = weights
    wrong = "0" * 64
    with pytest.raises(HashMismatchError) as err:
        wp.open_source(str(path), expected_sha256=wrong)
    msg = str(err.value)
    assert str(path) in msg and good in msg and wrong in msg
    assert isinstance(err.value, ValueError)


def test_one_flipped_byte_is_caught(weights, tmp_path):
    path, good = weights
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # inside the last tensor: the file still parses
    path.write_bytes(bytes(raw))
    wp.open_source(str(path))  # without a hash nothing can tell
    with pytest.raises(HashMismatchError):
        wp.open_source(str(path), expected_sha256=good)


def test_open_path_checks_the_hash_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, path)
    parsed = []
    monkeypatch.setattr("weightport.sources.files.parse_torch_file", lambda *a, **k: parsed.append(1))
    with pytest.raises(HashMismatchError):
        open_path(str(path), expected_sha256="f" * 64)
    assert parsed == []  # a file that is not the expected one is never parsed


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "0" * 63, 123])
def test_malformed_expected_sha256(weights, bad):
    path, _ = weights
    with pytest.raises(SourceError):
        open_path(str(path), expected_sha256=bad)  # type: ignore[arg-type]


def test_expected_sha256_needs_a_single_file(tmp_path):
    wp.save({"a": torch.ones(1)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    with pytest.raises(SourceError, match="single file"):
        wp.open_source(str(tmp_path / "model.safetensors.index.json"), expected_sha256="0" * 64)


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 1000)
    assert sha256_file(str(path), chunk=1000) == hashlib.sha256(path.read_bytes()).hexdigest()


# -- check_finite ----------------------------------------------------------------------------------


def poisoned(value: float, name: str = "blocks.1.0.weight", dtype: torch.dtype = torch.float32) -> dict:
    state = {k: v.clone() for k, v in trained().state_dict().items()}
    state[name] = state[name].to(dtype)
    state[name].view(-1)[3] = value
    return state


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_finite_refuses_and_names_the_tensor(tmp_path, value, dtype):
    path = tmp_path / "w.safetensors"
    wp.save(poisoned(value, dtype=dtype), path)
    model = TinyNet()
    before = digest(model)
    with pytest.raises(NonFiniteError, match=r"blocks\.1\.0\.weight") as err:
        wp.transfer(str(path), model, check_finite=True)
    assert "check_finite=False" in str(err.value)
    assert digest(model) == before


def test_check_finite_off_loads_as_is(tmp_path):
    path = tmp_path / "w.safetensors"
    wp.save(poisoned(float("nan")), path)
    model = TinyNet()
    wp.transfer(str(path), model)
    assert torch.isnan(model.blocks[1][0].weight).sum() == 1


@pytest.mark.parametrize("mode", ["cast", "meta", "op"])
def test_check_finite_on_every_path(tmp_path, mode):
    """The fast paths (straight read into new memory, meta targets, ops) are checked too."""
    path = tmp_path / "w.pth"
    torch.save(poisoned(float("inf"), name="fc.weight"), path)
    if mode == "meta":
        with init_empty():
            model = TinyNet()
    else:
        model = TinyNet()
    kwargs: dict = {"check_finite": True}
    if mode == "cast":
        kwargs["dtype"] = torch.float64
    if mode == "op":
        kwargs["rules"] = [wp.transform("fc.weight", "fc.weight", "scale", factor=2.0)]
    before = digest(model)
    with pytest.raises(NonFiniteError, match=r"fc\.weight"):
        wp.transfer(str(path), model, **kwargs)
    assert digest(model) == before


def test_check_finite_ignores_integer_tensors_and_passes_clean_weights(tmp_path):
    path = tmp_path / "w.safetensors"
    wp.save(trained().state_dict(), path)  # num_batches_tracked is int64
    model = TinyNet()
    report = wp.transfer(str(path), model, check_finite=True)
    assert len(report.loaded) == len(model.state_dict())


def test_open_source_checks_the_hash_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, path)
    parsed = []
    monkeypatch.setattr("weightport.sources.files.parse_torch_file", lambda *a, **k: parsed.append(1))
    with pytest.raises(HashMismatchError):
        wp.open_source(str(path), expected_sha256="f" * 64)
    assert parsed == []


def test_open_path_refuses_a_hash_for_a_shard_index(tmp_path):
    wp.save({"a": torch.ones(1)}, tmp_path / "s1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    with pytest.raises(SourceError, match="single file") as err:
        open_path(str(index), expected_sha256=hashlib.sha256(index.read_bytes()).hexdigest())
    assert not isinstance(err.value, HashMismatchError)


def test_cli_checks_sha256_before_reading(tmp_path, capsys):
    from weightport.cli import main as cli

    path = tmp_path / "w.safetensors"
    wp.save({"a": torch.ones(2)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert cli(["inspect", str(path), "--sha256", digest]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(path), "--sha256", "0" * 64]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and digest in err


def test_transfer_and_plan_take_expected_sha256(tmp_path):
    path = tmp_path / "w.safetensors"
    wp.save({"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = torch.nn.Linear(2, 2)
    report = wp.transfer(str(path), model, expected_sha256=digest)
    assert report.source.provenance["sha256"] == digest
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HashMismatchError):
        wp.plan(str(path), torch.nn.Linear(2, 2), expected_sha256="1" * 64)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_check_finite_report_loads_and_lists_the_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    wp.save(poisoned(float("inf")), path)
    model = TinyNet()
    report = wp.transfer(str(path), model, check_finite="report")
    assert torch.isinf(model.blocks[1][0].weight).sum() == 1
    assert [w for w in report.warnings if "NaN or Inf" in w] == [
        "blocks.1.0.weight -> 'blocks.1.0.weight': holds NaN or Inf values"
    ]
    with pytest.raises(PlanError, match="check_finite must be True, False or 'report'"):
        wp.plan(str(path), TinyNet(), check_finite="warn")


def test_check_finite_covers_complex_tensors():
    model = torch.nn.Module()
    model.register_buffer("z", torch.zeros(2, dtype=torch.complex64))
    bad = {"z": torch.tensor([1 + 1j, complex(float("nan"), 0)], dtype=torch.complex64)}
    with pytest.raises(NonFiniteError, match="'z'"):
        wp.transfer(bad, model, check_finite=True)


@pytest.mark.parametrize("how", ["model dtype", "dtype option"])
def test_check_finite_checks_values_as_they_will_be_stored(how):
    state = {"weight": torch.full((2, 2), 1e6), "bias": torch.zeros(2)}  # finite in float32, inf in float16
    if how == "model dtype":
        model, options = torch.nn.Linear(2, 2).half(), {}
    else:
        model, options = torch.nn.Linear(2, 2), {"dtype": torch.float16}
    before = model.weight.detach().clone()
    with pytest.raises(NonFiniteError, match="once cast to float16"):
        wp.transfer(state, model, check_finite=True, **options)
    assert torch.equal(model.weight.detach(), before)
    report = wp.transfer(state, model, check_finite="report", **options)
    assert any("once cast to float16" in w for w in report.warnings)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_check_finite_reads_float8_tensors(tmp_path, dtype):
    from safetensors.torch import save_file

    path = tmp_path / "f8.safetensors"
    save_file({"weight": torch.ones(2, 2).to(dtype)}, str(path))
    model = torch.nn.Linear(2, 2, bias=False).to(dtype)
    wp.transfer(path, model, check_finite=True)
    assert torch.equal(model.weight.float(), torch.ones(2, 2))
    save_file({"weight": torch.full((2, 2), float("nan")).to(dtype)}, str(path))
    with pytest.raises(NonFiniteError):
        wp.transfer(path, torch.nn.Linear(2, 2, bias=False).to(dtype), check_finite=True)
