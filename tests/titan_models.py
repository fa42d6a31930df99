"""Tiny torchtitan decoders (Llama 3 and Qwen3) of the sizes :mod:`tests.llm_models` gives the Hugging Face
models, for the state-dict hook and torchtitan mapping tests.

torchtitan's language models only offer flex and varlen attention, neither of which runs on a CPU without
compiling; the tiny models use its plain ``ScaledDotProductAttention`` (causal, no mask), which computes the
same attention. ``fuse_qkv=True`` is torchtitan's default: ``FusedQKVLinear`` holds one ``wqkv`` parameter
laid out per kv group and saves it as ``wq``/``wk``/``wv`` through state-dict hooks.
"""

from __future__ import annotations

import pytest

from tests.llm_models import FFN, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, randomise


def llama3(*, fuse_qkv: bool = True, tie: bool = False, theta: float = 10000.0, eps: float = 1e-5, seed: int = 0):
    """A randomised torchtitan ``Llama3Model`` (eval mode, float32) and its config."""
    pytest.importorskip("torchtitan")
    from torchtitan.models.common import ComplexRoPE
    from torchtitan.models.llama3 import _build_llama3_layers
    from torchtitan.models.llama3.model import Llama3Model

    layers = _build_llama3_layers(
        fuse_qkv=fuse_qkv,
        n_layers=LAYERS,
        dim=HIDDEN,
        n_heads=HEADS,
        n_kv_heads=KV_HEADS,
        hidden_dim=FFN,
        rope=ComplexRoPE.Config(dim=HEAD_DIM, max_seq_len=128, theta=theta, scaling="none"),
        attn_backend="flex",
    )
    return _finish(Llama3Model, layers, tie, eps, seed)


def qwen3(*, fuse_qkv: bool = True, tie: bool = False, theta: float = 10000.0, eps: float = 1e-5, seed: int = 0):
    """A randomised torchtitan ``Qwen3Model`` (eval mode, float32) and its config."""
    pytest.importorskip("torchtitan")
    from torchtitan.models.common import CosSinRoPE
    from torchtitan.models.qwen3 import _build_qwen3_layers
    from torchtitan.models.qwen3.model import Qwen3Model

    layers = _build_qwen3_layers(
        fuse_qkv=fuse_qkv,
        n_layers=LAYERS,
        dim=HIDDEN,
        n_heads=HEADS,
        n_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        hidden_dim=FFN,
        rope=CosSinRoPE.Config(dim=HEAD_DIM, max_seq_len=128, theta=theta),
        attn_backend="flex",
    )
    return _finish(Qwen3Model, layers, tie, eps, seed)


def _finish(cls, layers, tie: bool, eps: float, seed: int):
    import dataclasses

    from torchtitan.models.common import Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        for norm in ("attention_norm", "ffn_norm"):
            setattr(layer, norm, dataclasses.replace(getattr(layer, norm), eps=eps))
        if layer.attention.qk_norm is not None:
            layer.attention.qk_norm = dataclasses.replace(layer.attention.qk_norm, eps=eps)
    config = cls.Config(
        dim=HIDDEN,
        vocab_size=VOCAB,
        enable_weight_tying=tie,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=HIDDEN),
        norm=RMSNorm.Config(normalized_shape=HIDDEN, eps=eps),
        lm_head=Linear.Config(in_features=HIDDEN, out_features=VOCAB),
        layers=layers,
    )
    return randomise(config.build(), seed).eval(), config


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids)


def llama3_model(**kwargs):
    """:func:`llama3`'s model alone: a target spec for ``weightport verify`` (``tests.titan_models:llama3_model``)."""
    return llama3(**kwargs)[0]


def qwen3_model(**kwargs):
    """:func:`qwen3`'s model alone: a target spec for ``weightport verify`` (``tests.titan_models:qwen3_model``)."""
    return qwen3(**kwargs)[0]
