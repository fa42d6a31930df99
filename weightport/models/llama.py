"""A Llama decoder with the tensor names of Meta's ``consolidated.pth`` checkpoints.

Numerically it is the Llama of Meta's reference ``model.py`` (RMSNorm, grouped-query attention,
rotary embeddings on adjacent pairs of each head's dimensions, a SwiGLU feed-forward), so a
``consolidated.00.pth`` loads into it as it is and weights ported from Hugging Face with the
shipped mapping ``hf.llama->meta.llama`` give the logits of ``LlamaForCausalLM``. It carries no
KV cache and no model parallelism: it is the reference the mapping is checked against.

Tensor names::

    tok_embeddings.weight      norm.weight      output.weight
    layers.{i}.attention.{wq,wk,wv,wo}.weight   layers.{i}.feed_forward.{w1,w2,w3}.weight
    layers.{i}.attention_norm.weight            layers.{i}.ffn_norm.weight

Meta's q and k rows are in the *interleaved* rotary layout (rows 2j and 2j+1 of a head form a
pair), Hugging Face's in the *half* layout; the mapping's ``rope_permute`` converts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightport.errors import SourceError, SourceNotFoundError

__all__ = ["Llama", "LlamaParams"]


@dataclass(frozen=True)
class LlamaParams:
    """The sizes of a Llama, with the field names of Meta's ``params.json``.

    Attributes:
        dim: Width of every token vector.
        n_layers: Number of decoder blocks.
        n_heads: Query heads per block.
        n_kv_heads: Key/value heads (grouped-query attention); ``None`` means ``n_heads``.
        vocab_size: Number of token ids.
        multiple_of: The feed-forward width is rounded up to a multiple of this.
        ffn_dim_multiplier: Scales the feed-forward width before rounding.
        hidden_dim: The feed-forward width itself (overrides the two fields above).
        norm_eps: RMSNorm epsilon.
        rope_theta: Base of the rotary frequencies.
        max_seq_len: Longest sequence the rotary table covers.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 2048

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """The feed-forward width, as Meta's ``FeedForward`` computes it from ``dim``."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], **overrides: Any) -> LlamaParams:
        """Read a Meta checkpoint's ``params.json`` (the file or its folder); fields this model
        does not use (``use_scaled_rope``, ``rope_scaling`` ...) are ignored, ``overrides`` win.

        Raises:
            SourceNotFoundError: No params.json at the path.
            SourceError: The file is not a JSON object.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "params.json")
        if not os.path.isfile(path):
            raise SourceNotFoundError(f"{path}: no params.json here; pass the folder of a Meta Llama checkpoint")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise SourceError(f"{path}: params.json must hold a JSON object")
        return cls.from_dict({**data, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaParams:
        """The parsed ``params.json``; fields this model does not use are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_table(head_dim: int, length: int, theta: float) -> torch.Tensor:
    """``(length, head_dim // 2)`` complex rotations, ``exp(i * position * theta ** (-2j / head_dim))``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dimension of ``x`` (batch, seq, heads, head_dim)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * table[: x.shape[1], None, :]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, p: LlamaParams) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = p.n_heads, p.kv_heads, p.head_dim
        self.wq = nn.Linear(p.dim, p.n_heads * p.head_dim, bias=False)
        self.wk = nn.Linear(p.dim, p.kv_heads * p.head_dim, bias=False)
        self.wv = nn.Linear(p.dim, p.kv_heads * p.head_dim, bias=False)
        self.wo = nn.Linear(p.n_heads * p.head_dim, p.dim, bias=False)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = rotate(self.wq(x).view(b, n, self.heads, self.head_dim), table)
        k = rotate(self.wk(x).view(b, n, self.kv_heads, self.head_dim), table)
        v = self.wv(x).view(b, n, self.kv_heads, self.head_dim)
        repeat = self.heads // self.kv_heads
        k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, p: LlamaParams) -> None:
        super().__init__()
        self.attention = Attention(p)
        self.feed_forward = FeedForward(p.dim, p.ffn_dim)
        self.attention_norm = RMSNorm(p.dim, p.norm_eps)
        self.ffn_norm = RMSNorm(p.dim, p.norm_eps)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), table)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Token ids ``(batch, seq)`` to logits ``(batch, seq, vocab_size)``, float32.

    Build it from keyword arguments (the fields of :class:`LlamaParams`) or a
    :class:`LlamaParams`, e.g. ``Llama(LlamaParams.from_json("Llama3.2-1B"))``.
    ``num_heads``, ``num_kv_heads`` and ``head_dim`` are attributes, as on torchtune's models.
    """

    def __init__(self, params: LlamaParams | None = None, **kwargs: Any) -> None:
        super().__init__()
        p = params if params is not None else LlamaParams(**kwargs)
        self.params = p
        self.num_heads, self.num_kv_heads, self.head_dim = p.n_heads, p.kv_heads, p.head_dim
        self.tok_embeddings = nn.Embedding(p.vocab_size, p.dim)
        self.layers = nn.ModuleList(Block(p) for _ in range(p.n_layers))
        self.norm = RMSNorm(p.dim, p.norm_eps)
        self.output = nn.Linear(p.dim, p.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        table = rotary_table(self.head_dim, max(self.params.max_seq_len, tokens.shape[1]), self.params.rope_theta)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, table.to(h.device))
        return self.output(self.norm(h)).float()
