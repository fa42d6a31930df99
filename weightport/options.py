"""The options of :func:`weightport.transfer` and :func:`weightport.plan`, declared once.

Each phase of a transfer takes one frozen options object: :class:`OpenOptions` (opening the
source), :class:`PlanOptions` (deciding every tensor's fate) and :class:`ApplyOptions`
(writing into the model). The public functions keep flat keyword arguments, the ecosystem's
convention (``hf_hub_download``, ``from_pretrained``); their signatures and the ``Args`` of
their docstrings are generated from the fields below (:func:`takes_options`), so a new option
is one field here and nothing else.

Values are checked and normalised when an options object is made (``dtype="bfloat16"``
becomes ``torch.bfloat16``, ``require="a.*"`` becomes ``("a.*",)``), before any file is
opened; a bad value raises :class:`~weightport.errors.OptionError` naming the option.
"""

from __future__ import annotations

import difflib
import inspect
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

import torch

from weightport.errors import OptionError, WeightportError
from weightport.mapping.rules import Rule

__all__ = [
    "ApplyOptions",
    "CheckFinite",
    "OnMismatch",
    "OpenOptions",
    "PlanOptions",
    "as_device",
    "split_options",
    "takes_options",
]

OnMismatch = Literal["skip", "adapt", "error"]
CheckFinite = Literal[True, False, "report"]
ON_MISMATCH: tuple[str, ...] = ("skip", "adapt", "error")


def _doc(text: str) -> dict[str, str]:
    return {"doc": " ".join(text.split())}


@dataclass(frozen=True)
class OpenOptions:
    """How the source is opened (see :func:`weightport.open_source`)."""

    checkpoint_key: str | None = field(default=None, metadata=_doc("Key of the weights inside a nested checkpoint."))
    trust_pickle: bool = field(
        default=False, metadata=_doc("Allow full pickle loading of torch files (runs code from the file).")
    )
    check_hash: bool = field(
        default=True,
        metadata=_doc("Verify the hash a zoo file name carries (torchvision weights); ``False`` skips it."),
    )
    expected_sha256: str | None = field(
        default=None,
        metadata=_doc(
            "Refuse a local file whose sha256 differs (checked before it is parsed); the digest is "
            "recorded in ``report.source.provenance``."
        ),
    )
    ema: bool | None = field(
        default=None,
        metadata=_doc(
            "For a checkpoint holding raw weights and an EMA copy (timm's ``state_dict_ema``, ``model_ema`` "
            "…): ``True`` takes the EMA weights (timm's ``use_ema=True``; an error if there are none), "
            "``False`` the raw ones, ``None`` the raw ones where both exist. The summary says which were "
            "taken and that the other exist."
        ),
    )

    def __post_init__(self) -> None:
        if self.ema is not None and not isinstance(self.ema, bool):
            raise OptionError(f"ema must be True, False or None, not {self.ema!r}")


