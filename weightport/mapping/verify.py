"""Verifying a mapping by numbers: build both architectures, port, compare outputs and activations.

``weightport verify MAPPING`` calls :func:`verify`. For each ``source -> target`` pair
(by default every pair in the mapping file's ``verified`` list) it

1. builds the source architecture with random weights (norm weights and BatchNorm
   statistics away from 1 and 0 too, so a swapped or missed tensor shows in the outputs)
   and takes its checkpoint in the zoo's own file format (``save_pretrained`` for
   transformers); both models are built under ``init_empty``, no time goes to initialiser;
2. ports that checkpoint into the target architecture with the mapping (``strict=True``:
   every target tensor loaded, every source tensor used or dropped);
3. runs both models in eval mode on one input of the model's kind (token ids for a model
   whose input is an embedding, images otherwise, or a given tensor) and compares the final
   outputs *and* the activations of every pair of corresponding modules (see
   :mod:`weightport.mapping._activations`): a swap anywhere fails, and the first module that
   diverges is named;
4. when the outputs differ and corresponding norm modules have different eps, runs the target
   again with the source's eps: if that agrees, the difference is reported with its cause;
5. maps the ported weights back through ``mapping.inverse()`` and checks that every
   source tensor comes back bit for bit (where the mapping inverts; otherwise it says why).

``numerics=False`` stops after planning: both models are built on the meta device and
only names and shapes are checked (cheap even for ViT-H).

Importing this module builds and runs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping as AnyMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightport.errors import MappingError, OpError, TargetError
from weightport.mapping._activations import (
    ModuleDiff,
    compare_modules,
    corresponding,
    describe_eps,
    eps_differences,
    source_eps,
)
from weightport.mapping._verify_models import (
    build,
    build_light,
    checkpoint_state,
    make_input,
    memory_names,
    meta_state,
    outputs,
    randomize,
)
from weightport.mapping.core import Mapping
from weightport.mapping.ops import fuse as _cat
from weightport.mapping.rules import Split

__all__ = [
    "DEFAULT_ATOL",
    "ModuleDiff",
    "Verification",
    "build",
    "checkpoint_state",
    "map_state_dict",
    "pairs",
    "verify",
    "verify_all",
]

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4
_WEIGHT_FILES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz", ".h5", ".gguf")


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
            not run or the mapping does not invert (``round_trip_note`` says why).
        seconds: Wall time of the whole check.
        atol: The tolerance in effect: ``atol=``, else the mapping's ``atol``, else 1e-4. Module
            activations are held to ``atol * max(1, largest activation)``.
        modules: Corresponding modules compared, in the source's execution order.
        first_divergence: The first of ``modules`` whose output differs beyond the tolerance.
        cause: A known numerical cause that explains the difference (norm eps that differ
            between the architectures), when running the target with the source's values agrees.
        explained_diff: The final output difference with that cause removed.
        round_trip_note: Why the round trip was not checked, when it was not.
        input: What both models were run on.
    """

    mapping: str
    source: str
    target: str
    loaded: int
    max_abs_diff: float | None
    max_rel_diff: float | None
    round_trip: bool | None
    seconds: float
    atol: float = DEFAULT_ATOL
    modules: tuple[ModuleDiff, ...] = field(default=())
    first_divergence: ModuleDiff | None = None
    cause: str | None = None
    explained_diff: float | None = None
    round_trip_note: str | None = None
    input: str | None = None

    def ok(self, atol: float | None = None) -> bool:
        """Names line up and (where run) outputs and module activations agree within ``atol``
        (default :attr:`atol`), or differ only by an explained cause, and the round trip is exact."""
        tol = self.atol if atol is None else atol
        if self.round_trip is False:
            return False
        if self.max_abs_diff is None:
            return True
        if self.explained_diff is not None:
            return self.explained_diff <= tol
        return self.max_abs_diff <= tol and all(m.output_diff <= tol * max(1.0, m.scale) for m in self.modules)


def pairs(mapping: Mapping) -> list[tuple[str, str]]:
    """The ``(source, target)`` specs a mapping's ``verified`` list names (else its source/target)."""
    out = []
    both = mapping.source and mapping.target
    for entry in mapping.verified or ([f"{mapping.source} -> {mapping.target}"] if both else []):
        src, sep, dst = entry.partition(" -> ")
        if not sep or not src.strip() or not dst.strip():
            raise MappingError(f"{_where(mapping)}: verified entry {entry!r} is not 'SOURCE -> TARGET'")
        out.append((src.strip(), dst.strip()))
    return out


def verify_all(mapping: str | Mapping, *, numerics: bool = True, **options: Any) -> list[Verification]:
    """:func:`verify` every pair of the mapping's ``verified`` list (else its ``source``/``target``)."""
    m = _load(mapping)
    if not m.verified:
        return [verify(m, numerics=numerics, **options)]  # the mapping's source and target
    listed = f"the 'verified' list of {_where(m)}"
    return [_verify(m, s, t, (listed, listed), numerics=numerics, **options) for s, t in pairs(m)]


