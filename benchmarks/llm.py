"""LLM porting benchmark: a Llama-layout Hugging Face checkpoint into litgpt and torchtitan models.

``python benchmarks/run.py --models llm`` runs it; ``python benchmarks/llm.py TARGET CASE WORKDIR [SIZE]``
runs one case in this process and prints one JSON line (what ``run.py`` calls, once per process).

The checkpoint (about 0.5B parameters in bf16, random values, written tensor by tensor so writing it
needs one tensor's memory) is a Hugging Face folder: ``config.json`` and ``model.safetensors``.
Each case ports it into a model of the target codebase, in bf16, the way that codebase does it,
then makes one pass over the loaded tensors. ``check`` (run once per benchmark, outside the
timings) ports it with every case and compares each state dict with weightport's, bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cases import measure, one_pass  # noqa: E402


class Size(NamedTuple):
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Every tensor of the Hugging Face Llama checkpoint, in the order transformers lists them."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "mlp.gate_proj.weight", (self.ffn, h)
            yield p + "mlp.up_proj.weight", (self.ffn, h)
            yield p + "mlp.down_proj.weight", (h, self.ffn)
            yield p + "input_layernorm.weight", (h,)
            yield p + "post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    def parameters(self) -> int:
        return sum(torch.Size(s).numel() for _, s in self.shapes())


# hidden 1024, 28 layers, GQA 16 query / 8 kv heads of 64, SwiGLU 4096, vocabulary 32000: 0.506B
SIZES = {
    "0.5b": Size(hidden=1024, layers=28, heads=16, kv_heads=8, ffn=4096, vocab=32000),
    "toy": Size(hidden=64, layers=2, heads=4, kv_heads=2, ffn=112, vocab=96),
}
DTYPE = torch.bfloat16


def folder(work: str, size: str) -> str:
    return os.path.join(work, f"llama-{size}")


# -- the checkpoint -----------------------------------------------------------------------------


def write_checkpoint(path: str, size: Size, seed: int = 0) -> None:
    """A Hugging Face Llama folder of random bf16 weights (norms near 1), written one tensor at a
    time: the safetensors header first (offsets follow from the shapes), then each tensor's bytes."""
    os.makedirs(path, exist_ok=True)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in size.shapes():
        nbytes = torch.Size(shape).numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = os.path.join(path, "model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in size.shapes():
            values = torch.randn(shape, generator=g)
            values = 1 + 0.1 * values if name.endswith("norm.weight") else 0.02 * values
            f.write(memoryview(values.to(DTYPE).view(torch.uint8).numpy()))  # type: ignore[attr-defined]
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": size.hidden, "intermediate_size": size.ffn, "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads, "num_key_value_heads": size.kv_heads, "head_dim": size.head_dim,
        "vocab_size": size.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu",
    }  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def prepare(work: str, size: str = "0.5b") -> str:
    """Write the checkpoint once (kept between runs); return its folder."""
    path = folder(work, size)
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        print(f"generating a {SIZES[size].parameters() / 1e9:.2f}B-parameter Llama folder (bf16) ...", file=sys.stderr)
        write_checkpoint(path, SIZES[size])
    return path


# -- the targets --------------------------------------------------------------------------------


def lit_settings(size: Size) -> dict[str, Any]:
    """litgpt ``Config`` arguments of ``size``."""
    return dict(
        name="bench-llama", block_size=2048, vocab_size=size.vocab, padded_vocab_size=size.vocab,
        n_layer=size.layers, n_head=size.heads, n_query_groups=size.kv_heads, n_embd=size.hidden,
        head_size=size.head_dim, rotary_percentage=1.0, parallel_residual=False, bias=False,
        norm_class_name="RMSNorm", norm_eps=1e-5, mlp_class_name="LLaMAMLP", intermediate_size=size.ffn,
    )  # fmt: skip


def lit_config(size: Size) -> Any:
    from litgpt.config import Config

    return Config(**lit_settings(size))


