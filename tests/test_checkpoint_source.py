"""A training checkpoint as a plain source, and the checkpoint's file forms (safetensors or torch)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TiedLM, TinyNet, trained
from safetensors.torch import load_file

import weightport as wp
from weightport.cli import main
from weightport.errors import NothingLoadedError, SaveError, SourceError

NOTE = (
    "weightport training checkpoint (step 3): model part taken; optimizer, scheduler, rng, extra state ignored; "
    "use weightport.checkpoint.resume to resume training"
)


def _run(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    return opt, sched


@pytest.fixture(params=["safetensors", "pt"])
def saved(request, tmp_path):
    model = trained()
    opt, sched = _run(model)
    path = wp.checkpoint.save(
        tmp_path / f"ck.{request.param}", model=model, optimizer=opt, scheduler=sched, step=3, extra={"a": 1}
    )
    return model, path


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_training_checkpoint_given_as_a_path_loads_its_model_part(saved):
    model, path = saved
    target = TinyNet()
    report = wp.transfer(path, target)
    assert _equal(model, target) and len(report.loaded) == len(target.state_dict())
    assert report.source.kind == "weightport-checkpoint"
    assert f"source: {path} (weightport-checkpoint); {NOTE}" in report.summary()
    assert len(wp.plan(str(path), TinyNet()).report.loaded) == len(target.state_dict())
    source = wp.open_source(path)
    assert sorted(source) == sorted(model.state_dict())  # the model's own names, no "model/"
    assert NOTE in source.info.notes
    assert any(k.startswith("optimizer/") for k in source.whole)  # the rest stays reachable


def test_a_checkpoint_part_shares_tied_tensors_and_mapped_views(tmp_path):
    path = wp.checkpoint.save(tmp_path / "lm.safetensors", model=TiedLM())
    source = wp.open_source(path)
    assert source.same_tensor("embed.weight", "head.weight")
    assert source.mapped_view("embed.weight") is not None  # zero_copy=True works through the part


def test_the_cli_ports_and_inspects_a_training_checkpoint(saved, tmp_path, capsys):
    model, path = saved
    out = tmp_path / "out.safetensors"
    assert main(["port", str(path), "conftest:TinyNet", "--strict", "--out", str(out)]) == 0
    assert "weightport training checkpoint (step 3): model part taken" in capsys.readouterr().out
    assert load_file(out).keys() == model.state_dict().keys()
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {t["name"] for t in data["tensors"]}  # every tensor of the file, each part under its prefix
    assert {n for n in names if n.startswith("model/")} == {f"model/{k}" for k in model.state_dict()}
    assert any(n.startswith("optimizer/") for n in names)
    assert data["checkpoint"]["step"] == 3


def test_a_training_checkpoint_holds_no_ema_weights(saved):
    _, path = saved
    with pytest.raises(SourceError, match=rf"{path}: ema=True, but it holds no EMA weights"):
        wp.transfer(path, TinyNet(), ema=True)
    assert wp.transfer(path, TinyNet(), ema=False).loaded


def test_model_keys_read_without_the_files_metadata_point_to_the_path():
    read_elsewhere = {f"model/{k}": v for k, v in trained().state_dict().items()}  # e.g. load_file(path)
    with pytest.raises(NothingLoadedError, match="read without its metadata.*pass the file's path"):
        wp.plan(read_elsewhere, TinyNet())


# -- the file forms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["pt", "pth", "bin"])
def test_a_checkpoint_named_pt_is_a_torch_file_that_resumes(tmp_path, ext):
    model = trained()
    opt, sched = _run(model)
    path = wp.checkpoint.save(tmp_path / f"ck.{ext}", model=model, optimizer=opt, scheduler=sched, step=3)
    loaded = torch.load(path, weights_only=True)  # what torch users expect of a .pt file
    assert torch.equal(loaded["model/fc.weight"], model.fc.weight)
    assert json.loads(loaded["__metadata__"]["weightport.checkpoint"])["step"] == 3
    again = TinyNet()
    opt2, sched2 = _run(again)
    state = wp.checkpoint.resume(path, model=again, optimizer=opt2, scheduler=sched2)
    assert state.step == 3 and _equal(model, again)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.last_epoch == sched.last_epoch


def test_a_tied_model_resumes_strictly_from_the_torch_form(tmp_path):
    model = TiedLM()
    path = wp.checkpoint.save(tmp_path / "lm.pt", model=model)
    assert json.loads(torch.load(path, weights_only=True)["__metadata__"]["weightport.aliases"])
    again = TiedLM()
    wp.checkpoint.resume(path, model=again)  # strict: the alias is no unused tensor
    assert again.head.weight is again.embed.weight and torch.equal(again.embed.weight, model.embed.weight)


@pytest.mark.parametrize("name", ["ck.ckpt", "ck", "ck.safetensors.tmp"])
def test_a_checkpoint_with_another_extension_is_refused_before_any_work(tmp_path, name):
    with pytest.raises(SaveError, match=rf"{tmp_path / name}: unknown extension.*\.safetensors.*\.pt/\.pth/\.bin"):
        wp.checkpoint.save(tmp_path / name, model=TinyNet())
    assert list(tmp_path.iterdir()) == []


def test_a_safetensors_checkpoint_under_a_torch_name_still_reads(tmp_path):
    """Earlier versions wrote safetensors bytes whatever the name: such files keep working."""
    model = trained()
    old = wp.checkpoint.save(tmp_path / "ck.safetensors", model=model, step=3).rename(tmp_path / "old.pt")
    target = TinyNet()
    assert wp.transfer(old, target).source.kind == "weightport-checkpoint" and _equal(model, target)
    again = TinyNet()
    assert wp.checkpoint.resume(old, model=again).step == 3 and _equal(model, again)
