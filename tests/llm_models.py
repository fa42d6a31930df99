"""Tiny randomised language models of the Hugging Face families, for the LLM mapping tests.

Every model has 2 layers and grouped-query attention (4 query heads, 2 kv heads; Gemma: multi-query, 1 kv
head) and *every* parameter randomised, norms included, so a wrong permutation or a swapped tensor changes
the logits. Builders take ``tie`` to make a model whose ``lm_head`` is tied to its embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 96, 64, 112, 2, 4, 2, 16

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def hf_config(family: str, *, tie: bool = False, **overrides: object):  # -> transformers.PretrainedConfig
    """The tiny config of ``family`` (a transformers config object)."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    if family == "llama":
        cls = transformers.LlamaConfig
    elif family == "mistral":
        cls, common = transformers.MistralConfig, {**common, "sliding_window": None}
    elif family == "qwen2":
        cls = transformers.Qwen2Config
    elif family == "qwen3":
        cls = transformers.Qwen3Config
    elif family == "gemma":
        cls, common = transformers.GemmaConfig, {**common, "num_key_value_heads": 1, "tie_word_embeddings": True}
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    return cls(**{**common, **overrides})


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and floating buffer of ``model`` random values (norm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if name.endswith("norm.weight") or "norm" in name.rsplit(".", 2)[-2]:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def hf_model(family: str, *, tie: bool = False, seed: int = 0, **overrides: object) -> nn.Module:
    """A randomised ``*ForCausalLM`` of ``family`` in eval mode, float32."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, tie=tie, **overrides))
    return randomise(model, seed).eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Random token ids of shape (batch, length)."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