@contextlib.contextmanager
def built(ours: bool) -> Iterator[None]:
    """Build on the meta device in bf16: weightport's way (``init_empty``: buffers stay real) or
    ``torch.device("meta")``."""
    import weightport as wp

    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with wp.init_empty() if ours else torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(old)


def lit_meta(size: Size, ours: bool = False) -> torch.nn.Module:
    """litgpt's ``GPT`` on the meta device, in bf16."""
    from litgpt.model import GPT

    with built(ours):
        return GPT(lit_config(size))


def titan_config(size: Size) -> Any:
    """A torchtitan Llama 3 config of ``size`` (fused ``wqkv``, as all of torchtitan's Llama 3 configs)."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import (
        _EMBEDDING_INIT,
        _NORM_INIT,
        Llama3Model,
        _build_llama3_layers,
        _output_linear_init,
    )

    h = size.hidden
    return Llama3Model.Config(
        dim=h,
        vocab_size=size.vocab,
        tok_embeddings=Embedding.Config(num_embeddings=size.vocab, embedding_dim=h, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=h, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=h, out_features=size.vocab, param_init=_output_linear_init(h)),
        layers=_build_llama3_layers(
            fuse_qkv=True,
            n_layers=size.layers,
            dim=h,
            n_heads=size.heads,
            n_kv_heads=size.kv_heads,
            hidden_dim=size.ffn,
            rope=ComplexRoPE.Config(dim=size.head_dim, max_seq_len=2048, theta=10000.0),
            attn_backend="flex",
        ),
    )


def titan_meta(size: Size, ours: bool = False) -> tuple[torch.nn.Module, Any]:
    """torchtitan's Llama 3 model on the meta device, in bf16, and its config."""
    config = titan_config(size)
    with built(ours):
        return config.build(), config


# -- weightport's side --------------------------------------------------------------------------

LIT_MAPPING = "hf.llama->litgpt.llama"
TITAN_MAPPING = "hf.llama->torchtitan.llama"


def _shipped(name: str) -> bool:
    import weightport as wp

    return name in wp.list_mappings()


_LAYER = "model.layers.{i}."
# the Hugging Face names each codebase renames plainly: (HF name, litgpt name, torchtitan name)
_RENAMES = [
    ("model.embed_tokens.weight", "transformer.wte.weight", "tok_embeddings.weight"),
    (_LAYER + "self_attn.o_proj.weight", "transformer.h.{i}.attn.proj.weight", "layers.{i}.attention.wo.weight"),
    (_LAYER + "mlp.gate_proj.weight", "transformer.h.{i}.mlp.fc_1.weight", "layers.{i}.feed_forward.w1.weight"),
    (_LAYER + "mlp.up_proj.weight", "transformer.h.{i}.mlp.fc_2.weight", "layers.{i}.feed_forward.w3.weight"),
    (_LAYER + "mlp.down_proj.weight", "transformer.h.{i}.mlp.proj.weight", "layers.{i}.feed_forward.w2.weight"),
    (_LAYER + "input_layernorm.weight", "transformer.h.{i}.norm_1.weight", "layers.{i}.attention_norm.weight"),
    (_LAYER + "post_attention_layernorm.weight", "transformer.h.{i}.norm_2.weight", "layers.{i}.ffn_norm.weight"),
    ("model.norm.weight", "transformer.ln_f.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight", "lm_head.weight"),
]


def lit_rules() -> list[Any]:
    """The Hugging Face -> litgpt rules (what the shipped mapping says, for a checkout without it):
    renames, and q, k, v fused into ``attn.qkv`` one after the other."""
    import weightport as wp

    qkv = [_LAYER + f"self_attn.{x}_proj.weight" for x in "qkv"]
    return [wp.rename(hf, lit) for hf, lit, _ in _RENAMES] + [wp.fuse(qkv, "transformer.h.{i}.attn.qkv.weight")]


