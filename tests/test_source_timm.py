"""``timm:`` sources through timm's pretrained configs, on hub and torch hub caches built in tmp folders."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
from safetensors.torch import save as st_bytes

import weightport as wp
from weightport.errors import HashMismatchError, SourceNotFoundError
from weightport.sources import zoo_timm
from weightport.targets import build_target

timm = pytest.importorskip("timm")
from test_source_hf import put_repo  # noqa: E402  (the huggingface_hub cache layout)

REPO = "timm/test_resnet.r160_in1k"  # a 0.5 M parameter architecture timm keeps for tests


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hf").mkdir()
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hf", tmp_path / "torch" / "hub" / "checkpoints"


def _stand_in(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}


def _with_cfg(monkeypatch, **changes):
    """Point timm's pretrained config for test_resnet somewhere else (url, file)."""
    cfg = dataclasses.replace(zoo_timm.pretrained_cfg("test_resnet"), **changes)
    monkeypatch.setattr(zoo_timm, "pretrained_cfg", lambda spec: cfg)


@pytest.mark.parametrize("spec", ["timm:test_resnet.r160_in1k", "timm:test_resnet"])
def test_hub_weights_from_the_cache_with_provenance(caches, spec):
    hf, _ = caches
    state = _stand_in()
    put_repo(hf, REPO, {"model.safetensors": st_bytes(state), "config.json": b"{}"})
    model = timm.create_model("test_resnet")
    report = wp.transfer(spec, model, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    p = report.source.provenance
    assert report.source.kind == "timm" and report.source.location == spec
    assert (p["via"], p["repo"], p["timm_model"], p["timm_tag"], p["num_classes"]) == (
        "hf-hub",
        REPO,
        "test_resnet",
        "r160_in1k",
        1000,
    )


def test_vit_tag_resolves_to_its_hub_repo_and_fails_offline_with_the_command(caches):
    hf, _ = caches
    with pytest.raises(SourceNotFoundError) as e:
        wp.open_source("timm:vit_base_patch16_224.augreg_in21k")
    msg = str(e.value)
    assert str(hf / "models--timm--vit_base_patch16_224.augreg_in21k") in msg
    assert "hf download timm/vit_base_patch16_224.augreg_in21k" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("spec", "words"),
    [("resnet5000", "no model 'resnet5000'"), ("resnet50.nope", r"no pretrained tag 'nope'; its tags: .*a1_in1k")],
)
def test_unknown_model_or_tag(caches, spec, words):
    with pytest.raises(SourceNotFoundError, match=words):
        wp.open_source(f"timm:{spec}")


def test_url_weights_through_the_torch_hub_cache_with_hash_check(caches, monkeypatch):
    _, hub = caches
    state = _stand_in()
    tmp = hub / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"test_resnet_r160-{digest[:8]}.pth"
    tmp.rename(hub / name)
    _with_cfg(monkeypatch, hf_hub_id=None, url=f"https://example.org/w/{name}")
    src = wp.open_source("timm:test_resnet")
    assert src.info.provenance["via"] == "url" and src.info.provenance["sha256"] == digest
    assert torch.equal(src["fc.weight"], state["fc.weight"])


def test_url_hash_mismatch_refused_and_check_disabled(caches, monkeypatch):
    _, hub = caches
    torch.save(_stand_in(), hub / "test_resnet_r160-0123abcd.pth")
    _with_cfg(monkeypatch, hf_hub_id=None, url="https://example.org/w/test_resnet_r160-0123abcd.pth")
    with pytest.raises(HashMismatchError, match="0123abcd"):
        wp.open_source("timm:test_resnet")
    assert "fc.weight" in wp.open_source("timm:test_resnet", check_hash=False)


def test_uncached_hub_falls_back_to_a_cached_url_file(caches, monkeypatch):
    _, hub = caches
    torch.save(_stand_in(), hub / "test_resnet_r160.pth")
    _with_cfg(monkeypatch, url="https://example.org/w/test_resnet_r160.pth")
    src = wp.open_source("timm:test_resnet")
    assert src.info.provenance["via"] == "url" and src.info.provenance["file"] == str(hub / "test_resnet_r160.pth")


def test_file_in_the_config(caches, monkeypatch, tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(st_bytes(_stand_in()))
    _with_cfg(monkeypatch, hf_hub_id=None, file=str(path))
    src = wp.open_source("timm:test_resnet")
    assert src.info.provenance["via"] == "file" and src.info.files == (str(path),)


def test_cli_target_with_new_head_and_one_input_channel(caches):
    hf, _ = caches
    put_repo(hf, REPO, {"model.safetensors": st_bytes(_stand_in())})
    model = build_target("timm:test_resnet(num_classes=10, in_chans=1)")
    assert model.fc.out_features == 10 and model.conv1[0].in_channels == 1
    report = wp.transfer("timm:test_resnet", model)
    assert sorted(e.target for e in report.skipped) == ["conv1.0.weight", "fc.bias", "fc.weight"]
    assert len(report.loaded) == len(report.entries) - 3
    adapted = wp.transfer("timm:test_resnet", model, on_mismatch="adapt")
    assert {e.target: e.ops for e in adapted.adapted} == {"conv1.0.weight": ("in_channels 3->1",)}
    assert sorted(e.target for e in adapted.skipped) == ["fc.bias", "fc.weight"]  # a new head starts fresh
    adapted = wp.transfer("timm:test_resnet", model, on_mismatch="adapt", adapters=["head"])
    assert {e.target: e.ops for e in adapted.adapted} == {
        "conv1.0.weight": ("in_channels 3->1",),
        "fc.weight": ("head 1000->10",),
        "fc.bias": ("head 1000->10",),
    }


def test_cli_target_unknown_timm_model():
    from weightport.errors import TargetError

    with pytest.raises(TargetError, match="no model 'nope_net'"):
        build_target("timm:nope_net(num_classes=3)")


def test_timm_hf_hub_spelling(caches):
    hf, _ = caches
    put_repo(hf, REPO, {"model.safetensors": st_bytes(_stand_in())})
    src = wp.open_source(f"timm:hf-hub:{REPO}")
    assert src.info.kind == "timm" and src.info.provenance["repo"] == REPO and "fc.weight" in src
