"""Benchmark cases, one per process: ``python benchmarks/cases.py MODEL CASE WORKDIR``.

Each case imports what it needs first, then the measured section runs: build the
target, load the weights, and one pass over every loaded tensor (so lazy loaders pay
for their reads). The process prints one JSON line: wall seconds, peak RSS during the
measured section, and the RSS it started from (the interpreter baseline with imports).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_num_threads(os.cpu_count() or 1)

Case = Callable[[str], Any]
CASES: dict[str, dict[str, Case]] = {"vit": {}, "bert": {}, "plan": {}}

VIT_CLASSES = 10  # the port: a new 10-class head on the 1000-class checkpoint


def case(model: str, name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[model][name] = fn
        return fn

    return register


# -- measurement --------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) on Linux
        return True
    except OSError:
        return False


def one_pass(tensors: Any) -> float:
    """Touch every value once (a sum), so data that was only mapped gets read."""
    total = 0.0
    for t in tensors:
        if t.is_floating_point():
            total += float(t.sum())
        elif t.numel():
            total += float(t.view(-1)[0])
    return total


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]


def measure(fn: Case, work: str) -> dict[str, float]:
    gc.collect()
    baseline = _status_kib("VmRSS")
    resettable = _reset_peak()
    cpu0 = time.process_time()
    start = time.perf_counter()
    result = fn(work)
    if isinstance(result, torch.nn.Module):
        one_pass(model_tensors(result))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    peak = _status_kib("VmHWM")
    out = {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mib": peak / 1024,
        "baseline_mib": baseline / 1024,
        "peak_reset": resettable,
    }
    if isinstance(result, dict):
        out.update(result)  # a case that times parts of its section (planning)
    return out


# -- shared helpers -----------------------------------------------------------------------------


def _filtered(model: torch.nn.Module, loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The recipe's filtering: keep what exists in the model with the same shape."""
    own = model.state_dict()
    return {k: v for k, v in loaded.items() if k in own and own[k].shape == v.shape}


def _vit(meta: bool = False, classes: int = VIT_CLASSES) -> torch.nn.Module:
    import torchvision

    if not meta:
        return torchvision.models.vit_l_16(num_classes=classes)
    import weightport

    with weightport.init_empty():
        return torchvision.models.vit_l_16(num_classes=classes)


def _bert(work: str, meta: bool = False) -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig.from_pretrained(os.path.join(work, "bert"))
    if not meta:
        return transformers.BertModel(config)
    import weightport

    with weightport.init_empty():
        return transformers.BertModel(config)


def _paths(work: str, model: str) -> tuple[str, str]:
    """(safetensors file, torch pickle file) of a model."""
    if model == "bert":
        return os.path.join(work, "bert", "model.safetensors"), os.path.join(work, "bert.pth")
    return os.path.join(work, "vit_l_16.safetensors"), os.path.join(work, "vit_l_16.pth")


def _build(model: str, work: str, meta: bool = False) -> torch.nn.Module:
    return _bert(work, meta) if model == "bert" else _vit(meta)


# -- cases shared by both models ----------------------------------------------------------------


def _floor(model: str) -> Case:
    def run(work: str) -> Any:
        path = _paths(work, model)[0]
        size = os.path.getsize(path)
        buf = torch.empty(size, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(buf.numpy()))  # type: ignore[attr-defined]
        one_pass([buf[: size - size % 4].view(torch.float32)])
        return None

    return run


def _recipe(model: str) -> Case:
    def run(work: str) -> Any:
        net = _build(model, work)
        loaded = torch.load(_paths(work, model)[1], map_location="cpu", weights_only=True)
        state = net.state_dict()
        state.update(_filtered(net, loaded))
        net.load_state_dict(state)
        return net

    return run


def _safetensors(model: str) -> Case:
    def run(work: str) -> Any:
        from safetensors.torch import load_file

        net = _build(model, work)
        net.load_state_dict(_filtered(net, load_file(_paths(work, model)[0])), strict=False)
        return net

    return run


def _load_model(model: str) -> Case:
    def run(work: str) -> Any:
        from safetensors.torch import load_model

        # load_model cannot skip a shape mismatch either: the vit target keeps the checkpoint's head
        net = _bert(work) if model == "bert" else _vit(classes=1000)
        load_model(net, _paths(work, model)[0], strict=False)
        return net

    return run


def _timm(model: str) -> Case:
    def run(work: str) -> Any:
        from timm.models import load_checkpoint

        net = _build(model, work)
        load_checkpoint(net, _paths(work, model)[1], strict=False, filter_fn=lambda sd, m: _filtered(m, sd))
        return net

    return run


def _accelerate(model: str) -> Case:
    def run(work: str) -> Any:
        from accelerate import init_empty_weights
        from accelerate.utils import load_checkpoint_in_model

        with init_empty_weights():
            # accelerate cannot skip a shape mismatch: the target keeps the checkpoint's head
            net = _bert(work) if model == "bert" else _vit(classes=1000)
        load_checkpoint_in_model(net, _paths(work, model)[0], device_map={"": "cpu"})
        return net

    return run


def _weightport(model: str, meta: bool, pickle_file: bool = False) -> Case:
    def run(work: str) -> Any:
        import weightport

        net = _build(model, work, meta=meta)
        weightport.transfer(_paths(work, model)[1 if pickle_file else 0], net, progress=False)
        return net

    return run


def _weightport_one_thread(model: str) -> Case:
    def run(work: str) -> Any:
        os.environ["WEIGHTPORT_READ_THREADS"] = "1"  # reads on the calling thread only
        return _weightport(model, meta=True)(work)

    return run