def titan_rules() -> list[Any]:
    """The Hugging Face -> torchtitan rules (what the shipped mapping says, for a checkout without it):
    renames, q and k to the interleaved rotary layout, all three to the names torchtitan's
    ``FusedQKVLinear`` loads through its state-dict hook into its fused ``wqkv``."""
    import weightport as wp

    attn = "layers.{i}.attention.qkv_linear.w"
    rope = {"q": "$heads", "k": "$kv_heads"}
    return [wp.rename(hf, titan) for hf, _, titan in _RENAMES] + [
        wp.rename(
            _LAYER + f"self_attn.{x}_proj.weight",
            f"{attn}{x}.weight",
            ops=[("rope_permute", {"heads": rope[x], "to": "interleaved"})] if x in rope else None,
        )
        for x in "qkv"
    ]


def how(mapping: str, rules: Callable[[], list[Any]]) -> dict[str, Any]:
    """``mapping=`` when the shipped mapping exists, else the equivalent inline ``rules=``."""
    return {"mapping": mapping} if _shipped(mapping) else {"rules": rules()}


def weightport_lit(path: str, size: Size, zero_copy: bool = False) -> torch.nn.Module:
    import weightport as wp

    model = lit_meta(size, ours=True)
    wp.transfer(path, model, strict=True, progress=False, zero_copy=zero_copy, **how(LIT_MAPPING, lit_rules))
    return model


def weightport_titan(path: str, size: Size, zero_copy: bool = False) -> torch.nn.Module:
    import weightport as wp

    model, _ = titan_meta(size, ours=True)
    wp.transfer(path, model, strict=True, progress=False, zero_copy=zero_copy, **how(TITAN_MAPPING, titan_rules))
    return model


# -- each project's own path --------------------------------------------------------------------


def litgpt_in_memory(path: str, size: Size) -> torch.nn.Module:
    """litgpt's converter over the Hugging Face state dict (``copy_weights_hf_llama``, what
    ``convert_hf_checkpoint`` calls per file), loaded by assignment into a meta-built ``GPT``."""
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama
    from safetensors.torch import load_file

    config = lit_config(size)
    state: dict[str, torch.Tensor] = {}
    copy_weights_hf_llama(config, {}, state, load_file(os.path.join(path, "model.safetensors")))
    model = lit_meta(size)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def litgpt_two_step(path: str, size: Size) -> torch.nn.Module:
    """litgpt's own two steps: ``convert_hf_checkpoint`` writes ``lit_model.pth``, then the model
    is built as litgpt builds it (``fabric.init_module(empty_init=True)``, bf16-true) and
    ``litgpt.utils.load_checkpoint`` loads it (``lazy_load`` + ``load_state_dict``)."""
    import io

    import lightning as L
    import litgpt.config
    from litgpt.model import GPT
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from litgpt.utils import load_checkpoint

    config = lit_config(size)
    litgpt.config.name_to_config[config.name] = lit_settings(size)  # a name convert_hf_checkpoint knows
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        convert_hf_checkpoint(checkpoint_dir=Path(lit_folder(path)), model_name=config.name)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    load_checkpoint(fabric, model, os.path.join(lit_folder(path), "lit_model.pth"))
    return model


def lit_folder(path: str) -> str:
    """litgpt writes its converted checkpoint beside the source: a folder that links to it."""
    out, link = path + "-litgpt", os.path.join(path + "-litgpt", "model.safetensors")
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(link):
        os.symlink(os.path.abspath(os.path.join(path, "model.safetensors")), link)
    return out


def torchtitan_in_memory(path: str, size: Size) -> torch.nn.Module:
    """torchtitan's converter over the Hugging Face state dict (``Llama3StateDictAdapter.from_hf``),
    loaded by assignment into a meta-built model (its state-dict hook fuses wq/wk/wv into wqkv)."""
    from safetensors.torch import load_file
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    model, config = titan_meta(size)
    state = Llama3StateDictAdapter(config, None).from_hf(load_file(os.path.join(path, "model.safetensors")))
    model.load_state_dict(state, strict=True, assign=True)
    return model


