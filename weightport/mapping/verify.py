"""Verifying a mapping by numbers: build both architectures, port, compare outputs.

``weightport verify MAPPING`` calls :func:`verify`. For each ``source -> target`` pair
(by default every pair in the mapping file's ``verified`` list) it

1. builds the source architecture with random weights (norm weights and BatchNorm
   statistics away from 1 and 0 too, so a swapped or missed tensor shows in the outputs)
   and takes its checkpoint in the zoo's own file format (``save_pretrained`` for
   transformers); both models are built under ``init_empty``, no time goes to initialisers;
2. ports that checkpoint into the target architecture with the mapping (``strict=True``:
   every target tensor loaded, every source tensor used or dropped);
3. compares both models' eval outputs on one random input;
4. maps the ported weights back through ``mapping.inverse()`` and checks that every
   source tensor comes back bit for bit (where the mapping inverts).

``numerics=False`` stops after planning: both models are built on the meta device and
only names and shapes are checked (cheap even for ViT-H).

Importing this module builds and runs nothing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping as AnyMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightport.errors import MappingError, OpError
from weightport.mapping.core import Mapping
from weightport.mapping.ops import fuse as _cat

__all__ = ["Verification", "build", "checkpoint_state", "map_state_dict", "pairs", "verify", "verify_all"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verification:
    """The outcome of verifying one ``source -> target`` pair.

    Attributes:
        mapping: The mapping's name.
        source: The source architecture spec.
        target: The target architecture spec.
        loaded: Target tensors loaded or adapted (``strict=True`` held, so all of them).
        max_abs_diff: Largest absolute difference between the eval outputs; ``None`` when
            numerics were not run.
        max_rel_diff: ``max_abs_diff`` over the largest absolute reference output.
        round_trip: Whether source -> target -> source gave every source tensor back bit for
            bit (under its name without the mapping's optional ``source_prefix``); ``None`` when
            not run or the mapping does not invert.
        seconds: Wall time of the whole check.
    """

    mapping: str
    source: str
    target: str
    loaded: int
    max_abs_diff: float | None
    max_rel_diff: float | None
    round_trip: bool | None
    seconds: float

    def ok(self, atol: float = 1e-4) -> bool:
        """Names line up and (where run) outputs agree within ``atol`` and the round trip is exact."""
        close = self.max_abs_diff is None or self.max_abs_diff <= atol
        return close and self.round_trip is not False


def pairs(mapping: Mapping) -> list[tuple[str, str]]:
    """The ``(source, target)`` specs a mapping's ``verified`` list names (else its source/target)."""
    out = []
    for entry in mapping.verified or ([f"{mapping.source} -> {mapping.target}"] if mapping.source else []):
        src, sep, dst = entry.partition(" -> ")
        if not sep or not src.strip() or not dst.strip():
            raise MappingError(f"{mapping.name}: verified entry {entry!r} is not 'SOURCE -> TARGET'")
        out.append((src.strip(), dst.strip()))
    return out


def verify_all(mapping: str | Mapping, *, numerics: bool = True, **options: Any) -> list[Verification]:
    """:func:`verify` every pair of the mapping's ``verified`` list."""
    m = _load(mapping)
    return [verify(m, source=s, target=t, numerics=numerics, **options) for s, t in pairs(m)]


def verify(
    mapping: str | Mapping,
    *,
    source: str | None = None,
    target: str | None = None,
    numerics: bool = True,
    input_size: tuple[int, ...] | None = None,
    batch: int = 2,
    seed: int = 0,
) -> Verification:
    """Port a randomly initialised ``source`` architecture into ``target`` and measure the difference.

    Args:
        mapping: A shipped mapping name, a file, or a :class:`Mapping`.
        source: Source architecture spec (``torchvision:NAME``, ``timm:NAME(k=v)``,
            ``transformers:CLASS(config_key=v)``, ``package.module:factory``); default: the first
            ``verified`` pair.
        target: Target architecture spec; default as for ``source``.
        numerics: Run both models and the round trip; ``False``: check names and shapes only.
        input_size: Input shape without the batch, e.g. ``(3, 64, 64)``; default: the target's
            ``pretrained_cfg`` input size, else ``(3, 224, 224)``.
        batch: Batch size of the random input.
        seed: Seed for weights and input.

    Returns:
        A :class:`Verification`.

    Raises:
        WeightportError: the mapping or an architecture cannot be loaded or built, or the port
            fails its strictness check (the message names the tensors).
    """
    start = time.perf_counter()
    m = _load(mapping)
    if source is None or target is None:
        found = pairs(m)
        if not found:
            raise MappingError(f"{m.name}: no source/target to verify; pass source= and target=")
        source, target = source or found[0][0], target or found[0][1]
    from weightport.api import transfer

    torch.manual_seed(seed)
    if not numerics:
        src_model, dst_model = _build_light(source, shapes_only=True), _build_light(target, shapes_only=True)
        from weightport.api import plan

        planned = plan(_meta_state(src_model), dst_model, mapping=m, strict=True)
        loaded = len(planned.recipes)
        return Verification(m.name or "?", source, target, loaded, None, None, None, time.perf_counter() - start)
    # no costly initialisation: the source gets random values, the target is all loaded
    src_model, dst_model = _build_light(source), _build_light(target)
    _randomize(src_model, seed)
    state = checkpoint_state(src_model)
    report = transfer(state, dst_model, mapping=m, strict=True)
    x = torch.randn(batch, *(input_size or _input_size(dst_model)))
    diff, rel = _compare(src_model, dst_model, x)
    trip = _round_trip(state, m, checkpoint_state(dst_model))
    seconds = time.perf_counter() - start
    return Verification(
        m.name or "?", source, target, len(report.entries) - len(report.fresh), diff, rel, trip, seconds
    )


# -- architectures and checkpoints -----------------------------------------------------------------


def build(spec: str) -> nn.Module:
    """Build an architecture (random weights, never downloaded) from a spec, in eval mode.

    Any TARGET spec: ``torchvision:NAME``, ``timm:NAME(k=v)``, ``transformers:CLASS(config_key=v)``
    (constructor arguments such as ``add_pooling_layer`` go to the class), ``package.module:factory``.
    """
    from weightport.targets import build_target

    return build_target(spec).eval()


def _build_light(spec: str, *, shapes_only: bool = False) -> nn.Module:
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


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint names and shapes of a meta-built model (no data)."""
    if not callable(getattr(model, "save_pretrained", None)):
        return dict(model.state_dict())
    # transformers: build the checkpoint names from a state dict converted on meta
    state = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict().items()}
    return _hf_names(model, state)


def _hf_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        from transformers.core_model_loading import revert_weight_conversion

        return dict(revert_weight_conversion(model, state))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - older or newer transformers: names as in memory
        return state


def _randomize(model: nn.Module, seed: int) -> None:
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


def _input_size(model: nn.Module) -> tuple[int, ...]:
    embed = getattr(model, "patch_embed", None)
    img = getattr(embed, "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        return (3, int(img[0]), int(img[1]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 224, 224)


def _output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden[:, 0]  # the class token, which timm's token pooling returns
    raise OpError(f"cannot compare outputs of type {type(out).__name__}")


def _compare(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    a.eval()
    b.eval()
    with torch.no_grad():
        ya, yb = _output(a(x)), _output(b(x))
    if ya.shape != yb.shape:
        raise OpError(f"outputs differ in shape: {tuple(ya.shape)} vs {tuple(yb.shape)}")
    diff = float((ya.float() - yb.float()).abs().max())
    scale = float(ya.float().abs().max()) or 1.0
    return diff, diff / scale


def _round_trip(state: dict[str, torch.Tensor], mapping: Mapping, ported: dict[str, torch.Tensor]) -> bool | None:
    try:
        inverse = mapping.inverse()
    except MappingError:
        return None
    prefix = mapping.source_prefix or ""
    kept = {
        k[len(prefix) :] if prefix and k.startswith(prefix) else k: v
        for k, v in state.items()
        if not mapping.resolve(k).dropped
    }
    forward = map_state_dict(state, mapping, like=ported)
    back = map_state_dict(forward, inverse, like=kept)
    return set(back) == set(kept) and all(torch.equal(back[k], v) for k, v in kept.items())


# -- mapping a state dict without a target model ---------------------------------------------------


def map_state_dict(
    state: AnyMapping[str, torch.Tensor],
    mapping: Mapping,
    *,
    like: AnyMapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename and transform a state dict through ``mapping`` without a target model.

    Args:
        state: Source tensors by name.
        mapping: The mapping to apply.
        like: Target tensors by name, for ops that need the target (``reshape`` to the target's
            shape, adapters, ``pad``); without it such ops raise :class:`OpError`.

    Raises:
        MappingError: two source tensors write one name, or a fuse misses parts.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, tuple[int, int, dict[int, torch.Tensor]]] = {}
    for key, tensor in state.items():
        for o in mapping.resolve(key).outputs:
            x = tensor
            for op in o.ops:
                x = op.run(x, like.get(o.target) if like is not None else None)
            if o.part is None:
                _put(out, o.target, x, key)
            else:
                parts.setdefault(o.target, (o.dim, o.part[1], {}))[2][o.part[0]] = x
    for name, (dim, count, got) in parts.items():
        missing = [i + 1 for i in range(count) if i not in got]
        if missing:
            raise MappingError(f"fuse into {name!r}: part(s) {missing} of {count} are not in the state dict")
        _put(out, name, _cat([got[i] for i in range(count)], dim), name)
    return out


def _put(out: dict[str, torch.Tensor], name: str, value: torch.Tensor, key: str) -> None:
    if name in out:
        raise MappingError(f"two source tensors write {name!r} (the second is {key!r})")
    out[name] = value


def _load(mapping: str | Mapping) -> Mapping:
    if isinstance(mapping, Mapping):
        return mapping
    from weightport.mapping.files import load_mapping

    return load_mapping(mapping)
