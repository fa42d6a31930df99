"""``torchvision:`` sources on torch hub caches built in tmp folders ($TORCH_HOME/hub/checkpoints)."""

from __future__ import annotations

import hashlib

import pytest
import torch

import weightport as wp
from weightport.errors import HashMismatchError, SourceNotFoundError
from weightport.sources import zoo_torchvision

torchvision = pytest.importorskip("torchvision")
W = torchvision.models.get_model_weights("squeezenet1_1").IMAGENET1K_V1  # a 5 MB architecture


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def _stand_in(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random-init squeezenet weights standing in for the published file."""
    torch.manual_seed(seed)
    return torchvision.models.squeezenet1_1().state_dict()


def _cache_with_true_name(hub, monkeypatch, seed: int = 0):
    """Save stand-in weights under a name carrying their real sha256 prefix, and point the enum at it."""
    state = _stand_in(seed)
    tmp = hub / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = tmp.rename(hub / f"squeezenet1_1-{digest[:8]}.pth")
    monkeypatch.setattr(W.value, "url", f"https://download.pytorch.org/models/{path.name}")
    return state, path, digest


def test_cached_weights_load_with_hash_checked_and_provenance(hub, monkeypatch):
    state, path, digest = _cache_with_true_name(hub, monkeypatch)
    model = torchvision.models.squeezenet1_1()
    report = wp.transfer("torchvision:squeezenet1_1", model, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    p = report.source.provenance
    assert report.source.kind == "torchvision" and report.source.location == "torchvision:squeezenet1_1"
    assert p["weights"] == "SqueezeNet1_1_Weights.IMAGENET1K_V1" and p["categories"] == 1000
    assert p["sha256"] == digest and p["hash_checked"] and p["hash_prefix"] == digest[:8]
    assert p["file"] == str(path) and p["url"].endswith(path.name) and p["num_params"] == W.meta["num_params"]


def test_hash_mismatch_is_refused_naming_file_both_hashes_and_the_way_out(hub):
    path = hub / W.url.rsplit("/", 1)[1]  # the real name, squeezenet1_1-b8a52dc0.pth, with other contents
    torch.save(_stand_in(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(HashMismatchError) as e:
        wp.open_source("torchvision:squeezenet1_1")
    msg = str(e.value)
    assert str(path) in msg and digest in msg and "b8a52dc0" in msg and "check_hash=False" in msg
    assert isinstance(e.value, ValueError)


def test_hash_check_disabled_explicitly(hub):
    torch.save(_stand_in(), hub / W.url.rsplit("/", 1)[1])
    src = wp.open_source("torchvision:squeezenet1_1", check_hash=False)
    assert not src.info.provenance["hash_checked"] and "sha256" not in src.info.provenance
    assert src.meta("classifier.1.weight").shape == (1000, 512, 1, 1)


def test_a_damaged_file_that_was_verified_before_is_caught(hub, monkeypatch):
    _, path, _ = _cache_with_true_name(hub, monkeypatch)
    wp.open_source("torchvision:squeezenet1_1")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError):
        wp.open_source("torchvision:squeezenet1_1")


@pytest.mark.parametrize(
    "spec",
    [
        "resnet50.IMAGENET1K_V2",
        "resnet50.DEFAULT",
        "resnet50",
        "ResNet50_Weights.IMAGENET1K_V2",
        "ResNet50_Weights.DEFAULT",
    ],
)
def test_spec_forms_resolve_through_the_weights_api(spec):
    assert zoo_torchvision.resolve_weights(spec) is torchvision.models.ResNet50_Weights.IMAGENET1K_V2


def test_old_tag_resolves():
    assert zoo_torchvision.resolve_weights("resnet50.IMAGENET1K_V1").url.endswith("resnet50-0676ba61.pth")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("resnet51", "no model 'resnet51'"),
        ("resnet50.IMAGENET9K", "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"),
        ("ResNet50_Weights.NOPE", "no weights"),
        ("Nope_Weights.X", "no weights"),
    ],
)
def test_unknown_models_and_tags_say_what_exists(spec, words):
    with pytest.raises(SourceNotFoundError, match=words):
        wp.open_source(f"torchvision:{spec}")


def test_not_cached_offline_names_url_cache_path_and_command(hub):
    with pytest.raises(SourceNotFoundError) as e:
        wp.open_source("torchvision:resnet50.IMAGENET1K_V2")
    msg = str(e.value)
    assert "\n" not in msg and str(hub / "resnet50-11ad3fa6.pth") in msg
    assert "get_weight('ResNet50_Weights.IMAGENET1K_V2').get_state_dict()" in msg


def test_download_goes_through_torch_hub_with_the_hash_prefix(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise RuntimeError('invalid hash value (expected "b8a52dc0", got "00000000")')

    monkeypatch.setattr("torch.hub.download_url_to_file", download)
    with pytest.raises(HashMismatchError, match="does not match the hash"):
        wp.open_source("torchvision:squeezenet1_1")
    assert calls == [(W.url, str(hub / "squeezenet1_1-b8a52dc0.pth"), "b8a52dc0")]


def test_failed_download_is_a_not_found_error(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def download(url, dst, hash_prefix=None, progress=True):
        raise OSError("Name or service not known")

    monkeypatch.setattr("torch.hub.download_url_to_file", download)
    with pytest.raises(SourceNotFoundError, match="download failed"):
        wp.open_source("torchvision:squeezenet1_1")


def test_into_a_cli_target_with_a_new_head(hub, monkeypatch):
    from weightport.targets import build_target

    _cache_with_true_name(hub, monkeypatch)
    model = build_target("torchvision:squeezenet1_1(num_classes=10)")
    report = wp.transfer("torchvision:squeezenet1_1", model)
    assert [e.target for e in report.skipped] == ["classifier.1.weight", "classifier.1.bias"]
    assert len(report.loaded) == len(report.entries) - 2


def test_cli_refuses_a_mismatched_file_unless_told_not_to_check(hub, capsys):
    from weightport.cli import main as cli

    torch.save(_stand_in(), hub / W.url.rsplit("/", 1)[1])
    assert cli(["inspect", "torchvision:squeezenet1_1"]) == 2
    assert "--no-check-hash" in capsys.readouterr().err
    assert cli(["inspect", "torchvision:squeezenet1_1", "--no-check-hash", "--json"]) == 0
    assert '"classifier.1.weight"' in capsys.readouterr().out
    target = "torchvision:squeezenet1_1"
    assert cli(["port", "torchvision:squeezenet1_1", target, "--no-check-hash", "--strict", "--dry-run"]) == 0


def test_transfer_takes_check_hash(hub):
    torch.save(_stand_in(), hub / W.url.rsplit("/", 1)[1])
    with pytest.raises(HashMismatchError):
        wp.transfer("torchvision:squeezenet1_1", torchvision.models.squeezenet1_1())
    report = wp.transfer("torchvision:squeezenet1_1", torchvision.models.squeezenet1_1(), check_hash=False)
    assert not report.source.provenance["hash_checked"]


def test_a_weights_enum_member_is_a_source_read_from_the_cache(hub, monkeypatch):
    state, path, digest = _cache_with_true_name(hub, monkeypatch)
    model = torchvision.models.squeezenet1_1()
    report = wp.transfer(W, model, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert report.source.location == "torchvision:SqueezeNet1_1_Weights.IMAGENET1K_V1"
    assert report.source.provenance["sha256"] == digest and report.source.provenance["file"] == str(path)
    src = wp.open_source(W)
    assert src.meta("classifier.1.weight").shape == (1000, 512, 1, 1)
    assert wp.plan(W, torchvision.models.squeezenet1_1()).report.source.kind == "torchvision"


def test_a_weights_enum_member_takes_the_source_options(hub):
    torch.save(_stand_in(), hub / W.url.rsplit("/", 1)[1])  # not the published bytes
    with pytest.raises(HashMismatchError, match="check_hash=False"):
        wp.open_source(W)
    assert not wp.open_source(W, check_hash=False).info.provenance["hash_checked"]


def test_a_weights_enum_member_not_cached_says_where_it_looked_and_how_to_fetch_it(hub):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(SourceNotFoundError) as e:
        wp.transfer(weights, torchvision.models.resnet18())
    msg = str(e.value)
    assert str(hub / "resnet18-f37072fd.pth") in msg
    assert "get_weight('ResNet18_Weights.IMAGENET1K_V1').get_state_dict()" in msg


def test_other_enums_are_not_weights():
    import enum

    class Colour(enum.Enum):
        RED = 1

    with pytest.raises(wp.errors.SourceError, match="cannot open a Colour"):
        wp.open_source(Colour.RED)