def torchtitan_checkpointer(path: str, size: Size) -> torch.nn.Module:
    """What torchtitan's checkpointer does with ``initial_load_in_hf`` (``dcp_load``): the model
    materialised by ``to_empty``; ``to_hf`` of its state dict; ``dcp.load`` through the adapter's
    ``HuggingFaceStorageReader`` into those tensors; ``from_hf``; ``load_state_dict``. (Its trainer
    also runs ``init_weights`` before loading; that is not counted here.)"""
    import torch.distributed.checkpoint as dcp
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    model, config = titan_meta(size)
    model.to_empty(device="cpu")
    adapter = Llama3StateDictAdapter(config, path)
    hf_state = adapter.to_hf(model.state_dict())
    dcp.load(hf_state, storage_reader=adapter.get_hf_storage_reader(path))
    model.load_state_dict(adapter.from_hf(hf_state), strict=True)
    return model


# -- cases ---------------------------------------------------------------------------------------

Port = Callable[[str, Size], torch.nn.Module]


def floor(path: str, size: Size) -> None:
    """Not a port: read the file into fresh memory on one thread (what owning copies cost at least)."""
    file = os.path.join(path, "model.safetensors")
    buf = torch.empty(os.path.getsize(file), dtype=torch.uint8)
    with open(file, "rb", buffering=0) as f:
        f.readinto(memoryview(buf.numpy()))  # type: ignore[attr-defined]
    one_pass([buf[: buf.numel() // 2 * 2].view(DTYPE)])


FLOOR = "floor: read the file into fresh memory (one thread)"
# (target, case name, port); each target's first case is weightport's, the one the others are compared to
CASES: list[tuple[str, str, Port]] = [
    ("litgpt", "weightport.transfer into an init_empty GPT", weightport_lit),
    ("litgpt", "weightport.transfer, zero_copy=True", functools.partial(weightport_lit, zero_copy=True)),
    ("litgpt", "litgpt copy_weights_hf_llama over load_file, load_state_dict(assign=True) into meta", litgpt_in_memory),
    ("litgpt", "litgpt convert_hf_checkpoint to lit_model.pth, then load_checkpoint (its own flow)", litgpt_two_step),
    ("torchtitan", "weightport.transfer into an init_empty Llama3Model", weightport_titan),
    ("torchtitan", "weightport.transfer, zero_copy=True", functools.partial(weightport_titan, zero_copy=True)),
    ("torchtitan", "torchtitan from_hf over load_file, load_state_dict(assign=True) into meta", torchtitan_in_memory),
    (
        "torchtitan",
        "torchtitan checkpointer: to_empty, to_hf, dcp.load (HF reader), from_hf, load_state_dict",
        torchtitan_checkpointer,
    ),
]
TARGETS = ("litgpt", "torchtitan")


def check(path: str, size: Size, targets: tuple[str, ...] = TARGETS) -> dict[str, int]:
    """Port with every case of each target; every state dict must equal weightport's, bit for bit
    (keys, dtypes, values). Returns the number of tensors compared per target."""
    out: dict[str, int] = {}
    for target in targets:
        (_, ours_fn), *others = [(n, fn) for t, n, fn in CASES if t == target]
        ours = ours_fn(path, size).state_dict()
        for name, other in others:
            theirs = other(path, size).state_dict()
            if ours.keys() != theirs.keys():
                raise AssertionError(f"{name}: keys differ: {sorted(ours.keys() ^ theirs.keys())[:5]}")
            for key, value in ours.items():
                if value.dtype != theirs[key].dtype or not torch.equal(value, theirs[key]):
                    raise AssertionError(f"{name}: {key} differs from weightport's")
            del theirs
        out[target] = len(ours)
    return out


def preload(target: str) -> None:
    """Import what the cases of ``target`` use before measuring (the baseline RSS is taken after)."""
    import safetensors.torch  # noqa: F401

    import weightport  # noqa: F401

    if target in ("litgpt", "check"):
        import lightning  # noqa: F401
        import litgpt.model
        import litgpt.scripts.convert_hf_checkpoint  # noqa: F401
    if target in ("torchtitan", "check"):
        import torch.distributed.checkpoint  # noqa: F401
        import torchtitan.models.llama3  # noqa: F401


# -- running: one process per measurement (run.py calls run_all) ----------------------------------


def _subprocess(name: str, target: str, work: str, size: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), target, name, work, size], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"llm case {name!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_all(
    work: str,
    runs: int,
    only: str = "",
    size: str = "0.5b",
    targets: tuple[str, ...] = TARGETS,
    say: Callable[[str], None] = print,
) -> str:
    """Measure the cases of ``targets`` ``runs`` times each (each in a fresh process, round robin)
    and check the state dicts once; return the Markdown tables, one per target."""
    path = prepare(work, size)
    checked = _subprocess("check", ",".join(targets), work, size)
    say(f"llm   state dicts equal, bit for bit: {checked['tensors']}")
    chosen = [(t, n) for t, n, _ in CASES if t in targets and (not only or only in n or n.startswith("weightport"))]
    cases = [("", FLOOR), *chosen]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {case: [] for case in cases}
    for run in range(runs):  # round robin: a change in the machine's load falls on every case alike
        for target, name in cases:
            result = _subprocess(name, target, work, size)
            results[target, name].append(result)
            say(f"llm   run {run + 1} {target:10s} {name:90s} {result['wall_s']:7.3f} s {result['peak_mib']:7.0f} MiB")
    nbytes = os.path.getsize(os.path.join(path, "model.safetensors"))
    params = SIZES[size].parameters()
    out = []
    for target in targets:
        rows = [(FLOOR, results["", FLOOR])]
        rows += [(n, results[t, n]) for t, n, _ in CASES if t == target and (t, n) in results]
        out.append(table(target, rows, nbytes, params, checked["tensors"][target]))
    return "\n\n".join(out)


def table(target: str, rows: list[tuple[str, list[dict[str, Any]]]], nbytes: int, params: int, tensors: int) -> str:
    """One target's cases side by side; ``rows[1]`` is weightport's default, the reference."""
    ref = statistics.median(r["wall_s"] for r in rows[1][1])
    lines = [
        f"### Hugging Face Llama ({params / 1e6:,.0f}M parameters, bf16, {nbytes / 2**20:,.0f} MiB) -> {target}",
        "",
        f"Every case's state dict equals weightport's, bit for bit ({tensors} tensors; checked once per run).",
        "",
        "| case | wall s (median) | min–max s | CPU s | time vs weightport | peak RSS MiB | over baseline MiB "
        "| over / checkpoint |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in rows:
        wall = statistics.median(r["wall_s"] for r in results)
        walls = [r["wall_s"] for r in results]
        cpu = statistics.median(r["cpu_s"] for r in results)
        peak = statistics.median(r["peak_mib"] for r in results)
        over = statistics.median(r["peak_mib"] - r["baseline_mib"] for r in results)
        lines.append(
            f"| {name} | {wall:.3f} | {min(walls):.3f}–{max(walls):.3f} | {cpu:.2f} | {wall / ref:.2f}× | {peak:.0f} "
            f"| {over:.0f} | {over * 2**20 / nbytes:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    target, name, work, *rest = argv
    size = rest[0] if rest else "0.5b"
    path = prepare(work, size)
    if name == "check":
        preload("check")
        start = time.perf_counter()
        checked = check(path, SIZES[size], tuple(target.split(",")))
        print(json.dumps({"tensors": checked, "wall_s": time.perf_counter() - start}))
        return
    if name == FLOOR:
        preload("floor")
        print(json.dumps(measure(lambda _: floor(path, SIZES[size]), work)))
        return
    port = next(fn for t, n, fn in CASES if (t, n) == (target, name))
    preload(target)
    # one pass over the parameters themselves: state_dict() would run torchtitan's hooks (copies)
    print(json.dumps(measure(lambda _: one_pass([p.detach() for p in port(path, SIZES[size]).parameters()]), work)))


if __name__ == "__main__":
    main(sys.argv[1:])