def verify(
    mapping: str | Mapping,
    *,
    source: str | None = None,
    target: str | None = None,
    numerics: bool = True,
    input_size: tuple[int, ...] | None = None,
    batch: int = 2,
    seed: int = 0,
    atol: float | None = None,
    input: torch.Tensor | str | None = None,
) -> Verification:
    """Port a randomly initialised ``source`` architecture into ``target`` and measure the difference.

    Args:
        mapping: A shipped mapping name, a file, or a :class:`Mapping`.
        source: Source architecture spec (``torchvision:NAME``, ``timm:NAME(k=v)``,
            ``transformers:CLASS(config_key=v)``, ``package.module:factory``); default: the first
            ``verified`` pair, else the mapping's ``source``.
        target: Target architecture spec; default as for ``source`` (one may be given alone).
        numerics: Run both models and the round trip; ``False``: check names and shapes only.
        input_size: Input shape without the batch: ``(3, 64, 64)`` for images (default: the
            target's ``pretrained_cfg`` input size, else ``(3, 224, 224)``), ``(seq_len,)`` for
            token models (default 16).
        batch: Batch size of the random input.
        seed: Seed for weights and input.
        atol: Largest output difference accepted; default the mapping's ``atol``, else 1e-4.
        input: The input to run instead of a random one: a tensor (with its batch dimension) or
            a .pt/.safetensors/.npy file holding one.

    Returns:
        A :class:`Verification`.

    Raises:
        WeightportError: the mapping or an architecture cannot be loaded or built (the message
            names the field or argument the spec came from), or the port fails its strictness
            check (the message names the tensors).
    """
    m = _load(mapping)
    source, target, origins = _specs(m, source, target)
    return _verify(
        m,
        source,
        target,
        origins,
        numerics=numerics,
        input_size=input_size,
        batch=batch,
        seed=seed,
        atol=atol,
        input=input,
    )


def _verify(
    m: Mapping,
    source: str,
    target: str,
    origins: tuple[str, str],
    *,
    numerics: bool = True,
    input_size: tuple[int, ...] | None = None,
    batch: int = 2,
    seed: int = 0,
    atol: float | None = None,
    input: torch.Tensor | str | None = None,
) -> Verification:
    start = time.perf_counter()
    tol = atol if atol is not None else (m.atol if m.atol is not None else DEFAULT_ATOL)
    from weightport.api import transfer

    torch.manual_seed(seed)
    if not numerics:
        src_model = _built(source, origins[0], "source", shapes_only=True)
        dst_model = _built(target, origins[1], "target", shapes_only=True)
        from weightport.api import plan

        planned = plan(meta_state(src_model), dst_model, mapping=m, strict=True)
        loaded = len(planned.recipes)
        return Verification(m.name or "?", source, target, loaded, None, None, None, time.perf_counter() - start, tol)
    # no costly initialisation: the source gets random values, the target is all loaded
    src_model, dst_model = _built(source, origins[0], "source").eval(), _built(target, origins[1], "target").eval()
    randomize(src_model, seed)
    state = checkpoint_state(src_model)
    report = transfer(state, dst_model, mapping=m, strict=True)
    x, described = make_input(src_model, dst_model, input_size=input_size, batch=batch, seed=seed, given=input)
    modules = corresponding(m, memory_names(src_model), src_model, dst_model)
    diff, rel, table = _compare(src_model, dst_model, x, modules, tol)
    first = next((row for row in table if not row.ok), None)
    cause = explained = None
    found = eps_differences(src_model, dst_model, modules)
    if found and (diff > tol or first is not None):
        with source_eps(dst_model, found):
            again, _, rows = _compare(src_model, dst_model, x, modules, tol)
        if again <= tol and all(row.ok for row in rows):
            cause, explained = describe_eps(found), again
    from weightport.planning.facts import model_facts

    bound = m.bind(model_facts(dst_model)) if m.facts() else m  # the facts the port above resolved
    trip, note = _round_trip(state, bound, checkpoint_state(dst_model))
    return Verification(
        m.name or "?",
        source,
        target,
        len(report.entries) - len(report.fresh),
        diff,
        rel,
        trip,
        time.perf_counter() - start,
        tol,
        tuple(table),
        first,
        cause,
        explained,
        note,
        described,
    )


def _compare(
    a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, modules: list[tuple[str, str]], atol: float
) -> tuple[float, float, list[ModuleDiff]]:
    ya, yb, table = compare_modules(a, b, x, modules, atol)
    oa, ob = outputs(ya, yb)
    diff = float((oa.float() - ob.float()).abs().max())
    scale = float(oa.float().abs().max()) or 1.0
    return diff, diff / scale, table


