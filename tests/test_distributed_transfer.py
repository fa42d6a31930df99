"""``wp.transfer`` into sharded models (DTensor parameters: FSDP2, tensor parallel) on 2 CPU ranks.

Each rank plans the same transfer and reads only the source boxes its local shards need, through
DCP; the local shards equal a single-process load of the same source and mapping, bit for bit; all
ranks change or none does. Every test spawns 2 gloo processes (``tests/dist_harness.py``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks, run_scenarios
from llm_models import hf_model, tokens
from safetensors.torch import save_file
from torch import nn

import weightport as wp
from weightport.models.llama import Llama, LlamaParams

pytestmark = pytest.mark.slow

HF_TO_META = "hf.llama->meta.llama"
SIZES = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 224, "head_dim": 32}


def _params(config: dict) -> LlamaParams:
    return LlamaParams(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config["num_key_value_heads"],
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config["rms_norm_eps"],
        rope_theta=config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0)),
    )


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf-llama")
    hf_model("llama", **SIZES).save_pretrained(folder)
    return folder


def _fsdp(model: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def _llama_ranks(rank: int, world_size: int, folder: str, params: LlamaParams, meta: bool) -> dict:
    torch.manual_seed(5)
    with torch.device("meta" if meta else "cpu"):
        model = Llama(params)
    _fsdp(model, list(model.layers))
    wp.transfer(folder, model, mapping=HF_TO_META)  # warm-up: imports and first reads done
    before = _rchar()
    report = wp.transfer(folder, model, mapping=HF_TO_META)
    read = _rchar() - before
    local = {n: p.to_local().clone() for n, p in model.named_parameters()}  # before forward unshards the root
    with torch.no_grad():
        logits = model(tokens(length=9))
    return {"local": local, "logits": logits, "report": report.to_dict(), "rchar": read, "text": report.summary()}


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf-llama-small")
    hf_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_runs(llama_folder: Path, small_folder: Path) -> dict[str, list]:
    """One spawn of the ranks for every model-scale scenario."""
    params = _params(json.loads((llama_folder / "config.json").read_text()))
    calls = {
        "meta-built": (_llama_ranks, (str(llama_folder), params, True)),
        "materialised": (_llama_ranks, (str(llama_folder), params, False)),
        "transformers": (_transformers_ranks, (str(llama_folder),)),
    }
    if importlib.util.find_spec("torchtitan") is not None:
        calls["torchtitan"] = (_titan_ranks, (str(small_folder),))
    return run_scenarios(calls, timeout=400)


@pytest.mark.parametrize("meta", ["meta-built", "materialised"])
def test_fsdp_llama_local_shards_equal_a_single_process_load(llama_folder: Path, model_runs: dict, meta: str) -> None:
    config = json.loads((llama_folder / "config.json").read_text())
    params = _params(config)
    single = Llama(params)
    wp.transfer(llama_folder, single, mapping=HF_TO_META)
    with torch.no_grad():
        want_logits = single(tokens(length=9))
    ranks = model_runs[meta]
    for rank, got in enumerate(ranks):
        for name, full in single.state_dict().items():
            assert torch.equal(got["local"][name], full.chunk(2)[rank]), name
        torch.testing.assert_close(got["logits"], want_logits, rtol=0, atol=1e-6)
        assert got["report"]["counts"] == {"loaded": len(single.state_dict()), "adapted": 0, "fresh": 0}
    # each rank read its half of every tensor; together, the checkpoint's tensors once
    per_rank = ranks[0]["report"]["bytes_read_per_rank"]
    assert per_rank == ranks[1]["report"]["bytes_read_per_rank"]
    total = sum(t.nbytes for t in single.state_dict().values())
    assert sum(per_rank) == total
    assert all(0.4 * total < n < 0.6 * total for n in per_rank), per_rank
    # the kernel agrees: the process read those bytes (and little else)
    for rank, got in enumerate(ranks):
        assert per_rank[rank] <= got["rchar"] < per_rank[rank] + 512 * 1024, (per_rank, got["rchar"])
    assert "source bytes read per rank: rank 0:" in ranks[0]["text"]


# -- placements: tensor parallel columns, replicated, uneven rows ---------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)  # fused from q, k, v by a rule
        self.proj = nn.Linear(8, 6, bias=False)  # tensor parallel: Shard(1) (row-wise)
        self.head = nn.Linear(6, 7)  # 7 rows on 2 ranks: 4 and 3
        self.norm = nn.LayerNorm(6)  # replicated
        self.conv = nn.Linear(5, 4, bias=False)  # stored transposed (GPT-2 Conv1D), read by columns


def _tiny_source() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shapes = {
        "q.weight": (8, 8),
        "k.weight": (8, 8),
        "v.weight": (8, 8),
        "proj.weight": (6, 8),
        "head.weight": (7, 6),
        "head.bias": (7,),
        "norm.weight": (6,),
        "norm.bias": (6,),
        "conv.weight": (5, 4),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _halve(x: torch.Tensor) -> torch.Tensor:
    return x / 2


TINY_RULES = (
    wp.fuse(["q.weight", "k.weight", "v.weight"], "qkv.weight", dim=0),
    wp.transform("conv.weight", "conv.weight", "transpose"),
    wp.transform("head.bias", "head.bias", _halve),  # a callable has no region map: read whole
)


def _placements() -> dict:
    from torch.distributed.tensor import Replicate, Shard

    return {
        "qkv.weight": [Shard(0)],
        "proj.weight": [Shard(1)],
        "head.weight": [Shard(0)],
        "head.bias": [Shard(0)],
        "norm.weight": [Replicate()],
        "norm.bias": [Replicate()],
        "conv.weight": [Shard(0)],
    }


def _distributed_tiny(meta: bool) -> Tiny:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    torch.manual_seed(0)
    model = Tiny()
    if meta:
        model = model.to("meta")
    for name, placements in _placements().items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(distribute_tensor(old.detach(), mesh, placements)))
    return model


def _tiny_ranks(rank: int, world_size: int, path: str, meta: bool) -> dict:
    model = _distributed_tiny(meta)
    source = wp.open_source(path)
    before = _rchar()
    plan = wp.plan(source, model, rules=TINY_RULES)
    planning_read = _rchar() - before
    with pytest.raises(wp.errors.OptionError, match="dtype= does not apply to a sharded model"):
        plan.apply(dtype=torch.float16)
    report = plan.apply()
    return {
        "local": {n: p.to_local().clone() for n, p in model.named_parameters()},
        "full": {n: p.full_tensor().clone() for n, p in model.named_parameters()},
        "report": report.to_dict(),
        "preview": plan.report.to_dict(),
        "planning_read": planning_read,
        "opened": [Path(f).name for f in source.opened_shards],
    }


class Offset(nn.Module):
    """A layer whose initialisation is ``arange + c`` for one random ``c``: shards drawn by ranks
    with different generators would show different ``c``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(5, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.arange(15.0).reshape(5, 3) + torch.rand(()))


