"""`weightport suggest` on real architecture pairs no shipped mapping file is read for: the suggested
mapping, unedited, ports random weights with identical eval outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import weightport as wp
from weightport.mapping.suggest import suggest

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

ATOL = 1e-5


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and norm statistics, each tensor distinct, at scales that keep the outputs dependent
    on the input through every layer (so any mispaired tensor shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if t.dim() >= 2:
                t.copy_(noise * math.sqrt(1.0 / t[0].numel()))
            elif name.endswith("running_var"):
                t.copy_(1.0 + 0.5 * torch.rand(t.shape, generator=g))
            elif name.endswith("weight"):
                t.copy_(1.0 + 0.2 * noise)
            else:
                t.copy_(0.2 * noise)
    return model.eval()


def _calibrate(model: nn.Module) -> nn.Module:
    """BatchNorm statistics measured on random images (distinct per layer, and keeping the signal alive)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    return model.eval()


def _port(source: nn.Module, target: nn.Module, tmp_path, *, as_file: bool = True) -> wp.Suggestion:
    if as_file:  # the names come back sorted, as from every hub
        path = str(tmp_path / "source.safetensors")
        wp.save(source, path)
        given: object = path
    else:
        given = source
    found = suggest(given, target)
    assert not found.unmatched_targets, found.unmatched_targets
    wp.transfer(given, target, mapping=found.mapping(), strict=True)
    return found


def _assert_same(source: nn.Module, target: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = source.eval()(x), target.eval()(x)
    a = getattr(a, "logits", a)
    assert not torch.allclose(a[0], a[1], atol=1e-3), "the outputs should depend on the input"
    diff = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=ATOL, rtol=0), diff
    return diff


def _image() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tv_name", "timm_name"),
    [
        ("regnet_y_400mf", "regnety_004"),
        ("mobilenet_v3_large", "mobilenetv3_large_100"),
        ("efficientnet_b0", "efficientnet_b0"),
    ],
)
def test_torchvision_to_timm_from_a_sorted_safetensors_file(tv_name, timm_name, tmp_path):
    source = _calibrate(_randomise(getattr(torchvision.models, tv_name)(num_classes=10)))
    target = timm.create_model(timm_name, num_classes=10).eval()
    # timm and torchvision differ in BatchNorm eps for some of these; that is not a naming matter.
    for a, b in zip(
        (m for m in source.modules() if isinstance(m, nn.BatchNorm2d)),
        (m for m in target.modules() if isinstance(m, nn.BatchNorm2d)),
    ):
        b.eps = a.eps
    _port(source, target, tmp_path)
    _assert_same(source, target, _image())


def _timm_vit() -> nn.Module:
    return timm.create_model("vit_small_patch16_224", depth=3, img_size=64, num_classes=10)


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=64, patch_size=16, num_layers=3, num_heads=6, hidden_dim=384, mlp_dim=1536, num_classes=10
    )


@pytest.mark.slow
@pytest.mark.parametrize("as_file", [True, False], ids=["safetensors", "module"])
def test_timm_vit_small_to_torchvision_vit(as_file, tmp_path):
    source = _randomise(_timm_vit())
    target = _tv_vit().eval()
    for m in target.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-6  # both use 1e-6; stated so the comparison is about names only
    _port(source, target, tmp_path, as_file=as_file)
    _assert_same(source, target, _image())


# -- a hand-written Llama with fused q/k/v (Meta's naming), against transformers' LlamaForCausalLM ----


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    t, d = x.shape[-2], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float32), freqs)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, theta: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.theta = heads, kv_heads, dim // heads, theta
        self.wqkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split([self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2, -1)
        q = _rotate(q.view(b, t, self.heads, -1).transpose(1, 2), self.theta)
        k = _rotate(k.view(b, t, self.kv_heads, -1).transpose(1, 2), self.theta)
        v = v.view(b, t, self.kv_heads, -1).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, eps: float, theta: float) -> None:
        super().__init__()
        self.attention_norm = _RMSNorm(dim, eps)
        self.attention = _Attention(dim, heads, kv_heads, theta)
        self.ffn_norm = _RMSNorm(dim, eps)
        self.feed_forward = _FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class FusedLlama(nn.Module):
    """Llama as Meta's reference code names it, with q, k and v in one ``wqkv`` projection."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        eps, theta = 1e-5, 10000.0
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(_Block(dim, heads, kv_heads, hidden, eps, theta) for _ in range(layers))
        self.norm = _RMSNorm(dim, eps)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def _hf_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.slow
@pytest.mark.parametrize("as_file", [True, False], ids=["safetensors", "module"])
def test_transformers_llama_to_a_llama_with_fused_qkv(as_file, tmp_path):
    source = _randomise(_hf_llama())
    target = FusedLlama(vocab=128, dim=64, layers=3, heads=4, kv_heads=2, hidden=96).eval()
    found = _port(source, target, tmp_path, as_file=as_file)
    assert any("fuse" in r and r["to"].endswith("wqkv.{p}") for r in found.rules), found.rules
    assert found.pairs["layers.1.ffn_norm.weight"] == ("model.layers.1.post_attention_layernorm.weight",)
    assert found.pairs["layers.1.attention_norm.weight"] == ("model.layers.1.input_layernorm.weight",)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    _assert_same(source, target, tokens)
