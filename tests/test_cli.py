"""The command line: inspect, port, mappings; exit codes; one clear line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import trained
from safetensors.torch import load_file

from weightport.cli import main

TARGET = "conftest:TinyNet"


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"net": torch.nn.DataParallel(trained(num_classes=1000)).state_dict(), "epoch": 3}, path)
    return path


def test_inspect_text_and_json(ckpt, capsys):
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "weights found under 'net'" in out and "stripped prefixes: 'module.'" in out
    assert "conv1.weight" in out and "(8, 3, 3, 3)" in out and "tensors" in out
    assert main(["inspect", str(ckpt), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["source"]["wrapper"] == "net"
    assert {"name": "fc.weight", "shape": [1000, 8], "dtype": "float32", "numel": 8000, "nbytes": 32000} in d["tensors"]
    assert d["total"]["tensors"] == len(d["tensors"])


def test_port_dry_run_json_writes_nothing(ckpt, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(["port", str(ckpt), f"{TARGET}(num_classes=10)", "--dry-run", "--json", "--out", str(out)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["applied"] is False and d["counts"]["fresh"] == 2
    assert not out.exists()


def test_port_saves_and_applies_rules(ckpt, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code = main(["port", str(ckpt), f"{TARGET}(num_classes=10)", "--rule", "blocks.1.{p*}=>", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "dropped" in text and f"saved to {out}" in text
    saved = load_file(out)
    assert torch.equal(saved["conv1.weight"], trained(num_classes=1000).state_dict()["conv1.weight"])


def test_strictness_failure_exits_1(ckpt, capsys):
    assert main(["port", str(ckpt), TARGET, "--strict"]) == 1
    out = capsys.readouterr()
    assert "strict=True" in out.err
    assert "planned (dry run)" in out.out and "fresh" in out.out  # the preview report, to see what to fix
    assert main(["port", str(ckpt), TARGET, "--strict", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["applied"] is False and report["counts"]["fresh"] > 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["inspect", "/no/such/file.pth"], "/no/such/file.pth: no such file"),
        (["port", "CKPT", "conftest:NoSuchFactory"], "has no attribute 'NoSuchFactory'"),
        (["port", "CKPT", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
        (["port", "CKPT", f"{TARGET}(num_classes=os.system('x'))"], "must be Python literals"),
        (["port", "CKPT", TARGET, "--rule", "nonsense"], "--rule 'nonsense'"),
        (["port", "CKPT", TARGET, "--into", "nothing"], "into='nothing'"),
        (["port", "CKPT", TARGET, "--mapping", "no.such.mapping"], "'no.such.mapping' is neither"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(ckpt, capsys, argv, needle):
    argv = [str(ckpt) if a == "CKPT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert err.startswith("weightport: error:")


@pytest.mark.slow
def test_console_script_runs_as_a_process(ckpt, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "weightport", "inspect", str(tmp_path / "missing.pt")], capture_output=True, text=True
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and "missing.pt" in res.stderr
    res = subprocess.run([sys.executable, "-m", "weightport"], capture_output=True, text=True)
    assert res.returncode == 2 and "inspect" in res.stdout


def test_names_from_files_reach_the_terminal_escaped_and_port_out_completes(tmp_path, capsys):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in trained().state_dict().items()}
    state["x.\x1b]0;pwned\x07"] = torch.zeros(1)  # would set the terminal's title
    state["x.²"] = torch.zeros(1)  # a Unicode digit
    state["b.0.w"], state["b.1000000000.w"] = torch.zeros(1), torch.zeros(1)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;pwned\\x07" in out
    saved = tmp_path / "out.safetensors"
    assert main(["port", str(path), TARGET, "--out", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "x.²" in out and "saved to" in out
    assert set(load_file(str(saved))) == set(trained().state_dict())


def test_port_out_to_a_folder_is_one_line_and_exit_2(ckpt, tmp_path, capsys):
    assert main(["port", str(ckpt), f"{TARGET}(num_classes=10)", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("weightport: error:") and "is a folder" in err and len(err.splitlines()) == 1


def test_port_prints_the_summary_the_table_on_request_and_nothing_when_quiet(ckpt, capsys):
    target = f"{TARGET}(num_classes=10)"
    assert main(["port", str(ckpt), target, "--dry-run"]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("planned (dry run):") and "conv1.weight" not in summary
    assert "fresh (shape mismatch): fc.weight, fc.bias" in summary
    assert main(["port", str(ckpt), target, "--dry-run", "-v"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("target") and "conv1.weight" in table and "planned (dry run):" in table
    assert main(["port", str(ckpt), target, "--dry-run", "-q"]) == 0
    assert capsys.readouterr().out == ""
