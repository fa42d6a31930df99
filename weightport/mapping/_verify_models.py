"""The models and inputs :mod:`weightport.mapping.verify` works with.

Architectures are built under ``init_empty`` and given random values of a sensible scale; the input
follows the model's kind: token ids for a model whose input is an embedding (BERT, GPT-2, Llama …),
images otherwise, or a tensor read from a file. Importing this module builds and runs nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightport.errors import OpError, SourceError, TargetError

__all__ = [
    "build",
    "build_light",
    "checkpoint_state",
    "make_input",
    "memory_names",
    "meta_state",
    "outputs",
    "randomize",
]

_TOKENS = 16  # default sequence length of token inputs


def build(spec: str) -> nn.Module:
    """Build an architecture (random weights, never downloaded) from a spec, in eval mode."""
    from weightport.targets import build_target

    return build_target(spec).eval()


def build_light(spec: str, *, shapes_only: bool = False) -> nn.Module:
    """Build under ``init_empty`` (parameters on meta, no initialiser runs).

    Models that compute a non-persistent buffer from a parameter's device (timm Swin's attention
    masks) get it on meta: for a names-and-shapes check it becomes zeros, otherwise the model is
    built normally."""
    from weightport.meta import init_empty

    with init_empty():
        model = build(spec)
    lost = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None and b.is_meta]
    if lost and not shapes_only:
        return build(spec)
    for module, name, b in lost:
        module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    return model


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the names its zoo writes to files.

    transformers models rename modules in memory and convert back when saving, so their
    checkpoint is taken through ``save_pretrained``; other models give ``state_dict()``.
    """
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        state: dict[str, torch.Tensor] = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(str(path)))
    return state


def memory_names(model: nn.Module) -> dict[str, str]:
    """Checkpoint name -> in-memory name of each tensor (they differ where transformers renames modules
    in memory and converts back when saving); a tensor whose conversion is more than a rename is left out."""
    state = model.state_dict()
    if not callable(getattr(model, "save_pretrained", None)):
        return {k: k for k in state}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = dict(revert_weight_conversion(model, dict(state)))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - older or newer transformers: names as in memory
        return {k: k for k in state}
    held = {(t.data_ptr(), tuple(t.shape)): k for k, t in state.items() if not t.is_meta}
    return {k: held[key] for k, t in saved.items() if (key := (t.data_ptr(), tuple(t.shape))) in held}


def meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint names and shapes of a meta-built model (no data)."""
    if not callable(getattr(model, "save_pretrained", None)):
        return dict(model.state_dict())
    # transformers: build the checkpoint names from a state dict converted on meta; a tied name
    # (lm_head.weight of a tied model) is left out, as save_pretrained leaves it out
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            state[k] = torch.empty_like(v, device="meta")
    try:
        from transformers.core_model_loading import revert_weight_conversion

        return dict(revert_weight_conversion(model, state))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - older or newer transformers: names as in memory
        return state


def randomize(model: nn.Module, seed: int) -> None:
    """Give every tensor random values of a sensible scale, so a swapped or missed tensor
    changes the outputs: weights ~ N(0, 1/fan_in), norm weights 1 +- 0.1, biases and BatchNorm
    means ~ N(0, 0.1), variances in [0.5, 1.5]. Meta parameters (``init_empty``) become real."""
    gen = torch.Generator().manual_seed(seed + 1234)
    made: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(_random_like(p, attr, gen), requires_grad=p.requires_grad)
                module._parameters[attr] = made[id(p)]
            for attr, b in module._buffers.items():
                if b is not None and b.is_floating_point() and attr in ("running_mean", "running_var"):
                    b.copy_(_random_like(b, attr, gen))


def _random_like(t: torch.Tensor, attr: str, gen: torch.Generator) -> torch.Tensor:
    shape = tuple(t.shape)
    dtype = t.dtype if t.is_floating_point() else torch.float32
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if attr == "running_var":
        out = torch.rand(shape, generator=gen) + 0.5
    elif len(shape) >= 2:
        fan_in = max(1, t.numel() // max(1, shape[0]))
        out = noise / fan_in**0.5
    elif attr == "weight":
        out = 1.0 + 0.1 * noise
    else:
        out = 0.1 * noise
    return out.to(dtype) if t.is_floating_point() else t.detach().clone()


# -- inputs ----------------------------------------------------------------------------------------


def vocabulary(model: nn.Module) -> int | None:
    """The vocabulary size when the model's input is an embedding of token ids, else ``None``.

    Read from transformers' ``get_input_embeddings()``, else from the first module that holds
    parameters (an ``nn.Embedding`` there means token ids; a conv or a class token, images)."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            found = get()
        except Exception:  # noqa: BLE001 - image models may not implement it
            found = None
        if isinstance(found, nn.Embedding):
            return int(found.num_embeddings)
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            return int(module.num_embeddings) if isinstance(module, nn.Embedding) else None
    return None


