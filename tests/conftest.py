"""Shared fixtures: tiny models and checkpoint writers. Everything is built in tmp folders."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import weightport as wp


class TinyNet(nn.Module):
    """A conv stem with BatchNorm, two blocks and a classifier head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(2)]
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


class TiedLM(nn.Module):
    """Embedding and output projection share one parameter (tied weights)."""

    def __init__(self, vocab: int = 20, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def trained(num_classes: int = 10, seed: int = 1) -> TinyNet:
    """A TinyNet whose weights (and BN statistics) differ from a fresh one."""
    torch.manual_seed(seed)
    m = TinyNet(num_classes)
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.uniform_(-1, 1)
    return m


def meta_tiny(num_classes: int = 10) -> TinyNet:
    """A TinyNet built on the meta device: every tensor is new when weights are loaded into it."""
    with wp.init_empty():
        return TinyNet(num_classes=num_classes)


@pytest.fixture
def trained_file(tmp_path):
    """A safetensors file of ``trained(num_classes=1000)``: its head does not fit a 10-class TinyNet."""
    path = tmp_path / "w.safetensors"
    save_file(trained(num_classes=1000).state_dict(), path)
    return path


def digest(model: nn.Module) -> dict[str, str]:
    """A hash of every parameter and buffer (name, dtype, device, bytes)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            out[name] = f"{t.dtype}:meta:{tuple(t.shape)}"
            continue
        data = t.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        out[name] = f"{data.dtype}:{t.device}:{tuple(data.shape)}:" + hashlib.sha256(raw).hexdigest()
    return out


def save_legacy(obj: object, path: str | os.PathLike[str]) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def with_metadata(state: dict[str, torch.Tensor], metadata: dict) -> OrderedDict:
    out = OrderedDict(state)
    out._metadata = metadata  # type: ignore[attr-defined]
    return out
