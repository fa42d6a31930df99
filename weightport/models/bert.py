"""A compact BERT encoder with weightport's own names and a fused ``qkv`` projection.

Numerically it is the post-LayerNorm encoder of Devlin et al. (2019) as Hugging Face's
``BertModel`` computes it (exact-erf GELU, absolute positions, token types), so weights
ported with the shipped mapping ``hf.bert->weightport.bert`` give the same hidden states.

Tensor names::

    embed.tokens.weight  embed.positions.weight  embed.segments.weight  embed.norm.{weight,bias}
    blocks.{i}.attn.qkv.{weight,bias}     (query, key, value stacked along dim 0)
    blocks.{i}.attn.proj.{weight,bias}    blocks.{i}.norm1.{weight,bias}
    blocks.{i}.mlp.fc1.{weight,bias}      blocks.{i}.mlp.fc2.{weight,bias}   blocks.{i}.norm2.{weight,bias}
    pooler.{weight,bias}                  (only with ``BertConfig(pooler=True)``)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightport.errors import SourceError, SourceNotFoundError

__all__ = ["Bert", "BertConfig", "mean_pool"]


# Hugging Face config.json field -> BertConfig field
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "intermediate_size": "mlp",
    "max_position_embeddings": "max_positions",
    "type_vocab_size": "segments",
    "layer_norm_eps": "eps",
}


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder.

    Attributes:
        vocab_size: Number of token ids.
        hidden: Width of every token vector.
        layers: Number of encoder blocks.
        heads: Attention heads per block (``hidden`` must divide evenly).
        mlp: Width of the feed-forward hidden layer.
        max_positions: Longest sequence the position table covers.
        segments: Number of token types (sentence A / B).
        eps: LayerNorm epsilon.
        pooler: Whether to build the ``[CLS]`` pooler (dense + tanh).
    """

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    mlp: int = 1536
    max_positions: int = 512
    segments: int = 2
    eps: float = 1e-12
    pooler: bool = False

    @classmethod
    def from_hf(cls, config: str | os.PathLike[str] | dict[str, Any], **overrides: Any) -> BertConfig:
        """Read a Hugging Face BERT ``config.json`` (a path, its folder, or the parsed dict).

        Raises:
            SourceNotFoundError: No config file at the path.
            SourceError: The config is not a BERT with absolute positions and GELU.
        """
        data = _read_json(config) if not isinstance(config, dict) else config
        where = config if not isinstance(config, dict) else "<config>"
        for key, allowed in (("hidden_act", ("gelu",)), ("position_embedding_type", ("absolute", None))):
            if data.get(key) not in allowed:
                raise SourceError(f"{where}: {key}={data.get(key)!r} is not supported by weightport's Bert")
        known = {f.name for f in fields(cls)}
        values = {ours: data[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in data}
        values.update(overrides)
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"BertConfig has no field(s) {sorted(unknown)}")
        return cls(**values)


def _read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise SourceNotFoundError(f"{path}: no config.json here; pass the folder of a Hugging Face BERT checkpoint")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise SourceError(f"{path}: a config file must hold a JSON object")
    return data


class Embeddings(nn.Module):
    """Token + position + segment embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.positions = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.segments = nn.Embedding(cfg.segments, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.norm(self.tokens(ids) + self.positions(positions) + self.segments(segment_ids))


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden={cfg.hidden} is not divisible by heads={cfg.heads}")
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Post-LayerNorm encoder block: ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.mlp = MLP(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, bias))
        return self.norm2(x + self.mlp(x))


class Bert(nn.Module):
    """A BERT encoder: ``forward(ids, mask)`` returns the last hidden states ``(batch, seq, hidden)``.

    Args:
        cfg: Sizes; the default is all-MiniLM-L6-v2's.

    Example:
        >>> model = Bert(BertConfig.from_hf("path/to/folder"))
        >>> weightport.transfer("path/to/folder", model, mapping="hf.bert->weightport.bert")
        >>> vectors = mean_pool(model(ids, mask), mask)
    """

    def __init__(self, cfg: BertConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or BertConfig()
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden) if cfg.pooler else None

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states of the last block.

        Args:
            ids: Token ids, ``(batch, seq)``.
            mask: 1 for real tokens, 0 for padding, ``(batch, seq)``; all ones if omitted.
            segment_ids: Token types, ``(batch, seq)``; zeros if omitted.
        """
        if ids.shape[-1] > self.cfg.max_positions:
            raise ValueError(
                f"{ids.shape[-1]} tokens exceed max_positions={self.cfg.max_positions}; truncate the input"
            )
        mask = torch.ones_like(ids) if mask is None else mask
        segment_ids = torch.zeros_like(ids) if segment_ids is None else segment_ids
        x = self.embed(ids, segment_ids)
        # (batch, 1, 1, seq), added to the attention scores: a very negative number hides padding keys
        # (a finite one, as BERT does, so that an all-padding row stays finite instead of NaN)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.blocks:
            x = block(x, bias)
        return x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's ``[CLS]`` pooler output (``tanh(dense(h[:, 0]))``); needs ``BertConfig(pooler=True)``."""
        if self.pooler is None:
            raise ValueError("this Bert was built without a pooler; use BertConfig(pooler=True)")
        return torch.tanh(self.pooler(hidden[:, 0]))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where ``mask`` is 1: the sentence-transformers sentence embedding."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
