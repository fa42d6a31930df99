"""Shape adapters: ops that make a pretrained tensor fit a target of another shape.

Each adapter is a registered op (usable by name in a rule, e.g. ``op = "pos_embed"``)
with an ``applies`` predicate, which ``on_mismatch="adapt"`` calls to decide whether
it fits a mismatched tensor and with which parameters. The parameters it returns are
shown in the report (``in_channels 3->1``, ``pos_embed 14x14->24x24 +1``).

Numerics follow timm where timm has the operation, so a model adapted here equals
one adapted by ``timm.create_model(..., pretrained=True)``:

* ``in_channels`` equals ``timm.models.adapt_input_conv(T, w, base_chans=S)``: one
  target channel sums the source channels; otherwise the source channels repeat
  cyclically and are scaled by ``S / T``. This holds for any source count ``S`` (3 is
  timm's default). An explicit ``map`` instead picks source channels by index
  (``[2, 1, 0]`` turns RGB into BGR) with ``-1`` for a new channel, which is zero
  (``fill="zero"``: the model's response to the old channels is unchanged) or the
  target's own initialisation (``fill="init"``).
* ``pos_embed`` equals ``timm.layers.resample_abs_pos_embed`` (bicubic, antialias,
  prefix tokens kept as they are, non-square grids).
* ``patch_embed`` equals ``timm.layers.resample_patch_embed`` (FlexiViT pseudo-inverse).
* ``head`` and ``vocab`` keep overlapping rows (or the rows ``index`` names); new rows
  keep the target's initialisation. They change what a row means, so ``on_mismatch="adapt"``
  never picks them by itself (they are not ``auto``): the caller asks with ``adapters=`` or a rule.

Every adapter also runs on meta tensors (the planner infers shapes that way): on a
meta input it returns an empty tensor of the output shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightport.errors import OpError
from weightport.mapping.ops import register_op
from weightport.sources.base import TensorMeta

__all__ = ["HEAD_NAMES", "INPUT_CHANNELS_MAX", "POS_EMBED_NAMES"]

#: ``on_mismatch="adapt"`` treats a conv as an input layer only when the source has at most
#: this many input channels (images: 1-16 bands); name ``in_channels`` in a rule for others.
INPUT_CHANNELS_MAX = 16
#: Module names (any segment of the path) that mark a classifier for the ``head`` adapter.
HEAD_NAMES = frozenset({"head", "heads", "fc", "classifier", "last_linear", "logits", "cls_head", "linear_head"})
#: Tensor names that mark an absolute position embedding for the ``pos_embed`` adapter.
POS_EMBED_NAMES = frozenset({"pos_embed", "pos_embedding", "position_embeddings", "positional_embedding"})
_MAX_PREFIX = 16


def _meta_out(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor | None:
    return torch.empty(tuple(shape), dtype=x.dtype, device="meta") if x.is_meta else None


def _sizes(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise OpError(f"{what} must be an int or [height, width], not {value!r}")
    if min(value) < 1:
        raise OpError(f"{what} must be positive, not {value!r}")
    return int(value[0]), int(value[1])


def _hw(size: Sequence[int] | None) -> str:
    return "?" if size is None else f"{size[0]}x{size[1]}"


# -- in_channels ------------------------------------------------------------------------------------


def _in_channels_label(p: Mapping[str, Any]) -> str:
    s, t = p.get("source_channels"), p.get("channels")
    counts = f" {s}->{t}" if s is not None and t is not None else ""
    how = f" map={list(p['map'])}" if p.get("map") is not None else ""
    return f"in_channels{counts}{how}"


def _conv_like(module: nn.Module | None) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 and not module.transposed


def _in_channels_applies(
    *, name: str, source: TensorMeta, target: torch.Tensor, module: nn.Module | None
) -> dict[str, Any] | None:
    s, t = tuple(source.shape), tuple(target.shape)
    if not name.endswith("weight") or not _conv_like(module) or len(s) != len(t) or len(s) < 3:
        return None
    if s[0] != t[0] or s[2:] != t[2:] or s[1] == t[1] or s[1] > INPUT_CHANNELS_MAX:
        return None
    return {"source_channels": s[1], "channels": t[1]}


@register_op("in_channels", target="value", label=_in_channels_label, applies=_in_channels_applies, auto=True)
def in_channels(
    x: torch.Tensor,
    *,
    target: torch.Tensor,
    channels: int | None = None,
    source_channels: int | None = None,
    map: list[int] | None = None,
    fill: str = "zero",
) -> torch.Tensor:
    """Adapt a conv weight ``(out, S, *k)`` to ``T`` input channels.

    Args:
        x: The source weight.
        target: The target weight (its shape; its values for ``fill="init"``).
        channels: ``T``; defaults to the target's input channels.
        source_channels: ``S``, checked against ``x`` when given.
        map: For each target channel, the source channel it takes, or ``-1`` for a new one.
            Without it, timm's rule: sum for ``T == 1``, else repeat and scale by ``S / T``.
        fill: New channels of a ``map``: ``"zero"`` or ``"init"`` (the target's values).
    """
    if x.dim() < 3:
        raise OpError(f"in_channels needs a conv weight (out, in, *kernel), got shape {tuple(x.shape)}")
    s = x.shape[1]
    t = int(channels) if channels is not None else int(target.shape[1])
    if source_channels is not None and source_channels != s:
        raise OpError(f"in_channels: source_channels={source_channels} but the tensor has {s} input channels")
    if fill not in ("zero", "init"):
        raise OpError(f"in_channels: fill must be 'zero' or 'init', not {fill!r}")
    if map is not None:
        return _channel_map(x, target, list(map), t, fill)
    out_shape = (x.shape[0], t, *x.shape[2:])
    meta = _meta_out(x, out_shape)
    if meta is not None:
        return meta
    if t < 1:
        raise OpError(f"in_channels: the target channel count must be positive, not {t}")
    if t == s:
        return x
    w = x.float()
    if t == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        repeat = math.ceil(t / s)
        w = w.repeat(1, repeat, *([1] * (x.dim() - 2)))[:, :t] * (s / float(t))
    return w.to(x.dtype)


def _channel_map(x: torch.Tensor, target: torch.Tensor, index: list[int], t: int, fill: str) -> torch.Tensor:
    s = x.shape[1]
    if len(index) != t:
        raise OpError(f"in_channels: map has {len(index)} entries for {t} target channels")
    bad = [i for i in index if not isinstance(i, int) or not -1 <= i < s]
    if bad:
        raise OpError(f"in_channels: map entries {bad} are not source channels 0..{s - 1} (or -1 for a new one)")
    out_shape = (x.shape[0], t, *x.shape[2:])
    meta = _meta_out(x, out_shape)
    if meta is not None:
        return meta
    if fill == "init":
        if tuple(target.shape) != out_shape or target.is_meta:
            raise OpError("in_channels: fill='init' needs the target's values of shape " + str(out_shape))
        out = target.detach().to(device=x.device, dtype=x.dtype, copy=True)
    else:
        out = torch.zeros(out_shape, dtype=x.dtype, device=x.device)
    for j, i in enumerate(index):
        if i >= 0:
            out[:, j] = x[:, i]
    return out


# -- pos_embed --------------------------------------------------------------------------------------


def _square(n: int) -> int | None:
    r = math.isqrt(n) if n >= 0 else -1
    return r if r > 0 and r * r == n else None


def _pos_embed_label(p: Mapping[str, Any]) -> str:
    prefix = p.get("num_prefix_tokens")
    extra = f" +{prefix}" if prefix else ""
    return f"pos_embed {_hw(p.get('old_size'))}->{_hw(p.get('new_size'))}{extra}"


def _grid_of(module: nn.Module | None) -> tuple[int, int] | None:
    """The patch grid of a ViT-like owner module (timm ``patch_embed.grid_size``, HF patch embeddings)."""
    for path in ("patch_embed", "patch_embeddings", ""):
        m = getattr(module, path, None) if path else module
        grid = getattr(m, "grid_size", None)
        if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) for g in grid):
            return int(grid[0]), int(grid[1])
    return None


def _prefix_of(module: nn.Module | None) -> int | None:
    if module is None:
        return None
    if getattr(module, "no_embed_class", False):
        return 0
    n = getattr(module, "num_prefix_tokens", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _split_tokens(n_src: int, n_tgt: int, new: tuple[int, int] | None, prefix: int | None) -> tuple[int, ...] | None:
    """``(prefix, old_h, old_w, new_h, new_w)`` for token counts, grids square unless given."""
    choices = [prefix] if prefix is not None else range(0, _MAX_PREFIX + 1)
    for p in choices:
        old = _square(n_src - p)
        if not old:
            continue
        if new is not None and new[0] * new[1] + p == n_tgt:
            return p, old, old, new[0], new[1]
        side = _square(n_tgt - p) if new is None else None
        if side:
            return p, old, old, side, side
    return None


def _pos_embed_applies(
    *, name: str, source: TensorMeta, target: torch.Tensor, module: nn.Module | None
) -> dict[str, Any] | None:
    s, t = tuple(source.shape), tuple(target.shape)
    if name.rpartition(".")[2] not in POS_EMBED_NAMES or len(s) != len(t) or s[-1] != t[-1]:
        return None
    if len(s) == 4 and s[0] == t[0] == 1:  # NHWC grid, no prefix tokens
        return {"old_size": [s[1], s[2]], "new_size": [t[1], t[2]], "num_prefix_tokens": 0}
    if (len(s) == 3 and s[0] == t[0] == 1) or len(s) == 2:
        found = _split_tokens(s[-2], t[-2], _grid_of(module), _prefix_of(module))
        if found is None:
            return None
        p, oh, ow, nh, nw = found
        return {"old_size": [oh, ow], "new_size": [nh, nw], "num_prefix_tokens": p}
    return None


@register_op("pos_embed", target="shape", label=_pos_embed_label, applies=_pos_embed_applies, auto=True)
def pos_embed(
    x: torch.Tensor,
    *,
    target: torch.Tensor,
    new_size: list[int] | None = None,
    old_size: list[int] | None = None,
    num_prefix_tokens: int | None = None,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample an absolute position embedding to a new patch grid.

    Accepts ``(1, N, D)`` (timm, torchvision, Hugging Face), ``(N, D)`` (CLIP) or an NHWC grid
    ``(1, H, W, D)``. Prefix tokens (class, registers, distillation) are kept as they are.

    Args:
        x: The source embedding.
        target: The target embedding (its shape).
        new_size: Target grid ``[h, w]``; inferred from the target when square.
        old_size: Source grid ``[h, w]``; inferred when square.
        num_prefix_tokens: Tokens before the grid; inferred (the smallest count that makes
            both grids square) when not given.
        interpolation: ``torch.nn.functional.interpolate`` mode.
        antialias: Antialias when downsampling (timm's default).
    """
    if x.dim() == 4:
        return _pos_embed_nhwc(x, target, new_size, interpolation, antialias)
    if x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[0] != 1):
        raise OpError(
            f"pos_embed needs a (1, tokens, dim), (tokens, dim) or (1, h, w, dim) tensor, got {tuple(x.shape)}"
        )
    n_src, n_tgt = x.shape[-2], target.shape[-2] if target.dim() == x.dim() else None
    new = _sizes(new_size, "pos_embed new_size")
    old = _sizes(old_size, "pos_embed old_size")
    p = num_prefix_tokens
    if old is None or new is None or p is None:
        if n_tgt is None:
            raise OpError("pos_embed: give new_size when the target is not a position embedding")
        found = _split_tokens(n_src, n_tgt, new, p if p is not None else None)
        if found is None:
            raise OpError(
                f"pos_embed: cannot infer the grids of {n_src} -> {n_tgt} tokens; give old_size, new_size "
                "and num_prefix_tokens"
            )
        p = found[0]
        old = old or (found[1], found[2])
        new = new or (found[3], found[4])
    if old[0] * old[1] + p != n_src:
        raise OpError(f"pos_embed: old_size {list(old)} with {p} prefix tokens does not make {n_src} tokens")
    shape = (*x.shape[:-2], new[0] * new[1] + p, x.shape[-1])
    meta = _meta_out(x, shape)
    if meta is not None:
        return meta
    squeeze = x.dim() == 2
    posemb = x.unsqueeze(0) if squeeze else x
    prefix, grid = posemb[:, :p], posemb[:, p:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(x.dtype)
    out = torch.cat([prefix, grid], dim=1) if p else grid
    return out.squeeze(0) if squeeze else out


def _pos_embed_nhwc(
    x: torch.Tensor, target: torch.Tensor, new_size: Any, interpolation: str, antialias: bool
) -> torch.Tensor:
    new = _sizes(new_size, "pos_embed new_size")
    if new is None:
        if target.dim() != 4:
            raise OpError("pos_embed: give new_size for an NHWC embedding")
        new = (int(target.shape[1]), int(target.shape[2]))
    meta = _meta_out(x, (x.shape[0], new[0], new[1], x.shape[-1]))
    if meta is not None:
        return meta
    grid = F.interpolate(x.float().permute(0, 3, 1, 2), size=new, mode=interpolation, antialias=antialias)
    return grid.permute(0, 2, 3, 1).to(x.dtype)


# -- patch_embed ------------------------------------------------------------------------------------


def _patch_embed_label(p: Mapping[str, Any]) -> str:
    return f"patch_embed {_hw(p.get('old_size'))}->{_hw(p.get('new_size'))}"


def _patch_embed_applies(
    *, name: str, source: TensorMeta, target: torch.Tensor, module: nn.Module | None
) -> dict[str, Any] | None:
    s, t = tuple(source.shape), tuple(target.shape)
    if not name.endswith("weight") or not _conv_like(module) or len(s) != 4 or len(t) != 4:
        return None
    if (
        not isinstance(module, nn.modules.conv._ConvNd)
        or s[:2] != t[:2]
        or s[2:] == t[2:]
        or tuple(module.stride) != tuple(module.kernel_size)
    ):
        return None
    return {"old_size": [s[2], s[3]], "new_size": [t[2], t[3]]}


@register_op("patch_embed", target="shape", label=_patch_embed_label, applies=_patch_embed_applies, auto=True)
def patch_embed(
    x: torch.Tensor,
    *,
    target: torch.Tensor,
    new_size: list[int] | None = None,
    old_size: list[int] | None = None,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a patch-embedding kernel ``(out, in, h, w)`` to a new patch size.

    FlexiViT's pseudo-inverse resize: a patch resized with ``interpolation`` and embedded
    with the new kernel gives what the old kernel gave on the original patch.

    Args:
        x: The source kernel.
        target: The target kernel (its shape).
        new_size: ``[h, w]``; defaults to the target's kernel size.
        old_size: Checked against ``x`` when given.
        interpolation: ``torch.nn.functional.interpolate`` mode.
        antialias: Antialias when downsampling.
    """
    if x.dim() != 4:
        raise OpError(f"patch_embed needs a 4-d conv kernel, got shape {tuple(x.shape)}")
    old = (int(x.shape[2]), int(x.shape[3]))
    given = _sizes(old_size, "patch_embed old_size")
    if given is not None and given != old:
        raise OpError(f"patch_embed: old_size={list(given)} but the kernel is {list(old)}")
    new = _sizes(new_size, "patch_embed new_size") or (int(target.shape[-2]), int(target.shape[-1]))
    meta = _meta_out(x, (x.shape[0], x.shape[1], *new))
    if meta is not None:
        return meta
    if new == old:
        return x
    eye = torch.eye(old[0] * old[1], dtype=torch.float32, device=x.device).reshape(-1, 1, *old)
    basis = F.interpolate(eye, size=new, mode=interpolation, antialias=antialias, align_corners=False)
    resize = basis.squeeze(1).permute(1, 2, 0).reshape(new[0] * new[1], old[0] * old[1])
    pinv = torch.linalg.pinv(resize)
    out = x.reshape(x.shape[0], x.shape[1], -1).float() @ pinv
    return out.reshape(x.shape[0], x.shape[1], *new).to(x.dtype)


# -- head and vocab ---------------------------------------------------------------------------------


def _rows_label(kind: str) -> Any:
    def label(p: Mapping[str, Any]) -> str:
        pick = f" index[{len(p['index'])}]" if p.get("index") is not None else ""
        return f"{kind} {p.get('source_rows', '?')}->{p.get('rows', '?')}{pick}"

    return label


def _rows_fit(s: tuple[int, ...], t: tuple[int, ...]) -> bool:
    return len(s) == len(t) >= 1 and s[0] != t[0] and s[1:] == t[1:]


def _head_applies(
    *, name: str, source: TensorMeta, target: torch.Tensor, module: nn.Module | None
) -> dict[str, Any] | None:
    s, t = tuple(source.shape), tuple(target.shape)
    path = name.split(".")[:-1]
    if not isinstance(module, nn.Linear) or not HEAD_NAMES.intersection(path) or not _rows_fit(s, t):
        return None
    return {"source_rows": s[0], "rows": t[0]}


def _vocab_applies(
    *, name: str, source: TensorMeta, target: torch.Tensor, module: nn.Module | None
) -> dict[str, Any] | None:
    s, t = tuple(source.shape), tuple(target.shape)
    lm_head = isinstance(module, nn.Linear) and "lm_head" in name.split(".")
    if not (isinstance(module, nn.Embedding) or lm_head) or not _rows_fit(s, t):
        return None
    return {"source_rows": s[0], "rows": t[0]}


def _rows(
    x: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    index: list[int] | None,
    rows: int | None,
    source_rows: int | None,
) -> torch.Tensor:
    if rows is not None and rows != target.shape[0]:
        raise OpError(f"{kind}: rows={rows} but the target has {target.shape[0]} rows")
    if x.dim() < 1 or target.dim() != x.dim() or tuple(x.shape[1:]) != tuple(target.shape[1:]):
        raise OpError(f"{kind}: cannot fit rows of {tuple(x.shape)} into {tuple(target.shape)}")
    if source_rows is not None and source_rows != x.shape[0]:
        raise OpError(f"{kind}: source_rows={source_rows} but the tensor has {x.shape[0]} rows")
    n, m = x.shape[0], target.shape[0]
    picks = list(index) if index is not None else list(range(min(n, m)))
    if len(picks) > m or any(not isinstance(i, int) or not -1 <= i < n for i in picks):
        raise OpError(f"{kind}: index must list at most {m} source rows in 0..{n - 1} (or -1 to keep the init)")
    meta = _meta_out(x, target.shape)
    if meta is not None:
        return meta
    if target.is_meta:
        raise OpError(f"{kind}: needs the target's values to keep its initialisation in new rows")
    out = target.detach().to(device=x.device, dtype=x.dtype, copy=True)
    filled = [j for j, i in enumerate(picks) if i >= 0]
    if filled:
        src = torch.tensor([picks[j] for j in filled], dtype=torch.long, device=x.device)
        out[torch.tensor(filled, dtype=torch.long, device=x.device)] = x.index_select(0, src)
    return out


@register_op("head", target="value", label=_rows_label("head"), applies=_head_applies)
def head(
    x: torch.Tensor,
    *,
    target: torch.Tensor,
    index: list[int] | None = None,
    rows: int | None = None,
    source_rows: int | None = None,
) -> torch.Tensor:
    """Resize a classifier weight or bias along its rows (classes).

    Args:
        x: The source weight ``(classes, features)`` or bias ``(classes,)``.
        target: The target tensor; rows not filled keep its values (its initialisation).
        index: Source row for each of the first ``len(index)`` target rows (``-1``: keep the
            init), e.g. the ImageNet classes of a 3-class problem. Default: the first
            ``min(source, target)`` rows.
        rows: The target's row count, checked when given.
        source_rows: The source's row count, checked when given.
    """
    return _rows(x, target, "head", index, rows, source_rows)


@register_op("vocab", target="value", label=_rows_label("vocab"), applies=_vocab_applies)
def vocab(
    x: torch.Tensor,
    *,
    target: torch.Tensor,
    index: list[int] | None = None,
    rows: int | None = None,
    source_rows: int | None = None,
) -> torch.Tensor:
    """Resize an embedding table (or an untied LM head): overlapping rows kept, new rows keep the init.

    Args:
        x: The source table ``(vocab, dim)``.
        target: The target table; rows not filled keep its values.
        index: Source row for each of the first ``len(index)`` target rows (``-1``: keep the init).
        rows: The target's row count, checked when given.
        source_rows: The source's row count, checked when given.
    """
    return _rows(x, target, "vocab", index, rows, source_rows)
