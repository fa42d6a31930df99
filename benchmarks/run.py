"""Side-by-side loading benchmark: ``python benchmarks/run.py``.

Generates its checkpoints once into ``benchmarks/_work/`` (random weights, no
downloads): torchvision ``vit_l_16`` (1.2 GB, as ``.safetensors`` and ``.pth``), a
BERT-base-sized Hugging Face folder, and a 100k-key file for the planning case.
Then runs every case in its own fresh process, ``--runs`` times (median reported),
with the files warm in the page cache, and prints a Markdown table of wall time and
peak RSS (absolute and over the interpreter baseline after imports).

``--models llm`` (not in the default set) ports a 0.5B-parameter Llama checkpoint into litgpt
and torchtitan models beside each project's own converter (``benchmarks/llm.py``).
``--models distributed`` (not in the default set) loads a 125M-parameter Llama checkpoint into
2-rank FSDP2 models (CPU, gloo) beside DCP, ``set_model_state_dict`` and torchtitan's own load,
per rank (``benchmarks/distributed.py``).

Options: ``--runs N`` (default 3), ``--models vit,bert,plan,llm,distributed``, ``--only SUBSTRING``,
``--work DIR``, ``--llm-size 0.5b|toy``, ``--llm-targets litgpt,torchtitan``,
``--dist-size 125m|toy``, ``--dist-targets torchtitan,transformers``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import distributed  # noqa: E402
import llm  # noqa: E402
from cases import CASES, PLAN_EXPERTS, PLAN_LAYERS, PLAN_PROJ  # noqa: E402


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- files --------------------------------------------------------------------------------------


def prepare(work: str, models: list[str]) -> None:
    """Write the checkpoints the cases read (once; kept between runs)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(work, exist_ok=True)
    torch.manual_seed(0)
    if "vit" in models and not os.path.exists(os.path.join(work, "vit_l_16.pth")):
        import torchvision

        _say("generating vit_l_16 checkpoint (random weights) ...")
        state = {k: v.contiguous() for k, v in torchvision.models.vit_l_16().state_dict().items()}
        save_file(state, os.path.join(work, "vit_l_16.safetensors"))
        torch.save(state, os.path.join(work, "vit_l_16.pth"))
    if "bert" in models and not os.path.exists(os.path.join(work, "bert.pth")):
        import transformers

        _say("generating a BERT-base-sized Hugging Face folder (random weights) ...")
        model = transformers.BertModel(transformers.BertConfig())
        model.save_pretrained(os.path.join(work, "bert"))
        torch.save(model.state_dict(), os.path.join(work, "bert.pth"))
    if "plan" in models and not os.path.exists(os.path.join(work, "plan_100k.safetensors")):
        _say("generating the 100k-key planning file ...")
        keys = {
            f"model.layers.{i}.mlp.experts.{e}.proj_{p}.weight": torch.zeros(4)
            for i in range(PLAN_LAYERS)
            for e in range(PLAN_EXPERTS)
            for p in range(PLAN_PROJ)
        }
        save_file(keys, os.path.join(work, "plan_100k.safetensors"))


