"""`weightport verify`: a mapping is proven by numbers, and a wrong one fails with exit code 1."""

from __future__ import annotations

import json

from weightport.cli import main as cli

# Identity between two TinyNets whose blocks swap places: right only when the rule maps 0<->1.
_MAPPING = """
name = "tiny.swap"
description = "TinyNet to TinyNet with the two blocks exchanged"
source = "conftest:TinyNet"
target = "conftest:TinyNet"

[[rule]]
rename = "blocks.0.0.{p}"
to = "blocks.{SECOND}.0.{p}"

[[rule]]
rename = "blocks.1.0.{p}"
to = "blocks.{FIRST}.0.{p}"
"""


def _mapping(tmp_path, first: int, second: int) -> str:
    path = tmp_path / f"tiny-{first}{second}.toml"
    path.write_text(_MAPPING.replace("{SECOND}", str(second)).replace("{FIRST}", str(first)))
    return str(path)


def test_a_right_mapping_passes(tmp_path, capsys):
    path = _mapping(tmp_path, first=1, second=0)  # blocks.0 -> blocks.0, blocks.1 -> blocks.1
    assert cli(["verify", path, "--input-size", "3,8,8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok") and "max abs diff 0" in out and "round trip exact" in out


def test_a_wrong_mapping_fails_with_exit_1(tmp_path, capsys):
    path = _mapping(tmp_path, first=0, second=1)  # the two blocks swapped: shapes agree, numbers do not
    assert cli(["verify", path, "--input-size", "3,8,8", "--json"]) == 1
    (result,) = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["max_abs_diff"] > 1e-3


def test_quiet_prints_only_the_failures_and_verbose_the_details(tmp_path, capsys):
    right, wrong = _mapping(tmp_path, first=1, second=0), _mapping(tmp_path, first=0, second=1)
    assert cli(["verify", right, "--input-size", "3,8,8", "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert cli(["verify", wrong, "--input-size", "3,8,8", "-q"]) == 1
    assert capsys.readouterr().out.startswith("FAILED")
    assert cli(["verify", right, "--input-size", "3,8,8", "-v"]) == 0
    assert "mapping tiny.swap, max rel diff 0, accepted up to 0.0001 (--atol)" in capsys.readouterr().out


def test_names_only_builds_nothing_real(tmp_path, capsys):
    path = _mapping(tmp_path, first=0, second=1)  # wrong numbers, but names and shapes line up
    assert cli(["verify", path, "--names-only"]) == 0
    assert "names and shapes only" in capsys.readouterr().out


def test_explicit_pair_and_bad_arguments(tmp_path, capsys):
    path = _mapping(tmp_path, first=1, second=0)
    assert (
        cli(
            [
                "verify",
                path,
                "--source",
                "conftest:TinyNet",
                "--target",
                "conftest:TinyNet(width=8)",
                "--input-size",
                "3,8,8",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli(["verify", path, "--input-size", "3x8"]) == 2
    assert "--input-size '3x8'" in capsys.readouterr().err
    assert cli(["verify", "no-such-mapping"]) == 2


def test_mappings_lists_every_shipped_mapping_with_what_it_was_verified_on(capsys):
    import weightport as wp

    assert cli(["mappings", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(wp.list_mappings())
    assert "torchvision:resnet50 -> timm:resnet50" in rows["torchvision.resnet->timm.resnet"]["verified"]
    assert all(r["verified"] and r["description"] and r["rules"] > 0 for r in rows.values())
    assert cli(["mappings"]) == 0
    text = capsys.readouterr().out
    assert "torchvision.vit->timm.vit (" in text and "    verified: torchvision:vit_b_16 -> timm:" in text


def test_transformers_targets_are_built_from_config_arguments(tmp_path, capsys):
    from safetensors.torch import save_file

    from weightport.targets import build_target

    model = build_target(
        "transformers:BertModel(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=64, vocab_size=50, add_pooling_layer=False)"
    )
    assert model.config.hidden_size == 32 and model.pooler is None
    path = tmp_path / "bert.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    spec = (
        "transformers:BertModel(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, "
        "vocab_size=50, add_pooling_layer=False)"
    )
    assert cli(["port", str(path), spec, "--strict", "--dry-run"]) == 0
    assert cli(["port", str(path), "transformers:NoSuchModel"]) == 2
    assert "transformers has no model class 'NoSuchModel'" in capsys.readouterr().err


def test_architectures_in_the_current_folder_can_be_verified(tmp_path, monkeypatch, capsys):
    import sys

    path = _mapping(tmp_path, first=1, second=0)
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_verify_models.py").write_text("from conftest import TinyNet\n\ndef tiny():\n    return TinyNet()\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(work))])
    monkeypatch.delitem(sys.modules, "my_verify_models", raising=False)
    spec = "my_verify_models:tiny"
    assert cli(["verify", path, "--source", spec, "--target", spec, "--input-size", "3,8,8"]) == 0
    assert capsys.readouterr().out.startswith("ok")


_RIGHT_RULES = '[[rule]]\nrename = "blocks.0.0.{p}"\nto = "blocks.0.0.{p}"\n'


def test_a_suggestion_from_a_weights_file_verifies_with_source(tmp_path, capsys):
    path = tmp_path / "suggested.toml"
    path.write_text(f'name = "s"\nsource_file = "w.safetensors"\ntarget = "conftest:TinyNet"\n{_RIGHT_RULES}')
    assert cli(["verify", str(path), "--input-size", "3,8,8"]) == 2
    err = capsys.readouterr().err
    assert "'w.safetensors' (field 'source_file')" in err and "field 'source'" in err and "--source" in err
    assert cli(["verify", str(path), "--source", "conftest:TinyNet", "--input-size", "3,8,8"]) == 0
    assert capsys.readouterr().out.startswith("ok     conftest:TinyNet -> conftest:TinyNet")


def test_errors_name_the_field_the_spec_came_from(tmp_path, capsys):
    path = tmp_path / "old.toml"
    path.write_text(f'name = "s"\nsource = "w.safetensors"\ntarget = "conftest:TinyNet"\n{_RIGHT_RULES}')
    assert cli(["verify", str(path), "--input-size", "3,8,8"]) == 2
    err = capsys.readouterr().err
    assert f"field 'source' of {path} is the weights file 'w.safetensors'" in err and "target" not in err
    path.write_text(f'name = "s"\nsource = "conftest:NoSuchNet"\ntarget = "conftest:TinyNet"\n{_RIGHT_RULES}')
    assert cli(["verify", str(path), "--input-size", "3,8,8"]) == 2
    assert f"source architecture 'conftest:NoSuchNet' (field 'source' of {path})" in capsys.readouterr().err
    assert cli(["verify", str(path), "--source", "conftest:TinyNet", "--target", "conftest:Nope"]) == 2
    assert "target architecture 'conftest:Nope' (target=/--target)" in capsys.readouterr().err
    path.write_text(f'name = "s"\nsource = "conftest:TinyNet"\n{_RIGHT_RULES}')
    assert cli(["verify", str(path)]) == 2
    assert "has no field 'target'" in capsys.readouterr().err