# -- which architectures -------------------------------------------------------------------------


def _where(m: Mapping) -> str:
    return str(m.path or m.name or "the mapping")


def _specs(m: Mapping, source: str | None, target: str | None) -> tuple[str, str, tuple[str, str]]:
    """The pair to verify and, for error messages, where each spec came from."""
    where = _where(m)
    found = pairs(m) if (source is None or target is None) and m.verified else []
    origins = ["source=/--source", "target=/--target"]
    if source is None:
        source, origins[0] = (found[0][0], f"the 'verified' list of {where}") if found else (m.source, "")
        origins[0] = origins[0] or f"field 'source' of {where}"
        if not source:
            raise MappingError(_no_source(m, where))
        if m.source and source == m.source and _is_file(source):
            raise MappingError(
                f"field 'source' of {where} is the weights file {source!r}, not an architecture; pass "
                "--source ARCH (source= in Python), the architecture those weights belong to, e.g. torchvision:NAME"
            )
    if target is None:
        target, origins[1] = (found[0][1], f"the 'verified' list of {where}") if found else (m.target, "")
        origins[1] = origins[1] or f"field 'target' of {where}"
        if not target:
            raise MappingError(f"{where} has no field 'target'; pass --target ARCH (target= in Python)")
    return source, target, (origins[0], origins[1])


def _no_source(m: Mapping, where: str) -> str:
    if m.source_file:
        return (
            f"{where} was suggested from the weights file {m.source_file!r} (field 'source_file') and names no "
            "source architecture (field 'source'); pass --source ARCH (source= in Python), the architecture "
            "those weights belong to, e.g. torchvision:NAME"
        )
    return f"{where} has no field 'source'; pass --source ARCH (source= in Python)"


def _is_file(spec: str) -> bool:
    try:
        return Path(spec).suffix.lower() in _WEIGHT_FILES or Path(spec).is_file()
    except OSError:  # a spec longer than a file name may be (ENAMETOOLONG) names no file
        return False


def _built(spec: str, origin: str, side: str, *, shapes_only: bool = False) -> torch.nn.Module:
    """The architecture ``spec`` names; a failure says which field or argument gave the spec."""
    if _is_file(spec):
        raise TargetError(
            f"{origin}: {spec!r} is a weights file, not a {side} architecture; verify builds architectures "
            "(torchvision:NAME, timm:NAME(k=v), transformers:CLASS(k=v), package.module:factory)"
        )
    try:
        return build_light(spec, shapes_only=shapes_only)
    except TargetError as e:
        text = str(e).removeprefix(f"target {spec!r}: ")
        raise TargetError(f"{side} architecture {spec!r} ({origin}): {text}") from e


def _round_trip(
    state: dict[str, torch.Tensor], mapping: Mapping, ported: dict[str, torch.Tensor]
) -> tuple[bool | None, str | None]:
    """Whether source -> target -> source is bit-identical, or why that could not be checked."""
    try:
        inverse = mapping.inverse()
        prefix = mapping.source_prefix or ""
        kept = {
            k[len(prefix) :] if prefix and k.startswith(prefix) else k: v
            for k, v in state.items()
            if not mapping.resolve(k).dropped
        }
        forward = map_state_dict(state, mapping, like=ported)
        back = map_state_dict(forward, inverse, like=kept)
    except (MappingError, OpError) as e:
        return None, f"the mapping does not invert: {e}"
    return set(back) == set(kept) and all(torch.equal(back[k], v) for k, v in kept.items()), None


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
            shape, adapters, ``pad``); without it such ops raise :class:`OpError`. A split without
            sizes takes uneven ones from these targets, as planning does (q, k, v under GQA).

    Raises:
        MappingError: two source tensors write one name, or a fuse misses parts.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, tuple[int, int, int, dict[int, torch.Tensor]]] = {}
    for key, tensor in state.items():
        rule, outputs = mapping.resolve(key)
        if like is not None and isinstance(rule, Split):  # uneven parts: the sizes of the targets in ``like``
            outputs = rule.fit(
                outputs, tensor.shape, [like[o.target].shape if o.target in like else None for o in outputs]
            )
        for o in outputs:
            x = tensor
            for op in o.ops:
                x = op.run(x, like.get(o.target) if like is not None else None)
            if o.part is None:
                _put(out, o.target, x, key)
            else:
                parts.setdefault(o.target, (o.dim, o.groups, o.part[1], {}))[3][o.part[0]] = x
    for name, (dim, groups, count, got) in parts.items():
        missing = [i + 1 for i in range(count) if i not in got]
        if missing:
            raise MappingError(f"fuse into {name!r}: part(s) {missing} of {count} are not in the state dict")
        _put(out, name, _cat([got[i] for i in range(count)], dim, groups), name)
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
