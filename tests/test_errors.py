"""Every bad input gets a WeightportError subclass that names the file or key and says what to do."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import TinyNet, trained

import weightport as wp
from weightport import errors


def test_hierarchy_also_inherits_builtins():
    assert issubclass(errors.SourceNotFoundError, FileNotFoundError)
    assert issubclass(errors.TensorNotFoundError, KeyError)
    assert issubclass(errors.TargetError, LookupError)
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.WeightportError)
        if cls is not errors.WeightportError and cls is not errors.SourceError and cls is not errors.CheckpointError:
            assert set(cls.__mro__) & {FileNotFoundError, KeyError, LookupError, ValueError, OSError, RuntimeError}, (
                name
            )
    assert wp.WeightportError is errors.WeightportError


def test_missing_file(tmp_path):
    with pytest.raises(errors.SourceNotFoundError, match="nope.pth: no such file"):
        wp.open_source(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        wp.transfer(tmp_path / "nope.pth", TinyNet())


@pytest.mark.parametrize("name", ["empty.pth", "empty.safetensors", "empty.bin"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(errors.CorruptFileError, match=f"{name}: the file is empty"):
        wp.open_source(tmp_path / name)


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors", "garbage.bin", "garbage.ckpt"])
def test_garbage_bytes_with_a_weights_extension(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00\x01not weights at all" * 10)
    with pytest.raises(errors.WeightportError, match=name):
        wp.open_source(tmp_path / name)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(errors.SourceNotFoundError, match="no weights found"):
        wp.open_source(tmp_path)


def test_unknown_extension(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(errors.UnsupportedFormatError, match=r"weights.txt: unknown weights format.*safetensors"):
        wp.open_source(tmp_path / "weights.txt")


def test_unopenable_object():
    with pytest.raises(errors.SourceError, match="cannot open a int"):
        wp.open_source(42)


def test_pattern_syntax_errors_name_the_pattern():
    with pytest.raises(errors.PatternError, match="'blocks.{i'"):
        wp.rename("blocks.{i", "b.{i}")


def test_into_naming_no_submodule():
    with pytest.raises(errors.TargetError, match="into='head'"):
        wp.transfer(trained().state_dict(), TinyNet(), into="head")


def test_target_that_is_not_a_module():
    with pytest.raises(errors.TargetError, match="nn.Module"):
        wp.transfer(trained().state_dict(), {"not": "a module"})  # type: ignore[arg-type]


def test_strict_failures_name_the_tensors():
    state = trained().state_dict()
    del state["fc.bias"]
    with pytest.raises(errors.StrictnessError, match="fc.bias"):
        wp.transfer(state, TinyNet(), strict=True)


def test_no_tensors_in_a_checkpoint(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta_only.pth")
    with pytest.raises(errors.SourceError, match="no tensors found"):
        wp.open_source(tmp_path / "meta_only.pth")


def test_bad_mapping_argument():
    with pytest.raises(errors.PlanError, match="mapping must be"):
        wp.plan(trained().state_dict(), TinyNet(), mapping=42)  # type: ignore[arg-type]


def test_a_strictness_error_carries_the_full_report():
    source = trained().state_dict()
    del source["fc.bias"]
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(errors.StrictnessError) as info:
        wp.transfer(source, model, strict=True)
    report = info.value.report
    assert report is not None and not report.applied
    assert [e.target for e in report.fresh] == ["fc.bias"] and "fc.bias" in str(report)
    assert info.value.problems == ("strict=True: target tensors not loaded: fc.bias",)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.problems == info.value.problems


def test_a_collision_error_carries_every_collision():
    state = trained().state_dict()
    state["other.weight"] = state["fc.weight"].clone()
    state["more.bias"] = state["fc.bias"].clone()
    rules = [wp.rename("other.weight", "fc.weight"), wp.rename("more.bias", "fc.bias")]
    with pytest.raises(errors.CollisionError) as info:
        wp.plan(state, TinyNet(), rules=rules)
    found = {c.target: c for c in info.value.collisions}
    assert set(found) == {"fc.weight", "fc.bias"}
    assert found["fc.weight"].sources == ("fc.weight", "other.weight")
    assert found["fc.weight"].rules[0] is None and "other.weight" in found["fc.weight"].rules[1]
    assert str(found["fc.weight"]) in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).collisions == info.value.collisions


def test_a_shape_mismatch_error_carries_every_mismatch():
    with pytest.raises(errors.ShapeMismatchError) as info:
        wp.plan(trained().state_dict(), TinyNet(num_classes=7), on_mismatch="error")
    mismatches = {m.target: m for m in info.value.mismatches}
    assert set(mismatches) == {"fc.weight", "fc.bias"}
    assert mismatches["fc.bias"].source_shape == (10,) and mismatches["fc.bias"].target_shape == (7,)
    assert mismatches["fc.bias"].sources == ("fc.bias",)