def warm(work: str) -> None:
    """Read every file once so all cases start from the page cache."""
    for folder, _, files in os.walk(work):
        for name in files:
            with open(os.path.join(folder, name), "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


# -- running ------------------------------------------------------------------------------------


def run_case(model: str, name: str, work: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=ROOT, TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "cases.py"), model, name, work],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {model}/{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_of(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def file_size(work: str, model: str) -> int:
    path = {
        "vit": os.path.join(work, "vit_l_16.safetensors"),
        "bert": os.path.join(work, "bert", "model.safetensors"),
        "plan": os.path.join(work, "plan_100k.safetensors"),
    }[model]
    return os.path.getsize(path)


def table(model: str, rows: list[tuple[str, list[dict[str, float]]]], size: int) -> str:
    floor = next((median_of(r, "wall_s") for n, r in rows if n.startswith("floor")), None)
    recipe = next((median_of(r, "wall_s") for n, r in rows if n.startswith("recipe")), None)
    lines = [
        f"### {model} (checkpoint {size / 2**20:.0f} MiB)",
        "",
        "| case | wall s (median) | min–max s | CPU s | vs recipe | vs floor | peak RSS MiB | over baseline MiB | "
        "over / checkpoint |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in rows:
        wall = median_of(results, "wall_s")
        walls = [r["wall_s"] for r in results]
        peak = median_of(results, "peak_mib")
        over = statistics.median(r["peak_mib"] - r["baseline_mib"] for r in results)
        vs_recipe = f"{recipe / wall:.1f}× faster" if recipe and wall else "–"
        vs_floor = f"{wall / floor:.2f}×" if floor else "–"
        cpu = median_of(results, "cpu_s")
        lines.append(
            f"| {name} | {wall:.3f} | {min(walls):.3f}–{max(walls):.3f} | {cpu:.2f} | {vs_recipe} | {vs_floor} | "
            f"{peak:.0f} | {over:.0f} | {over * 2**20 / size:.2f} |"
        )
    return "\n".join(lines)


def plan_table(rows: list[tuple[str, list[dict[str, float]]]]) -> str:
    """weightport's parts (its case comes first), then every case end to end, side by side."""
    keys = PLAN_LAYERS * PLAN_EXPERTS * PLAN_PROJ
    lines = [f"### planning: {keys} source keys x {keys} target keys, 200 rules", ""]
    name, results = rows[0]
    if "plan_s" in results[0]:
        for r in results:
            r["both_s"] = r["open_s"] + r["plan_s"]
        parts = [
            ("open the 100k-key safetensors header", "open_s"),
            ("weightport.plan (route, match, shapes, report)", "plan_s"),
            ("open + plan", "both_s"),
            ("apply the plan (100k tensors of 4 floats each: per-tensor overhead)", "apply_s"),
            ("one pass over the loaded tensors (every case ends with one)", "pass_s"),
            ("open + plan + apply + pass", "all_s"),
        ]
        lines += [
            f"{name}:",
            "",
            "| part | median s | min–max s |",
            "|---|---:|---:|",
            *(
                f"| {label} | {median_of(results, k):.3f} | {min(r[k] for r in results):.3f}–"
                f"{max(r[k] for r in results):.3f} |"
                for label, k in parts
            ),
            "",
        ]
    ours = next((median_of(r, "all_s") for n, r in rows if n.startswith("weightport")), None)
    lines += [
        "End to end (opening or reading the file, renaming, loading into the meta-built model, one pass over "
        "the loaded tensors; building the model is outside the timed part, not outside the peak RSS):",
        "",
        "| case | median s | min–max s | vs weightport | peak RSS over baseline MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, results in rows:
        wall = median_of(results, "all_s")
        over = statistics.median(r["peak_mib"] - r["baseline_mib"] for r in results)
        lines.append(
            f"| {name} | {wall:.3f} | {min(r['all_s'] for r in results):.3f}–{max(r['all_s'] for r in results):.3f} "
            f"| {f'{wall / ours:.2f}×' if ours else '–'} | {over:.0f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="vit,bert,plan")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--work", default=os.path.join(HERE, "_work"))
    parser.add_argument("--llm-size", default="0.5b", choices=sorted(llm.SIZES))
    parser.add_argument("--llm-targets", default=",".join(llm.TARGETS), help="of " + ",".join(llm.TARGETS))
    parser.add_argument("--dist-size", default="125m", choices=sorted(distributed.SIZES))
    parser.add_argument(
        "--dist-targets", default=",".join(distributed.TARGETS), help="of " + ",".join(distributed.TARGETS)
    )
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    prepare(args.work, models)
    if "llm" in models:
        llm.prepare(args.work, args.llm_size)
    if "distributed" in models:
        distributed.prepare(args.work, args.dist_size)
    warm(args.work)
    out = [
        f"Machine: {machine()}",
        f"Runs per case: {args.runs} (median), each in a fresh process",
        f"Load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
    ]
    started = time.perf_counter()
    for model in models:
        if model == "llm":
            targets = tuple(t for t in args.llm_targets.split(",") if t)
            out += [llm.run_all(args.work, args.runs, args.only, args.llm_size, targets, _say), ""]
            continue
        if model == "distributed":
            targets = tuple(t for t in args.dist_targets.split(",") if t)
            out += [distributed.run_all(args.work, args.runs, args.only, args.dist_size, targets, _say), ""]
            continue
        rows = []
        for name in CASES[model]:
            if args.only and args.only not in name and not name.startswith("floor"):
                continue
            results = []
            for _ in range(args.runs):
                results.append(run_case(model, name, args.work))
            _say(
                f"{model:5s} {name:66s} {median_of(results, 'wall_s'):7.3f} s {median_of(results, 'peak_mib'):7.0f} MiB"
            )
            rows.append((name, results))
        if not rows:  # --only left no case of this model
            continue
        out.append(plan_table(rows) if model == "plan" else table(model, rows, file_size(args.work, model)))
        out.append("")
    out.append(f"Load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    out.append(f"Total benchmark time: {time.perf_counter() - started:.0f} s")
    print("\n".join(out))


if __name__ == "__main__":
    main()
