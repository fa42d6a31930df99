"""The command line's conventions: --version, -q/-v, one exit-code table, one-line errors that
speak flags, quoting hints, targets from the current folder, dry runs on meta, apply flags."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import trained
from safetensors.torch import load_file, save_file

import weightport as wp
from weightport import cli
from weightport._cli_text import flags_of, one_line, quoting_hint, speak_flags
from weightport.cli import EXIT_BAD_INPUT, EXIT_CODES, EXIT_OK, EXIT_REFUSED, main
from weightport.options import PHASES

TARGET = "conftest:TinyNet"
TEN = f"{TARGET}(num_classes=10)"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained(num_classes=1000).state_dict().items()}, str(path))
    return str(path)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightport: error: ") and "Traceback" not in err, err
    return lines[0]


# -- --version ---------------------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys):
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out == f"weightport {wp.__version__}\n"


# -- exit codes --------------------------------------------------------------------------------------


def test_the_exit_code_table_is_in_help_and_in_the_docs(capsys):
    assert main(["--help"]) == EXIT_OK
    top = capsys.readouterr().out
    assert main(["port", "--help"]) == EXIT_OK
    port = capsys.readouterr().out
    docs = DOCS.read_text()
    assert [c for c, _ in EXIT_CODES] == [0, 1, 2, 130]
    for code, meaning in EXIT_CODES:
        assert f"{code:<4} {meaning}" in top and f"{code:<4} {meaning}" in port
        assert f"| {code} | {meaning} |" in docs


def test_a_shape_mismatch_under_on_mismatch_error_is_a_refusal_like_strict(weights, capsys):
    assert main(["port", weights, TEN, "--on-mismatch", "error"]) == EXIT_REFUSED
    line = _one_error_line(capsys.readouterr().err)
    assert "shape mismatch (--on-mismatch error): 'fc.weight'" in line and "on_mismatch" not in line
    assert main(["port", weights, TEN, "--strict", "-q"]) == EXIT_REFUSED
    out = capsys.readouterr()
    assert out.out == "" and _one_error_line(out.err).startswith("weightport: error: --strict:")
    assert main(["port", weights, TEN, "--require", "fc.*", "-q"]) == EXIT_REFUSED
    assert "--require 'fc.*': not loaded: fc.weight, fc.bias" in _one_error_line(capsys.readouterr().err)


def test_nothing_loaded_is_a_refusal_naming_the_flag_and_allow_empty_allows_it(weights, capsys):
    code = main(["port", weights, TARGET, "--rule", "{p*}=>elsewhere.{p}"])
    out = capsys.readouterr()
    assert code == EXIT_REFUSED and "planned (dry run): 0 loaded" in out.out  # the preview, to see what to fix
    line = _one_error_line(out.err)
    assert "nothing would load" in line and "pass --allow-empty if" in line and "allow_empty" not in line
    assert main(["port", weights, TARGET, "--rule", "{p*}=>elsewhere.{p}", "--allow-empty", "-q"]) == EXIT_OK


def test_a_lightning_style_prefix_is_suggested_as_a_rule_flag(tmp_path, capsys):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained().state_dict().items()}, "epoch": 1}, path)
    assert main(["port", str(path), TARGET, "-q"]) == EXIT_REFUSED
    line = _one_error_line(capsys.readouterr().err)
    assert "--rule 'model.{rest*}=>{rest}'" in line and "rules=" not in line and "(CLI:" not in line
    assert main(["port", str(path), TARGET, "-q", "--rule", "model.{rest*}=>{rest}", "--strict"]) == EXIT_OK


def test_usage_errors_are_one_line_and_exit_2(weights, capsys):
    assert main(["port", weights]) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert "required: target" in line and "--help" in line
    assert main(["port", weights, TARGET, "--on-mismatch", "fit"]) == EXIT_BAD_INPUT
    assert "invalid choice: 'fit'" in _one_error_line(capsys.readouterr().err)


def test_an_unavailable_device_is_one_line_naming_the_flag(weights, capsys):
    assert main(["port", weights, TEN, "--device", "cuda:99"]) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert "--device cuda:99: " in line and "device=" not in line


def test_an_unexpected_exception_is_one_line_and_exit_2_and_v_shows_the_traceback(weights, capsys, monkeypatch):
    def broken(spec):
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr("weightport.targets.build_target", broken)
    assert main(["port", weights, TARGET]) == EXIT_BAD_INPUT
    assert "RuntimeError: CUDA error: out of memory; CUDA kernel" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(RuntimeError):
        main(["port", weights, TARGET, "-v"])


# -- -q / -v -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "port", "suggest", "verify"])
def test_every_printing_command_takes_q_and_v(command):
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    options = {s for a in sub._actions for s in a.option_strings}
    assert {"-q", "--quiet", "-v", "--verbose"} <= options


def test_quiet_silences_the_summary_and_the_logged_warning_verbose_shows_rows(weights, capsys):
    assert main(["port", weights, TEN]) == EXIT_OK
    out = capsys.readouterr()
    assert "warning: 2 parameter(s) not loaded" in out.out and out.err == ""  # said once, in the summary
    assert main(["port", weights, TEN, "--json"]) == EXIT_OK
    out = capsys.readouterr()
    assert (
        out.err == "weightport: warning: 2 parameter(s) not loaded, keeping their initialisation: fc.weight, fc.bias\n"
    )
    assert main(["port", weights, TEN, "-q"]) == EXIT_OK
    assert capsys.readouterr() == ("", "")
    assert main(["port", weights, TEN, "--verbose"]) == EXIT_OK
    assert "conv1.weight" in capsys.readouterr().out


def test_inspect_and_suggest_quiet(weights, capsys):
    assert main(["inspect", weights, "-q"]) == EXIT_OK
    assert capsys.readouterr() == ("", "")
    assert main(["suggest", weights, TEN, "-q"]) == EXIT_OK
    out = capsys.readouterr()
    assert out.err == "" and out.out.startswith('name = "suggested"')  # the mapping: what was asked for
    assert main(["suggest", weights, TEN]) == EXIT_OK
    assert "planned with them" in capsys.readouterr().err


# -- library words become flags --------------------------------------------------------------------


def test_every_option_with_a_flag_is_spoken_as_that_flag():
    flags = flags_of(cli._parser())
    every = {f.name for phase in PHASES for f in fields(phase)}
    # timeout: for sharded models only, which the command line never builds
    assert every - set(flags) == {"progress", "timeout"}, "a new option needs a CLI flag (or to be listed here)"
    for name, action in flags.items():
        for text in (f"pass {name}= to", f"({name}='x')", f"{name}=True", f"{name}=False"):
            spoken = speak_flags(text, flags)
            assert any(f in spoken for f in action.option_strings) and f"{name}=" not in spoken, (text, spoken)
    assert (
        speak_flags("ema=True takes them; ema=False the raw ones", flags) == "--ema takes them; --no-ema the raw ones"
    )


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("pass allow_empty=True if intended", "pass --allow-empty if intended"),
        ("or on_mismatch='adapt'", "or --on-mismatch adapt"),
        ('on_mismatch="adapt" fits it', "--on-mismatch adapt fits it"),
        ("pass checkpoint_key= to use them", "pass --checkpoint-key to use them"),
        ("checkpoint_key='a b' not found", "--checkpoint-key 'a b' not found"),
        ("pass check_hash=False (CLI: --no-check-hash) if", "pass --no-check-hash if"),
        ("check_hash=False", "--no-check-hash"),
        ("expected_sha256='ab' is not", "--sha256 ab is not"),
        ("relax strict=/require=;", "relax --strict/--require;"),
        (
            "(pass check_finite=False to load, or check_finite='report' to list)",
            "(omit --check-finite to load, or --check-finite report to list)",
        ),
        ("check_finite=True", "--check-finite"),
        (
            "add rules=[weightport.strip_prefix('model.')] (CLI: --rule 'model.{rest*}=>{rest}')",
            "add --rule 'model.{rest*}=>{rest}'",
        ),
        (
            "add rules=[weightport.add_prefix('backbone.')], or into='backbone'",
            "add --rule '{rest*}=>backbone.{rest}', or --into backbone",
        ),
        ("torch.load(weights_only=False) and model=...", "torch.load(weights_only=False) and model=..."),
    ],
)
def test_library_keywords_read_as_flags(text, spoken):
    assert speak_flags(text, flags_of(cli._parser())) == spoken


def test_the_printed_report_speaks_flags_and_its_json_does_not(weights, capsys, monkeypatch):
    from weightport.report import TransferReport

    summary = TransferReport.summary
    note = "also found weights under 'state_dict_ema'; pass checkpoint_key= to use them"
    monkeypatch.setattr(TransferReport, "summary", lambda self: summary(self) + "\n" + note)
    assert main(["port", weights, TEN, "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "pass --checkpoint-key to use them" in out and "checkpoint_key" not in out
    monkeypatch.setattr(TransferReport, "__str__", lambda self: self.summary())
    assert main(["port", weights, TEN, "--strict"]) == EXIT_REFUSED  # the refused plan, printed
    out = capsys.readouterr().out
    assert "pass --checkpoint-key to use them" in out and "checkpoint_key" not in out


def test_the_rules_the_translation_writes_are_rules_the_cli_reads():
    from conftest import TinyNet

    flags = flags_of(cli._parser())
    state = trained(num_classes=10).state_dict()

    def rule(text: str):
        flag, value = speak_flags(text, flags).split(" ", 1)
        assert flag == "--rule"
        return cli._cli_rule(value.strip("'"))

    prefixed = {f"model.{k}": v for k, v in state.items()}
    report = wp.plan(prefixed, TinyNet(), rules=[rule("rules=[weightport.strip_prefix('model.')]")]).report
    assert len(report.loaded) == len(state)
    wrapped = torch.nn.ModuleDict({"body": TinyNet()})
    report = wp.plan(state, wrapped, rules=[rule("rules=[weightport.add_prefix('body.')]")]).report
    assert len(report.loaded) == len(state)


def test_one_line_joins_lines():
    assert one_line("two would write one:\n  'a' <- 'b'\n  'c' <- 'd'\nadd a drop rule") == (
        "two would write one: 'a' <- 'b'; 'c' <- 'd'; add a drop rule"
    )


# -- quoting hints -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["port", "W", TARGET, "--rule", "encoder.{p*}="], "--rule 'encoder.{p*}=>backbone.{p}'"),
        (["port", "W", TARGET, "--rule=encoder.{p*}-"], "looks cut by the shell at '>'"),
        (["port", "W", TARGET, "--mapping", "torchvision.resnet-"], "--mapping 'torchvision.resnet->timm.resnet'"),
        (["port", "W", f"{TARGET}(num_classes=10"], "quote the whole spec, e.g. 'timm:resnet50(num_classes=10)'"),
        (["port", "W", f"{TARGET}(num_classes=10,", "width=8)"], "quote the whole spec"),
    ],
)
def test_specs_cut_by_the_shell_get_a_hint_to_quote_them(weights, capsys, argv, needle):
    argv = [weights if a == "W" else a for a in argv]
    assert main(argv) == EXIT_BAD_INPUT
    assert needle in _one_error_line(capsys.readouterr().err)


def test_no_hint_for_specs_that_are_whole():
    assert quoting_hint(["port", "w.pth", "timm:resnet50(num_classes=10)", "--rule", "a.{p}=>"]) is None


# -- targets, dry runs, apply flags ------------------------------------------------------------------


def test_a_factory_in_the_current_folder_is_a_target(weights, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_models_cwd.py").write_text("from conftest import TinyNet\n\ndef tiny(**k):\n    return TinyNet(**k)\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(work))])
    monkeypatch.delitem(sys.modules, "my_models_cwd", raising=False)
    assert main(["port", weights, "my_models_cwd:tiny(num_classes=10)", "--dry-run", "-q"]) == EXIT_OK
    assert str(work) not in sys.path  # imported from there, not left on the path


def test_dry_run_builds_the_target_on_meta_and_plans_the_same(weights, monkeypatch, capsys):
    import conftest

    seen = []
    original = conftest.TinyNet

    def spy(**kwargs):
        model = original(**kwargs)
        seen.append({p.is_meta for p in model.parameters()})
        return model

    monkeypatch.setattr(conftest, "TinyNet", spy)
    assert main(["port", weights, TEN, "--dry-run", "--json"]) == EXIT_OK
    assert seen == [{True}]
    dry = json.loads(capsys.readouterr().out)
    eager = json.loads(wp.plan(weights, original(num_classes=10)).report.to_json())
    assert dry == eager


def test_port_takes_device_zero_copy_and_check_finite(tmp_path, capsys):
    state = {k: v.contiguous() for k, v in trained(num_classes=10).state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    assert main(["port", str(path), TEN, "--device", "cpu", "--zero-copy", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["zero_copy_tensors"] > 0
    state["conv1.weight"][0, 0, 0, 0] = math.nan
    save_file(state, str(path))
    assert main(["port", str(path), TEN]) == EXIT_OK  # not asked: not looked at
    capsys.readouterr()
    assert main(["port", str(path), TEN, "--check-finite"]) == EXIT_REFUSED
    line = _one_error_line(capsys.readouterr().err)
    assert "holds NaN or Inf" in line and "omit --check-finite to load it anyway" in line
    assert "--check-finite report to load it" in line and "check_finite" not in line
    assert main(["port", str(path), TEN, "--check-finite", "report"]) == EXIT_OK
    assert "warning: conv1.weight -> 'conv1.weight': holds NaN or Inf" in capsys.readouterr().out


def test_zero_copy_views_stay_valid_after_port(tmp_path, capsys):
    state = {k: v.contiguous() for k, v in trained(num_classes=10).state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    out = tmp_path / "out.safetensors"
    assert main(["port", str(path), TEN, "--zero-copy", "--out", str(out), "-q"]) == EXIT_OK
    from safetensors.torch import load_file

    assert all(torch.equal(load_file(str(out))[k], v) for k, v in state.items())


def test_port_adapts_a_resized_head_only_when_asked(weights, capsys):
    assert main(["port", weights, TEN, "--on-mismatch", "adapt", "--json"]) == EXIT_OK
    status = {e["target"]: e["status"] for e in json.loads(capsys.readouterr().out)["entries"]}
    assert status["fc.weight"] == "fresh"  # a 10-class head is not ImageNet's first 10 classes
    assert main(["port", weights, TEN, "--adapter", "head", "--json"]) == EXIT_OK
    status = {e["target"]: e["status"] for e in json.loads(capsys.readouterr().out)["entries"]}
    assert status["fc.weight"] == status["fc.bias"] == "adapted"


def test_port_chooses_ema_or_raw_weights(tmp_path, capsys):
    raw, ema = trained(seed=1), trained(seed=2)
    path = tmp_path / "timm-style.pth"
    torch.save({"state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    out = tmp_path / "out.safetensors"
    assert main(["port", str(path), TARGET, "--ema", "--out", str(out)]) == EXIT_OK
    assert "EMA weights taken" in capsys.readouterr().out
    assert torch.equal(load_file(out)["fc.weight"], ema.fc.weight)
    assert main(["port", str(path), TARGET, "--no-ema", "--out", str(out)]) == EXIT_OK
    assert torch.equal(load_file(out)["fc.weight"], raw.fc.weight)