def make_input(
    source: nn.Module,
    target: nn.Module,
    *,
    input_size: tuple[int, ...] | None,
    batch: int,
    seed: int,
    given: torch.Tensor | str | None = None,
) -> tuple[torch.Tensor, str]:
    """The input both models get, and a few words on what it is.

    ``given`` (a tensor or a .pt/.safetensors/.npy file) is used as it is; token models get random
    ids below the smaller of both vocabularies (``input_size``: ``(sequence length,)``), other models
    random images (``input_size``: ``(C, H, W)``, default the target's ``pretrained_cfg``)."""
    if given is not None:
        x = given if isinstance(given, torch.Tensor) else read_input(given)
        return x, f"given input {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    gen = torch.Generator().manual_seed(seed)
    sizes = [v for v in (vocabulary(source), vocabulary(target)) if v is not None]
    if sizes:
        shape = input_size or (_TOKENS,)
        if len(shape) != 1:
            raise TargetError(
                f"input size {shape}: these models take token ids, whose one size is the sequence length "
                "(--input-size 16, input_size=(16,))"
            )
        vocab = min(sizes)
        return torch.randint(0, vocab, (batch, *shape), generator=gen), f"token ids below {vocab}, {shape[0]} long"
    shape = input_size or _image_size(target)
    return torch.randn(batch, *shape, generator=gen), f"random images {'x'.join(map(str, shape))}"


def read_input(path: str) -> torch.Tensor:
    """One tensor from a .pt, .safetensors (its only tensor, or the one named ``input``) or .npy file."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"--input {path!r}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(p, allow_pickle=False))
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        found = load_file(str(p))
        if len(found) == 1 or "input" in found:
            return found.get("input", next(iter(found.values())))
        raise SourceError(f"--input {path!r}: {len(found)} tensors; keep one, or name the input 'input'")
    if suffix in (".pt", ".pth", ".bin"):
        x = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(x, torch.Tensor):
            return x
        raise SourceError(f"--input {path!r}: holds a {type(x).__name__}, not one tensor (torch.save(tensor, path))")
    raise SourceError(f"--input {path!r}: expected a .pt, .safetensors or .npy file holding one tensor")


def _image_size(model: nn.Module) -> tuple[int, ...]:
    embed = getattr(model, "patch_embed", None)
    img = getattr(embed, "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        return (3, int(img[0]), int(img[1]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 224, 224)


# -- outputs ---------------------------------------------------------------------------------------


def _candidates(out: Any) -> list[torch.Tensor]:
    """What a model's output can be compared as: the tensor, else logits, hidden states, class token."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return [out[0]]
    found = [t for t in (getattr(out, "logits", None),) if isinstance(t, torch.Tensor)]
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        found += [hidden, hidden[:, 0]]  # the class token, which timm's token pooling returns
    return found


def outputs(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The two models' outputs as tensors of one shape (logits, hidden states or the class token)."""
    ca, cb = _candidates(a), _candidates(b)
    if not ca or not cb:
        kind = type(a if not ca else b).__name__
        raise OpError(f"cannot compare outputs of type {kind}")
    for x in ca:
        for y in cb:
            if x.shape == y.shape:
                return x, y
    raise OpError(f"outputs differ in shape: {tuple(ca[0].shape)} vs {tuple(cb[0].shape)}")
