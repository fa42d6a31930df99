"""A compact GPT-2 with weightport's own names and separate ``q``, ``k``, ``v`` projections.

Numerically it is the decoder of Radford et al. (2019) as Hugging Face's ``GPT2LMHeadModel``
computes it (pre-LayerNorm blocks, causal attention, tanh-approximated GELU, learned absolute
positions, output projection tied to the token embeddings), so weights ported with the shipped
mapping ``hf.gpt2->weightport.gpt2`` give the same logits. Every projection is an ``nn.Linear``
(weight ``(out, in)``), where GPT-2's checkpoints hold ``Conv1D`` weights ``(in, out)`` and one
fused ``c_attn``: the mapping splits and transposes them.

Tensor names::

    embed.tokens.weight  embed.positions.weight  norm.{weight,bias}  head.weight (= embed.tokens.weight)
    blocks.{i}.norm1.{weight,bias}  blocks.{i}.attn.{q,k,v}.{weight,bias}  blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.norm2.{weight,bias}  blocks.{i}.mlp.fc1.{weight,bias}       blocks.{i}.mlp.fc2.{weight,bias}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightport.errors import SourceError
from weightport.models.bert import _read_json

__all__ = ["GPT2", "GPT2Config"]

# Hugging Face config.json field -> GPT2Config field
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "n_positions": "max_positions",
    "n_embd": "hidden",
    "n_layer": "layers",
    "n_head": "heads",
    "n_inner": "mlp",
    "layer_norm_epsilon": "eps",
    "activation_function": "activation",
}
_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # -> F.gelu(approximate=...)


@dataclass(frozen=True)
class GPT2Config:
    """The sizes of a GPT-2 decoder; the defaults are GPT-2 small (124M).

    Attributes:
        vocab_size: Number of token ids.
        max_positions: Longest sequence the position table covers.
        hidden: Width of every token vector.
        layers: Number of decoder blocks.
        heads: Attention heads per block (``hidden`` must divide evenly).
        mlp: Width of the feed-forward hidden layer; ``None``: ``4 * hidden``.
        eps: LayerNorm epsilon.
        activation: ``"gelu_new"`` (GPT-2's tanh approximation) or ``"gelu"`` (exact erf).
    """

    vocab_size: int = 50257
    max_positions: int = 1024
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int | None = None
    eps: float = 1e-5
    activation: str = "gelu_new"

    @classmethod
    def from_hf(cls, config: str | os.PathLike[str] | dict[str, Any], **overrides: Any) -> GPT2Config:
        """Read a Hugging Face GPT-2 ``config.json`` (a path, its folder, or the parsed dict).

        Raises:
            SourceNotFoundError: No config file at the path.
            SourceError: The config uses a feature weightport's GPT2 does not have.
        """
        data = _read_json(config) if not isinstance(config, dict) else config
        where = config if not isinstance(config, dict) else "<config>"
        for key, allowed in (
            ("activation_function", (*_ACTIVATIONS, None)),
            ("scale_attn_weights", (True, None)),
            ("scale_attn_by_inverse_layer_idx", (False, None)),
            ("add_cross_attention", (False, None)),
        ):
            if data.get(key) not in allowed:
                raise SourceError(f"{where}: {key}={data.get(key)!r} is not supported by weightport's GPT2")
        values = {ours: data[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in data}
        return cls(**{**values, **overrides})


class Attention(nn.Module):
    """Causal multi-head self-attention with separate ``q``, ``k``, ``v`` projections."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        width = cfg.mlp or 4 * cfg.hidden
        self.approximate = _ACTIVATIONS[cfg.activation]
        self.fc1 = nn.Linear(cfg.hidden, width)
        self.fc2 = nn.Linear(width, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-LayerNorm decoder block: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Embeddings(nn.Module):
    """Token + learned position embeddings."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.positions = nn.Embedding(cfg.max_positions, cfg.hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))


class GPT2(nn.Module):
    """A GPT-2 language model: ``forward(ids)`` returns the logits ``(batch, seq, vocab_size)``.

    Args:
        cfg: Sizes; the default is GPT-2 small's.
        **sizes: :class:`GPT2Config` fields that replace ``cfg``'s (``GPT2(layers=2, hidden=64, heads=4)``,
            which is also how an architecture spec builds it: ``weightport.models:GPT2(layers=2, …)``).

    Example:
        >>> model = GPT2(GPT2Config.from_hf("path/to/folder"))
        >>> weightport.transfer("path/to/folder", model, mapping="hf.gpt2->weightport.gpt2")
        >>> next_token = model(ids)[:, -1].argmax(-1)
    """

    def __init__(self, cfg: GPT2Config | None = None, **sizes: Any) -> None:
        super().__init__()
        unknown = set(sizes) - {f.name for f in fields(GPT2Config)}
        if unknown:
            raise TypeError(f"GPT2Config has no field(s) {sorted(unknown)}")
        self.cfg = cfg = replace(cfg or GPT2Config(), **sizes)
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden={cfg.hidden} is not divisible by heads={cfg.heads}")
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"activation={cfg.activation!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.tokens.weight  # tied, as in every GPT-2 checkpoint

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position.

        Args:
            ids: Token ids, ``(batch, seq)``, at most ``max_positions`` long.
        """
        if ids.shape[-1] > self.cfg.max_positions:
            raise ValueError(
                f"{ids.shape[-1]} tokens exceed max_positions={self.cfg.max_positions}; truncate the input"
            )
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