def _fresh_ranks(rank: int, world_size: int) -> dict:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), Offset())
    _fsdp(model, list(model))
    torch.manual_seed(100 + rank)  # the ranks' generators differ
    report = wp.transfer({"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4)}, model)
    return {
        "fresh": [e.target for e in report.fresh],
        "weight": model[1].weight.detach().full_tensor(),
        "local": model[1].weight.detach().to_local(),
    }


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """One spawn of the ranks for every scenario on the tiny models."""
    folder = tmp_path_factory.mktemp("tiny")
    source = _tiny_source()
    # a sharded folder whose second file holds only tensors the model does not take
    save_file(source, str(folder / "tiny.safetensors"))
    save_file({"other.weight": torch.ones(64, 64)}, str(folder / "other.safetensors"))
    weight_map = {**dict.fromkeys(source, "tiny.safetensors"), "other.weight": "other.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    nan = _tiny_source()
    nan["head.weight"][6, 0] = float("nan")  # row 6 is rank 1's
    save_file(nan, str(folder / "nan.safetensors"))
    save_file({"0.weight": torch.randn(512, 256), "1.weight": torch.randn(256, 512)}, str(folder / "big.safetensors"))
    calls: dict[str, tuple] = {
        "placements meta-built": (_tiny_ranks, (str(folder), True)),
        "placements materialised": (_tiny_ranks, (str(folder), False)),
        "strict": (_failing_ranks, (str(folder / "tiny.safetensors"), False, "strict")),
        "largest": (_largest_allocation, (str(folder / "big.safetensors"),)),
        "fresh": (_fresh_ranks, ()),
    }
    for meta in (True, False):
        calls[f"op {meta}"] = (_failing_ranks, (str(folder / "tiny.safetensors"), meta, "op"))
        calls[f"nan {meta}"] = (_failing_ranks, (str(folder / "nan.safetensors"), meta, "nan"))
    return run_scenarios(calls, timeout=400)


@pytest.mark.parametrize("meta", ["meta-built", "materialised"])
def test_placements_shard_rows_columns_uneven_and_replicated(tiny_runs: dict, meta: str) -> None:
    source = _tiny_source()
    single = Tiny()
    wp.transfer(source, single, rules=TINY_RULES)
    want = single.state_dict()
    ranks = tiny_runs[f"placements {meta}"]
    for rank, got in enumerate(ranks):
        for name, full in want.items():
            assert torch.equal(got["full"][name], full), name
        assert torch.equal(got["local"]["proj.weight"], want["proj.weight"].chunk(2, dim=1)[rank])
        assert torch.equal(got["local"]["head.weight"], want["head.weight"].chunk(2)[rank])
        assert got["local"]["head.weight"].shape[0] == (4, 3)[rank]
        assert torch.equal(got["local"]["norm.weight"], want["norm.weight"])
    assert ranks[0]["opened"] == ranks[1]["opened"] == ["tiny.safetensors"]  # only the file holding needed tensors
    assert ranks[0]["report"]["unused"] == ["other.weight"]
    # every rank planned the same transfer, reading only the file's header
    assert ranks[0]["preview"] == ranks[1]["preview"] and ranks[0]["preview"]["applied"] is False
    assert all(got["planning_read"] < 64 * 1024 for got in ranks)
    # each rank reads the replicated norm whole, and the head's bias, which a callable makes
    per_rank = ranks[0]["report"]["bytes_read_per_rank"]
    whole = source["norm.weight"].nbytes + source["norm.bias"].nbytes + source["head.bias"].nbytes
    assert sum(per_rank) == sum(t.nbytes for t in source.values()) + whole
    notes = [w for w in ranks[0]["report"]["warnings"] if "read whole" in w]
    assert notes and "'head.bias' (_halve)" in notes[0] and "qkv" not in notes[0]
    assert notes[0] in ranks[0]["preview"]["warnings"]  # the plan says so before anything is read


def _transformers_ranks(rank: int, world_size: int, folder: str) -> torch.Tensor:
    import transformers
    from llm_models import hf_config

    with wp.init_empty():  # keeps the rotary inv_freq buffers real
        model = transformers.AutoModelForCausalLM.from_config(hf_config("llama", **SIZES))
    _fsdp(model, list(model.model.layers))
    report = wp.transfer(folder, model, strict=True)
    assert report.counts()["loaded"] == len(report.entries)
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def test_fsdp_transformers_llama_built_with_init_empty_gives_the_same_logits(
    llama_folder: Path, model_runs: dict
) -> None:
    import transformers

    single = transformers.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    with torch.no_grad():
        want = single(input_ids=tokens()).logits
    for got in model_runs["transformers"]:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# -- all or nothing --------------------------------------------------------------------------------


def _failing_ranks(rank: int, world_size: int, path: str, meta: bool, how: str) -> dict:
    model = _distributed_tiny(meta)
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    objects = {n: p for n, p in model.named_parameters()}
    if how == "op":

        def breaks_on_rank_1(x: torch.Tensor) -> torch.Tensor:
            if torch.distributed.get_rank() == 1:
                raise RuntimeError("injected failure")
            return x

        options: dict = {"rules": (*TINY_RULES[:2], wp.transform("head.bias", "head.bias", breaks_on_rank_1))}
    elif how == "strict":  # decided while planning, identically on every rank, before any collective
        options = {"rules": TINY_RULES[:1], "strict": True}
    else:
        options = {"rules": TINY_RULES, "check_finite": True}
    try:
        wp.transfer(path, model, **options)
    except wp.errors.DistributedError as e:
        error = (type(e).__name__, str(e), dict(e.failures))
    except wp.errors.StrictnessError as e:
        error = (type(e).__name__, str(e), {})
    else:
        error = None
    unchanged = all(
        objects[n] is p and (p.to_local().is_meta if meta else torch.equal(p.to_local(), before[n]))
        for n, p in model.named_parameters()
    )
    return {"error": error, "unchanged": unchanged}


def test_strictness_fails_on_every_rank_alike(tiny_runs: dict) -> None:
    for got in tiny_runs["strict"]:
        assert got["unchanged"] and got["error"][0] == "StrictnessError" and "conv.weight" in got["error"][1]


@pytest.mark.parametrize("how", ["op", "nan"])
def test_a_failure_on_rank_1_leaves_every_rank_unchanged(tiny_runs: dict, how: str) -> None:
    for meta in (False, True):
        for got in tiny_runs[f"{how} {meta}"]:
            assert got["unchanged"]
            assert got["error"] is not None and got["error"][0] == "DistributedError"
            assert list(got["error"][2]) == [1], got["error"]
            assert ("injected failure" if how == "op" else "NaN") in got["error"][1]


def test_a_fresh_sharded_tensor_is_initialised_once_for_all_ranks(tiny_runs: dict) -> None:
    """Each rank holds its rows of one initialisation (rank 0's seed), as the module's own
    ``reset_parameters`` gives it, whatever each rank's generator holds."""
    for rank, got in enumerate(tiny_runs["fresh"]):
        assert got["fresh"] == ["1.weight"]
        offset = got["weight"] - torch.arange(15.0).reshape(5, 3)
        assert torch.allclose(offset, offset[0, 0].expand_as(offset)) and 0 <= float(offset[0, 0]) < 1
        assert torch.equal(got["local"], got["weight"].chunk(2)[rank])


def _rank_1_never_comes(rank: int, world_size: int, path: str) -> dict:
    import time

    model = _distributed_tiny(meta=False)
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    if rank == 1:
        time.sleep(6)  # never calls transfer; stays alive past rank 0's timeout
        return {}
    start = time.monotonic()
    with pytest.raises(wp.errors.DistributedError, match="every rank must call weightport.transfer") as e:
        wp.transfer(path, model, rules=TINY_RULES, timeout=2)
    unchanged = all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
    return {"seconds": time.monotonic() - start, "unchanged": unchanged, "message": str(e.value)}


def test_a_rank_that_never_comes_makes_the_others_raise_not_hang(tmp_path: Path) -> None:
    save_file(_tiny_source(), str(tmp_path / "tiny.safetensors"))
    got = run_ranks(_rank_1_never_comes, str(tmp_path / "tiny.safetensors"))[0]
    assert got["unchanged"] and got["seconds"] < 6, got


# -- memory: a meta-built sharded model never holds a full-size tensor -----------------------------------


def _largest_allocation(rank: int, world_size: int, path: str) -> dict:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if type(t) is torch.Tensor and not t.is_meta:
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False))
    _fsdp(model, list(model))
    with Largest():
        wp.transfer(path, model)
    return {"largest": Largest.numel, "local": model[0].weight.to_local().numel()}


def test_a_meta_built_sharded_model_never_allocates_a_full_tensor(tiny_runs: dict) -> None:
    for got in tiny_runs["largest"]:
        assert got["largest"] <= got["local"] == 512 * 256 // 2


# -- torchtitan: the fused wqkv behind its loading hook ---------------------------------------------------


def _titan_ranks(rank: int, world_size: int, folder: str) -> dict:
    from titan_models import llama3, logits

    model, _ = llama3(fuse_qkv=True, seed=1)
    _fsdp(model, list(model.layers.values()) if hasattr(model.layers, "values") else list(model.layers))
    report = wp.transfer(folder, model, mapping="hf.llama->torchtitan.llama", strict=True)
    return {"logits": logits(model, tokens()), "warnings": report.warnings}


def test_fsdp_torchtitan_with_fused_qkv_matches_transformers_and_names_the_whole_reads(model_runs: dict) -> None:
    pytest.importorskip("torchtitan")
    from llm_models import hf_logits

    want = hf_logits(hf_model("llama"), tokens())  # the model saved in small_folder
    for got in model_runs["torchtitan"]:
        torch.testing.assert_close(got["logits"], want, rtol=0, atol=1e-5)
        whole = [w for w in got["warnings"] if w.startswith("read whole")]
        assert whole and "'layers.0.attention.qkv_linear.wqkv.weight' (FusedQKVLinear loading hook)" in whole[0]


# -- a 2-D mesh: data parallel x tensor parallel on 4 ranks -----------------------------------------------


def _two_d_ranks(rank: int, world_size: int, path: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 5))
    placements = {"0.weight": [Shard(0), Shard(1)], "0.bias": [Shard(0), Replicate()]}
    for name, p in model.named_parameters():
        module, attr = model[int(name[0])], name[2:]
        chosen = placements.get(name, [Shard(0), Replicate()])
        setattr(module, attr, nn.Parameter(distribute_tensor(torch.empty(p.shape, device="meta"), mesh, chosen)))
    report = wp.transfer(path, model, rules=[wp.transform("1.weight", "1.weight", "scale", factor=2.0)])
    return {"full": {n: p.full_tensor() for n, p in model.named_parameters()}, "read": report.bytes_read_per_rank}


def test_a_2d_mesh_of_4_ranks_loads_what_a_single_process_does(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 5)).state_dict()
    save_file(source, str(tmp_path / "two_d.safetensors"))
    want = {**source, "1.weight": source["1.weight"] * 2}
    ranks = run_ranks(_two_d_ranks, str(tmp_path / "two_d.safetensors"), world_size=4)
    for got in ranks:
        assert all(torch.equal(got["full"][k], want[k]) for k in want)
    # 0.weight is split four ways; what the tp dimension replicates, both tp ranks of a dp row read
    weight, replicated = source["0.weight"].nbytes, sum(source[k].nbytes for k in ("0.bias", "1.weight", "1.bias"))
    assert sum(ranks[0]["read"]) == weight + 2 * replicated and len(ranks[0]["read"]) == 4
