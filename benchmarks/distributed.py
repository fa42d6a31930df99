"""Distributed loading benchmark: a Hugging Face Llama folder into a 2-rank FSDP2 model on CPU.

``python benchmarks/run.py --models distributed`` runs it; ``python benchmarks/distributed.py TARGET CASE
WORKDIR [SIZE]`` runs one case (its ranks spawned from this process) and prints one JSON line per rank.

The checkpoint is ``benchmarks/llm.py``'s (random bf16 values, one ``model.safetensors``), at a size
that loads in seconds on two cores. Each case builds the target on the meta device, shards it with
FSDP2 (``fully_shard`` per decoder layer, then the root) over a gloo group of 2 spawned processes
(localhost, one thread each, every collective with a timeout), then loads it the way the case says,
ending with one pass over each rank's local shards. Outside the timed part, every rank hashes each of
its local shards: every case must give the same local shards, bit for bit, as the first case of its
target and as ``torch.chunk`` rows of a single-process load (``reference``).

Per rank: wall time (from a barrier to the end of the pass), CPU time, what the process read through
``read()``/``pread()`` (``/proc/self/io`` ``rchar``; ``read_bytes``, from the disk, is 0 with the file
in the page cache; gloo's socket traffic is not in it), the peak growth of its file-backed resident memory
(``RssFile``, sampled: the pages of a mapped file it touched, which ``rchar`` never sees), its minor page
faults (first touches of new memory and of mapped file pages alike), and its peak RSS over the baseline
(which counts mapped file pages too).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import llm  # noqa: E402
from cases import _reset_peak, _status_kib, one_pass  # noqa: E402

WORLD = 2
COLLECTIVE_TIMEOUT_S = 120
# hidden 768, 12 layers, 12 query / 4 kv heads of 64, SwiGLU 2048, vocabulary 32000: 125M parameters, 238 MiB
SIZES = {"125m": llm.Size(hidden=768, layers=12, heads=12, kv_heads=4, ffn=2048, vocab=32000), "toy": llm.SIZES["toy"]}
Load = Callable[[str, llm.Size, torch.nn.Module, Any], torch.nn.Module]


def prepare(work: str, size: str = "125m") -> str:
    """Write the checkpoint once (kept between runs; ``llm.py``'s writer); return its folder."""
    path = llm.folder(work, size)
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        print(f"generating a {SIZES[size].parameters() / 1e6:.0f}M-parameter Llama folder (bf16) ...", file=sys.stderr)
        llm.write_checkpoint(path, SIZES[size])
    return path


# -- the targets: built on meta, sharded with FSDP2 ------------------------------------------------


def hf_config(size: llm.Size) -> Any:
    import transformers

    return transformers.LlamaConfig(
        hidden_size=size.hidden, intermediate_size=size.ffn, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, head_dim=size.head_dim,
        vocab_size=size.vocab, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip


def sharded(model: torch.nn.Module, layers: Any) -> torch.nn.Module:
    """FSDP2 over all ranks: each decoder layer, then the root (parameters become Shard(0) DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build(target: str, size: llm.Size, ours: bool) -> tuple[torch.nn.Module, Any]:
    """The target on the meta device in bf16 (weightport's ``init_empty`` when ``ours``), sharded; and its config."""
    if target == "torchtitan":
        model, config = llm.titan_meta(size, ours)
        return sharded(model, model.layers.values() if hasattr(model.layers, "values") else model.layers), config
    import transformers

    config = hf_config(size)
    with llm.built(ours):
        model = transformers.LlamaForCausalLM(config)
    return sharded(model, model.model.layers), config


def titan_adapter(config: Any, path: str | None = None) -> Any:
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    return Llama3StateDictAdapter(config, path)


# -- the cases: each loads the meta-built sharded model and returns it ------------------------------


#: the source bytes each rank read, as weightport's report of the last transfer in this process says
REPORTED: list[int] = []


def weightport_load(target: str) -> Load:
    """``wp.transfer`` into the meta-built sharded model: each rank reads only its shards' byte ranges."""

    def load(path: str, size: llm.Size, model: torch.nn.Module, config: Any) -> torch.nn.Module:
        import weightport as wp

        how = llm.how(llm.TITAN_MAPPING, llm.titan_rules) if target == "torchtitan" else {}
        report = wp.transfer(path, model, strict=True, progress=False, **how)
        REPORTED[:] = report.bytes_read_per_rank
        return model

    return load


def dcp_hf_reader(target: str) -> Load:
    """``model.to_empty``, then ``dcp.load`` of its state dict (in Hugging Face names: for torchtitan
    through its adapter's ``to_hf``, loaded back with ``from_hf`` and ``load_state_dict``) with
    ``HuggingFaceStorageReader``."""

    def load(path: str, size: llm.Size, model: torch.nn.Module, config: Any) -> torch.nn.Module:
        import torch.distributed.checkpoint as dcp

        model.to_empty(device="cpu")
        reader = dcp.HuggingFaceStorageReader(path)
        if target != "torchtitan":
            dcp.load(model.state_dict(), storage_reader=reader)  # fills the local shards in place
            return model
        adapter = titan_adapter(config)
        state = adapter.to_hf(model.state_dict())
        dcp.load(state, storage_reader=reader)
        model.load_state_dict(adapter.from_hf(state), strict=True)
        return model

    return load


def broadcast_from_rank0(target: str) -> Load:
    """Rank 0 reads the whole file (``safetensors.torch.load_file``) and converts the names (for
    torchtitan: its adapter's ``from_hf``, then its ``FusedQKVLinear`` hook fuses q, k, v); then
    ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` into the meta-built model."""

    def load(path: str, size: llm.Size, model: torch.nn.Module, config: Any) -> torch.nn.Module:
        import torch.distributed as dist
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full: dict[str, torch.Tensor] = {}
        if dist.get_rank() == 0:
            full = load_file(os.path.join(path, "model.safetensors"))
            if target == "torchtitan":
                full = titan_fused(model, titan_adapter(config).from_hf(full))
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        set_model_state_dict(model, full, options=options)
        return model

    return load


def titan_fused(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each layer's ``wq``/``wk``/``wv`` fused into ``wqkv`` by torchtitan's own load hook
    (``set_model_state_dict`` matches the parameters' names, not the names the hooks present)."""
    for name, module in model.named_modules():
        hook = getattr(type(module), "_merge_qkv_on_load", None)
        if hook is not None:
            hook(module, state, f"{name}.")
    return state


def titan_checkpointer(path: str, size: llm.Size, model: torch.nn.Module, config: Any) -> torch.nn.Module:
    """torchtitan's own flow: ``model.to_empty``, then its ``CheckpointManager`` with
    ``initial_load_path`` and ``initial_load_in_hf`` loads the model (``to_hf`` of the state dict,
    ``dcp.load`` through its adapter's ``HuggingFaceStorageReader``, ``from_hf``, ``load_state_dict``).
    Its trainer also runs ``init_weights`` after ``to_empty``; that is not counted here."""
    from torchtitan.components.checkpointer import CheckpointManager

    model.to_empty(device="cpu")
    with tempfile.TemporaryDirectory(prefix="wp-titan-ckpt-") as base:
        settings = CheckpointManager.Config(
            enable=True, initial_load_path=path, initial_load_in_hf=True, initial_load_model_only=True, keep_latest_k=0
        )
        manager = CheckpointManager(
            settings, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,  # type: ignore[arg-type]
            states={}, sd_adapter=titan_adapter(config, path), base_folder=base,
        )  # fmt: skip
        try:
            if not manager.load():
                raise RuntimeError("torchtitan's CheckpointManager loaded nothing")
        finally:
            manager.close()
    return model


WEIGHTPORT = "weightport.transfer into the meta-built FSDP2 model"
DCP_HF = "DCP: to_empty, dcp.load with HuggingFaceStorageReader"
BROADCAST = "set_model_state_dict(broadcast_from_rank0) of rank 0's load_file"
TITAN = "torchtitan CheckpointManager.load (initial_load_in_hf)"
# target -> [(case name, load)]; each target's first case is weightport's, the one the others are compared to
CASES: dict[str, list[tuple[str, Load]]] = {
    "torchtitan": [
        (WEIGHTPORT + " (mapping hf.llama->torchtitan.llama)", weightport_load("torchtitan")),
        (DCP_HF + " (torchtitan's adapter: to_hf, from_hf, load_state_dict)", dcp_hf_reader("torchtitan")),
        (BROADCAST + " (torchtitan's from_hf and qkv hook)", broadcast_from_rank0("torchtitan")),
        (TITAN, titan_checkpointer),
    ],
    "transformers": [
        (WEIGHTPORT + " (no mapping)", weightport_load("transformers")),
        (DCP_HF, dcp_hf_reader("transformers")),
        (BROADCAST, broadcast_from_rank0("transformers")),
    ],
}
TARGETS = tuple(CASES)
TARGET_NAMES = {"torchtitan": "torchtitan Llama3Model (fused wqkv)", "transformers": "transformers LlamaForCausalLM"}


# -- measuring one rank ----------------------------------------------------------------------------


def counters() -> dict[str, int]:
    """This process's read and memory counters: ``/proc/self/io``, ``getrusage`` and ``/proc/self/status``."""
    with open("/proc/self/io") as f:
        io = {k: int(v) for k, v in (line.split(": ") for line in f)}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rchar": io["rchar"], "read_bytes": io["read_bytes"], "majflt": usage.ru_majflt, "minflt": usage.ru_minflt,
        "rss_kib": _status_kib("VmRSS"),
    }  # fmt: skip


class FilePages(threading.Thread):
    """Samples the process's file-backed resident memory (``RssFile``) every 5 ms and keeps its peak:
    the pages of a mapped file a reader touched (a lower bound: a mapping may come and go between samples)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base = self.peak = _status_kib("RssFile")
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, _status_kib("RssFile"))

    def stop(self) -> int:  # the peak growth in KiB
        self.done.set()
        self.join()
        return max(self.peak, _status_kib("RssFile")) - self.base


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a parameter (a DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t  # type: ignore[no-any-return]


def digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1)
    return hashlib.sha1(memoryview(data.view(torch.uint8).numpy())).hexdigest()  # type: ignore[attr-defined]


def preload(target: str) -> None:
    """Import what the cases use before the baseline is taken."""
    import safetensors.torch  # noqa: F401
    import torch.distributed.checkpoint
    import torch.distributed.checkpoint.state_dict  # noqa: F401

    import weightport  # noqa: F401

    if target == "torchtitan":
        import torchtitan.components.checkpointer
        import torchtitan.models.llama3.state_dict_adapter  # noqa: F401
    else:
        import transformers  # noqa: F401


def measure_rank(target: str, case: str, path: str, size: str) -> dict[str, Any]:
    """Build, shard, then the timed part (load and one pass over the local shards); then the digests."""
    import torch.distributed as dist

    load = dict(CASES[target])[case]
    preload(target)
    model, config = build(target, SIZES[size], ours=case.startswith("weightport"))
    gc.collect()
    before = counters()
    resettable = _reset_peak()
    pages = FilePages()
    dist.barrier()
    pages.start()
    cpu0, start = time.process_time(), time.perf_counter()
    model = load(path, SIZES[size], model, config)
    one_pass([local(p.detach()) for p in model.parameters()])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    after = counters()
    file_kib = pages.stop()
    out: dict[str, Any] = {key: after[key] - before[key] for key in before if key != "rss_kib"}
    peak = _status_kib("VmHWM") if resettable else after["rss_kib"]
    out.update(
        wall_s=wall,
        cpu_s=cpu,
        file_peak_kib=file_kib,
        peak_over_mib=(peak - before["rss_kib"]) / 1024,
        peak_reset=resettable,
    )
    out["reported_bytes"] = list(REPORTED)
    out["digests"] = {name: digest(local(p)) for name, p in model.named_parameters()}
    dist.barrier()
    return out


def _rank_entry(rank: int, target: str, case: str, path: str, size: str, port: int, folder: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), TQDM_DISABLE="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(_get_pg_default_device|Multiple backends are registered)")  # DCP's
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = measure_rank(target, case, path, size)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def run_case(target: str, case: str, path: str, size: str, timeout: float = 600) -> list[dict[str, Any]]:
    """One case on ``WORLD`` freshly spawned processes; a result per rank. Every process is ended,
    on success, failure or timeout alike."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="wp-bench-ranks-") as folder:
        ctx = mp.start_processes(
            _rank_entry, args=(target, case, path, size, port, folder), nprocs=WORLD, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target} case {case!r} did not finish within {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
        results = []
        for rank in range(WORLD):
            with open(os.path.join(folder, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        return results


# -- the reference: a single-process load, cut into each rank's rows ---------------------------------


def reference(target: str, path: str, size: str) -> list[dict[str, str]]:
    """Digests of every rank's ``torch.chunk`` rows (FSDP2's Shard(0)) of each parameter, from one
    process loading the whole file with the target's own converter."""
    if target == "torchtitan":
        model = llm.torchtitan_in_memory(path, SIZES[size])
    else:
        import transformers
        from safetensors.torch import load_file

        with llm.built(False):
            model = transformers.LlamaForCausalLM(hf_config(SIZES[size]))
        model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True, assign=True)
    rows = {name: _rows(p.detach()) for name, p in model.named_parameters()}
    return [{name: digest(r[rank]) for name, r in rows.items()} for rank in range(WORLD)]


def _rows(t: torch.Tensor) -> list[torch.Tensor]:
    chunks = list(torch.chunk(t, WORLD, dim=0))
    return chunks + [t[t.shape[0] :]] * (WORLD - len(chunks))  # ranks past the last chunk hold no rows


def check(target: str, per_case: dict[str, list[dict[str, Any]]], expected: list[dict[str, str]]) -> int:
    """Every case's local shards equal the reference's rows, bit for bit, on every rank; returns the
    number of parameters compared per rank."""
    for case, ranks in per_case.items():
        for rank, result in enumerate(ranks):
            got = result["digests"]
            if got.keys() != expected[rank].keys():
                raise AssertionError(
                    f"{case}: rank {rank}'s parameters differ: {sorted(got.keys() ^ expected[rank].keys())[:5]}"
                )
            wrong = [name for name, value in got.items() if value != expected[rank][name]]
            if wrong:
                raise AssertionError(f"{case}: rank {rank}'s local shards differ from the reference's: {wrong[:5]}")
    return len(expected[0])


# -- running: run.py calls run_all -------------------------------------------------------------------


def chosen_cases(target: str, only: str = "") -> list[str]:
    """The cases of ``target`` whose name holds ``only``, and weightport's."""
    return [n for n, _ in CASES[target] if not only or only in n or n.startswith("weightport")]


def run_all(
    work: str,
    runs: int,
    only: str = "",
    size: str = "125m",
    targets: tuple[str, ...] = TARGETS,
    say: Callable[[str], None] = print,
) -> str:
    """Measure the cases of ``targets`` ``runs`` times each (each on freshly spawned ranks, round robin),
    check every rank's local shards against the reference; return the Markdown tables, one per target."""
    path = prepare(work, size)
    nbytes = os.path.getsize(os.path.join(path, "model.safetensors"))
    out = []
    for target in targets:
        if importlib.util.find_spec(target) is None:
            out.append(f"({target} is not installed: its cases are skipped.)")
            continue
        cases = chosen_cases(target, only)
        results: dict[str, list[list[dict[str, Any]]]] = {case: [] for case in cases}
        for run in range(runs):  # round robin: a change in the machine's load falls on every case alike
            for case in cases:
                ranks = run_case(target, case, path, size)
                results[case].append(ranks)
                walls = " ".join(f"{r['wall_s']:6.3f}" for r in ranks)
                peaks = " ".join(f"{r['peak_over_mib']:5.0f}" for r in ranks)
                say(f"dist  run {run + 1} {target:12s} {case:90s} {walls} s {peaks} MiB")
        tensors = check(target, {c: rs for c, runs_ in results.items() for rs in runs_}, reference(target, path, size))
        say(f"dist  {target}: every rank's local shards equal a single-process load's rows ({tensors} parameters)")
        out.append(table(target, results, nbytes, SIZES[size].parameters(), tensors))
    return "\n\n".join(out)


def _per_rank(runs: list[list[dict[str, Any]]], key: str, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(statistics.median(r[rank][key] for r in runs) * scale) for rank in range(WORLD))


def table(target: str, results: dict[str, list[list[dict[str, Any]]]], nbytes: int, params: int, tensors: int) -> str:
    """One target's cases side by side; the first, weightport's, is the reference for time."""
    slowest = {case: [max(r["wall_s"] for r in ranks) for ranks in runs] for case, runs in results.items()}
    ref = statistics.median(next(iter(slowest.values())))
    mib = 1 / 2**20
    lines = [
        f"### Hugging Face Llama ({params / 1e6:,.1f}M parameters, bf16, {nbytes * mib:,.0f} MiB) -> "
        f"{TARGET_NAMES[target]}, FSDP2 on {WORLD} ranks (CPU, gloo)",
        "",
        f"Every case's local shards equal, bit for bit, on every rank, each other and the rows of a single-process "
        f"load ({tensors} parameters per rank; checked in every run). Per-rank columns read rank 0 / rank 1.",
        "",
        "| case | wall s, slowest rank (median) | min–max s | time vs weightport | CPU s | read() MiB "
        "| file pages mapped, peak MiB | minor faults (k) | peak RSS over baseline MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, runs in results.items():
        wall = statistics.median(slowest[case])
        lines.append(
            f"| {case} | {wall:.3f} | {min(slowest[case]):.3f}–{max(slowest[case]):.3f} | {wall / ref:.2f}× "
            f"| {_per_rank(runs, 'cpu_s', fmt='{:.2f}')} | {_per_rank(runs, 'rchar', mib, '{:.1f}')} "
            f"| {_per_rank(runs, 'file_peak_kib', 1 / 1024, '{:.1f}')} | {_per_rank(runs, 'minflt', 1e-3, '{:.1f}')} "
            f"| {_per_rank(runs, 'peak_over_mib')} |"
        )
    for runs in results.values():
        reported = next((r["reported_bytes"] for r in runs[0] if r.get("reported_bytes")), None)
        if reported:
            each = " / ".join(f"{n * mib:.1f}" for n in reported)
            lines += ["", f"weightport's report, source bytes read per rank: {each} MiB (of {nbytes * mib:.1f} MiB)."]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    target, case, work, *rest = argv
    size = rest[0] if rest else "125m"
    path = prepare(work, size)
    for rank, result in enumerate(run_case(target, case, path, size)):
        result.pop("digests")
        print(json.dumps({"rank": rank, **result}))


if __name__ == "__main__":
    main(sys.argv[1:])