@dataclass(frozen=True)
class PlanOptions:
    """How every target tensor's fate is decided (names and shapes only)."""

    mapping: Any = field(
        default=None, metadata=_doc("A shipped mapping name, a mapping file path, or a :class:`Mapping`.")
    )
    rules: tuple[Rule, ...] = field(default=(), metadata=_doc("Extra rules, applied before the mapping's own."))
    into: str | None = field(
        default=None, metadata=_doc("Load into this submodule (dotted name); the rest of the model is untouched.")
    )
    on_mismatch: OnMismatch = field(
        default="skip",
        metadata=_doc(
            "For a source tensor whose shape differs from its target: ``'skip'`` keeps the target's "
            "initialisation and reports it, ``'adapt'`` uses a shape adapter, ``'error'`` refuses."
        ),
    )
    adapters: tuple[tuple[str, dict[str, Any]], ...] = field(
        default=(),
        metadata=_doc(
            "Shape adapters to try on a mismatch in addition to those ``on_mismatch='adapt'`` tries by "
            "itself (``in_channels``, ``pos_embed``, ``patch_embed``, which keep the weights' meaning). "
            "A resized classifier or vocabulary stays fresh unless asked for: ``adapters=['head']`` keeps "
            "the first rows, ``adapters={'head': {'index': [409, 530, -1]}}`` picks source classes per new "
            "class (``-1``: keep the fresh init). Names or ``{name: params}``."
        ),
    )
    facts: dict[str, int] | None = field(
        default=None,
        metadata=_doc(
            "Model facts that a mapping's op parameters name (``'$heads'``, ``'$kv_heads'``, ``'$head_dim'``, "
            "``'$hidden'``, ``'$vocab'``), e.g. ``{'heads': 32, 'kv_heads': 8}``. Facts not given here are "
            "read from the target model's config or attention modules, then from the source's "
            "``config.json``/``params.json``."
        ),
    )
    strict: bool = field(
        default=False,
        metadata=_doc(
            "Every target tensor must load and every source tensor be used (a key the model's own "
            "``_load_from_state_dict`` consumes, as torch's strict load allows, counts as used)."
        ),
    )
    require: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Glob patterns of target tensors that must load (``'layer1.*'``), relative to ``into`` or as "
            "the model's full names (``'backbone.layer1.*'``); a pattern that matches no target is an "
            "error showing what the names look like."
        ),
    )
    allow_empty: bool = field(
        default=False,
        metadata=_doc(
            "Allow a transfer that loads no tensor at all. By default it raises NothingLoadedError, whose "
            "message names the likely cause (a prefix, a training checkpoint, another architecture)."
        ),
    )

    def __post_init__(self) -> None:
        if self.on_mismatch not in ON_MISMATCH:
            raise OptionError(
                f"on_mismatch must be one of {', '.join(map(repr, ON_MISMATCH))}, not {self.on_mismatch!r}"
            )
        require = (self.require,) if isinstance(self.require, str) else tuple(self.require)
        if not all(isinstance(p, str) for p in require):
            raise OptionError(f"require must be glob patterns (strings), not {self.require!r}")
        rules = tuple(self.rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise OptionError(f"rules must be rules (wp.rename, wp.drop …), not {r!r}")
        if self.into is not None and not isinstance(self.into, str):
            raise OptionError(f"into must be a submodule's dotted name, not {self.into!r}")
        object.__setattr__(self, "facts", _facts(self.facts))
        object.__setattr__(self, "require", require)
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "adapters", _adapters(self.adapters))

    def adapter_calls(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        """``(adapter, fixed params)`` to try on a mismatch, in registry order: the automatic ones
        under ``on_mismatch='adapt'``, and the named ones always."""
        from weightport.mapping.ops import list_adapters

        named = dict(self.adapters)
        auto = set(list_adapters(auto=True)) if self.on_mismatch == "adapt" else set()
        return tuple((n, named.get(n, {})) for n in list_adapters() if n in named or n in auto)


@dataclass(frozen=True)
class ApplyOptions:
    """How the planned values are written into the model."""

    dtype: torch.dtype | None = field(
        default=None, metadata=_doc("Cast floating-point tensors in scope to this dtype (``'bfloat16'`` or a dtype).")
    )
    device: torch.device | None = field(
        default=None, metadata=_doc("Place tensors in scope on this device (the ``map_location`` idea).")
    )
    check_finite: CheckFinite = field(
        default=False,
        metadata=_doc(
            "``True``: refuse source tensors holding NaN or Inf (naming them); ``'report'``: load them and "
            "list them in ``report.warnings``; ``False``: do not look."
        ),
    )
    zero_copy: bool = field(
        default=False,
        metadata=_doc(
            "For tensors of a meta-built target that a memory-mapped file holds with the same dtype and "
            "layout on CPU, assign views of the file's pages instead of owning copies: near-instant and no "
            "extra memory, but the file must not change while the model lives. Writing to those tensors "
            "(training) gives the process private copy-on-write pages; the file is never written. See "
            "docs/performance.md."
        ),
    )
    progress: bool | None = field(
        default=None,
        metadata=_doc(
            "Show a progress bar (tqdm) while reading. ``None``: only when stderr is a terminal and more "
            "than 256 MiB are read; ``False``: never; ``True``: always."
        ),
    )

    timeout: float = field(
        default=600.0,
        metadata=_doc(
            "For a sharded model (DTensor parameters, every rank calling): seconds each step that waits for "
            "the other ranks may wait before every rank raises instead of hanging."
        ),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _dtype(self.dtype))
        object.__setattr__(self, "device", as_device(self.device))
        if self.check_finite not in (True, False, "report"):
            raise OptionError(f"check_finite must be True, False or 'report', not {self.check_finite!r}")
        if self.progress not in (None, True, False):
            raise OptionError(f"progress must be None, True or False, not {self.progress!r}")
        object.__setattr__(self, "zero_copy", bool(self.zero_copy))
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not self.timeout > 0:
            raise OptionError(f"timeout must be a positive number of seconds, not {self.timeout!r}")


PHASES: tuple[type, ...] = (OpenOptions, PlanOptions, ApplyOptions)
_O = TypeVar("_O")


def split_options(
    options: dict[str, Any], phases: Sequence[type] = PHASES, *, where: str = "weightport.transfer"
) -> list[Any]:
    """One options object per phase from flat keyword arguments; an unknown name raises
    :class:`OptionError` with the closest known names."""
    known = {f.name: phase for phase in phases for f in fields(phase)}
    unknown = [k for k in options if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise OptionError(f"{where}() got an unknown option {unknown[0]!r}{hint}")
    return [phase(**{k: v for k, v in options.items() if known[k] is phase}) for phase in phases]


def takes_options(
    *phases: type, returns: Any = inspect.Parameter.empty
) -> Callable[[Callable[..., _O]], Callable[..., _O]]:
    """Give ``fn(*positional, **options)`` the flat keyword-only signature of ``phases``' fields
    and an ``Args`` entry for each in its docstring (where the docstring says ``{options}``)."""

    def decorate(fn: Callable[..., _O]) -> Callable[..., _O]:
        sig = inspect.signature(fn)
        positional = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        keywords = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            for phase in phases
            for f in fields(phase)
        ]
        fn.__signature__ = sig.replace(parameters=[*positional, *keywords])  # type: ignore[attr-defined]
        if fn.__doc__ and "{options}" in fn.__doc__:
            fn.__doc__ = fn.__doc__.replace("{options}", _options_doc(phases).strip())
        return fn

    return decorate


def _options_doc(phases: Iterable[type]) -> str:
    lines = []
    for phase in phases:
        for f in fields(phase):
            text = textwrap.fill(f"{f.name}: {f.metadata.get('doc', '')}", 96, subsequent_indent="    ")
            lines.append(textwrap.indent(text, " " * 8))
    return "\n".join(lines)


def _adapters(value: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    from weightport.mapping.ops import list_adapters

    if isinstance(value, str):
        value = (value,)
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, Iterable):
        pairs = [item if isinstance(item, tuple) and len(item) == 2 else (item, {}) for item in value]
    else:
        raise OptionError(f"adapters must be adapter names or {{name: params}}, not {value!r}")
    known = list_adapters()
    out = []
    for name, params in pairs:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise OptionError(f"adapters: {name!r} is not a shape adapter; {hint}adapters are: {', '.join(known)}")
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise OptionError(f"adapters: the parameters of {name!r} must be a dict, not {params!r}")
        out.append((name, dict(params)))
    return tuple(out)


def _facts(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OptionError(f"facts must be a dict of model facts such as {{'heads': 32}}, not {value!r}")
    for name, number in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise OptionError(f"facts: {name!r} is not a fact name (an identifier such as 'heads')")
        if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
            raise OptionError(f"facts: {name}={number!r} must be a positive integer")
    return dict(value)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise OptionError(f"dtype={dtype!r} is not a torch dtype (try 'float16', 'bfloat16', 'float32')")
    return resolved


def as_device(
    value: torch.device | str | None, argument: str = "device", error: type[WeightportError] = OptionError
) -> torch.device | None:
    """``value`` as a ``torch.device`` (``None`` stays ``None``); anything else raises ``error``
    naming the ``argument`` it was given as."""
    if value is None:
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise error(f"{argument}={value!r} is not a torch device such as 'cpu', 'cuda' or 'cuda:1' ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{argument}={value!r}: no CUDA device is available here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise error(f"{argument}={value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
