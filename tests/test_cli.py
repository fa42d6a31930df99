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
    assert out.err.startswith("weightport: error: --strict: target tensors not loaded") and "strict=" not in out.err
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
        (["port", "CKPT", TARGET, "--into", "nothing"], "--into nothing: the model has no submodule"),
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


def test_inspect_shows_scalar_entries_and_counts_ema_weights_as_tensors(tmp_path, capsys):
    ema = {k: v.clone() for k, v in trained(num_classes=1000).state_dict().items()}
    path = tmp_path / "timm-style.pth"
    torch.save(
        {
            "state_dict": trained(num_classes=1000).state_dict(),
            "state_dict_ema": ema,
            "epoch": 3,
            "step": 1000,
            "arch": "resnet50",
            "metric": 76.1,
            "huge": 1 << 5000,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        },
        path,
    )
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "entries: epoch=3, step=1000, arch='resnet50', metric=76.1, huge='<an integer of 5001 bits>'" in out
    numel, nbytes = sum(t.numel() for t in ema.values()), sum(t.numel() * t.element_size() for t in ema.values())
    assert f"EMA weights under 'state_dict_ema': {len(ema)} tensors, {numel:,} elements" in out
    assert "(--checkpoint-key state_dict_ema loads them)" in out
    ignored = next(line for line in out.splitlines() if "ignored non-tensor entries" in line)
    assert ignored.strip() == "ignored non-tensor entries: optimizer"  # epoch, EMA … are shown, not ignored
    assert "ema=True" not in out and "(--ema takes those)" in out  # the note speaks flags
    assert main(["inspect", str(path), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert entries["scalars"]["epoch"] == 3 and entries["scalars"]["arch"] == "resnet50"
    assert entries["weights"]["state_dict_ema"] == {"tensors": len(ema), "numel": numel, "nbytes": nbytes, "ema": True}
    # the EMA chosen: the raw weights are the other ones
    assert main(["inspect", str(path), "--checkpoint-key", "state_dict_ema"]) == 0
    out = capsys.readouterr().out
    assert "weights under 'state_dict': 12 tensors" in out and "EMA weights under" not in out


def test_inspect_of_a_plain_state_dict_shows_no_entries(tmp_path, capsys):
    path = tmp_path / "plain.pth"
    torch.save(trained().state_dict(), path)
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == {"scalars": {}, "weights": {}}


def test_inspect_verbose_lists_every_tensor_of_a_training_checkpoint(tmp_path, capsys):
    import weightport as wp

    model = trained()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    path = tmp_path / "train.safetensors"
    wp.checkpoint.save(path, model=model, optimizer=optimizer)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "optimizer/state" not in out and "-v lists every tensor" in out
    assert main(["inspect", str(path), "-v"]) == 0
    out = capsys.readouterr().out
    assert "optimizer/state/0/momentum_buffer" in out and "not listed" not in out