def _weightport_zero_copy(model: str) -> Case:
    def run(work: str) -> Any:
        import weightport

        net = _build(model, work, meta=True)
        weightport.transfer(_paths(work, model)[0], net, zero_copy=True, progress=False)
        return net

    return run


for _m in ("vit", "bert"):
    CASES[_m]["floor: read file from page cache"] = _floor(_m)
    CASES[_m]["recipe: build, torch.load, filter, update, load_state_dict"] = _recipe(_m)
    CASES[_m]["safetensors load_file + filter + load_state_dict"] = _safetensors(_m)
    CASES[_m]["safetensors.torch.load_model (built model, checkpoint's own head)"] = _load_model(_m)
    CASES[_m]["timm load_checkpoint (.pth, filter_fn)"] = _timm(_m)
    CASES[_m]["accelerate init_empty_weights + load_checkpoint_in_model"] = _accelerate(_m)
    CASES[_m]["weightport, built model"] = _weightport(_m, meta=False)
    CASES[_m]["weightport, meta-built model (init_empty)"] = _weightport(_m, meta=True)
CASES["vit"]["weightport, meta-built, from the .pth"] = _weightport("vit", meta=True, pickle_file=True)
CASES["vit"]["weightport, meta-built, zero_copy=True"] = _weightport_zero_copy("vit")
CASES["vit"]["weightport, meta-built, reads on 1 thread"] = _weightport_one_thread("vit")


@case("bert", "transformers from_pretrained")
def _hf(work: str) -> Any:
    import transformers

    return transformers.BertModel.from_pretrained(os.path.join(work, "bert"))


# -- planning at scale --------------------------------------------------------------------------

PLAN_LAYERS = 100
PLAN_EXPERTS = 125
PLAN_PROJ = 8  # 100 * 125 * 8 = 100k keys
PLAN_RULES = 200


def plan_rules() -> list[Any]:
    """200 rules: 8 that carry the traffic, the rest realistic distractors."""
    import weightport as wp

    rules: list[Any] = [wp.strip_prefix("_orig_mod.")]
    for p in range(PLAN_PROJ):
        rules.append(wp.rename(f"model.layers.{{i}}.mlp.experts.{{e}}.proj_{p}.weight", f"blocks.{{i}}.moe.{{e}}.w{p}"))
    k = 0
    while len(rules) < PLAN_RULES - 4:
        rules.append(wp.rename(f"model.layers.{{i}}.attn.head_{k}.{{p}}", f"blocks.{{i}}.attention.h{k}.{{p}}"))
        k += 1
    rules += [wp.drop("**.rotary_emb.inv_freq"), wp.drop("lm_head.*"), wp.strip_prefix("model.")]
    rules.append(wp.rename("encoder.{rest*}", "enc.{rest}"))
    return rules


class _Expert(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for p in range(PLAN_PROJ):
            self.register_parameter(f"w{p}", torch.nn.Parameter(torch.empty(4, device="meta")))


def plan_model() -> torch.nn.Module:
    blocks = torch.nn.ModuleList()
    for _ in range(PLAN_LAYERS):
        block = torch.nn.Module()
        block.moe = torch.nn.ModuleList(_Expert() for _ in range(PLAN_EXPERTS))
        blocks.append(block)
    root = torch.nn.Module()
    root.blocks = blocks
    return root


@case("plan", "weightport.plan: 100k source x 100k target keys, 200 rules")
def _plan(work: str) -> Any:
    import weightport as wp

    model = plan_model()  # building 100k meta parameters is not planning: outside the timed part
    rules = plan_rules()
    start = time.perf_counter()
    source = wp.open_source(os.path.join(work, "plan_100k.safetensors"))
    opened = time.perf_counter()
    planned = wp.plan(source, model, rules=rules, strict=True)
    done = time.perf_counter()
    assert len(planned.recipes) == PLAN_LAYERS * PLAN_EXPERTS * PLAN_PROJ
    planned.apply()
    applied = time.perf_counter()
    one_pass(model_tensors(model))  # the rule for every case (here nothing is lazy: it costs both the same)
    end = time.perf_counter()
    return {
        "open_s": opened - start,
        "plan_s": done - opened,
        "apply_s": applied - done,
        "pass_s": end - applied,
        "all_s": end - start,
    }


@case("plan", "safetensors load_file + rename by regex + load_state_dict(assign=True)")
def _plan_by_hand(work: str) -> Any:
    import re

    from safetensors.torch import load_file

    model = plan_model()
    # the 8 rules that carry the traffic, written by hand as one regex
    pattern = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.proj_(\d+)\.weight")
    start = time.perf_counter()
    state = load_file(os.path.join(work, "plan_100k.safetensors"))
    renamed = {pattern.sub(r"blocks.\1.moe.\2.w\3", k): v for k, v in state.items()}
    model.load_state_dict(renamed, strict=True, assign=True)
    one_pass(model_tensors(model))  # load_file's tensors are mapped: the pass pays for their reads
    return {"all_s": time.perf_counter() - start}


def preload(model: str, name: str) -> None:
    """Import what the case uses before measuring, so no case pays for imports inside its
    measurement (the baseline RSS is taken after them)."""
    import safetensors.torch  # noqa: F401

    import weightport  # noqa: F401

    if model == "vit":
        import torchvision  # noqa: F401
    if model == "bert":
        from transformers import BertConfig, BertModel  # noqa: F401
    if "timm" in name:
        import timm.models  # noqa: F401
    if "accelerate" in name:
        import accelerate.utils  # noqa: F401


def main(argv: list[str]) -> None:
    model, name, work = argv
    preload(model, name)
    print(json.dumps(measure(CASES[model][name], work)))


if __name__ == "__main__":
    main(sys.argv[1:])
