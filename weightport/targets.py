"""Building a target model from a spec: ``package.module:factory(k=v)``, ``timm:NAME``,
``torchvision:NAME``, ``transformers:CLASS`` (architectures only, never weights)."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from weightport.errors import TargetError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_SPEC = re.compile(r"^(?P<head>[^()]+?)\s*(?:\((?P<args>.*)\))?\s*$", re.S)


def register_target(scheme: str, builder: Callable[..., nn.Module]) -> None:
    """Register ``builder(name, *args, **kwargs)`` for ``scheme:NAME(...)`` targets."""
    _BUILDERS[scheme] = builder


def parse_call(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """Split ``head(args)`` into the head and literal arguments (no code is evaluated)."""
    m = _SPEC.match(spec)
    if not m:
        raise TargetError(f"target {spec!r}: expected 'package.module:factory' or 'factory(k=v, …)'")
    head, raw = m["head"].strip(), m["args"]
    if raw is None or not raw.strip():
        return head, (), {}
    try:
        call = ast.parse(f"f({raw})", mode="eval").body
        assert isinstance(call, ast.Call)
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
    except (SyntaxError, ValueError, AssertionError) as e:
        raise TargetError(f"target {spec!r}: arguments must be Python literals, e.g. num_classes=10 ({e})") from None
    return head, args, kwargs


def build_target(spec: str) -> nn.Module:
    """Build the model a TARGET spec names.

    Raises:
        TargetError: the module, factory or zoo architecture cannot be found, or the factory
            fails or returns something that is not an ``nn.Module``.
    """
    head, args, kwargs = parse_call(spec)
    scheme, sep, rest = head.partition(":")
    if not sep or not rest:
        raise TargetError(f"target {spec!r}: expected 'package.module:factory', 'timm:NAME' or 'torchvision:NAME'")
    if scheme in _BUILDERS:
        factory: Callable[..., Any] = lambda *a, **k: _BUILDERS[scheme](rest, *a, **k)  # noqa: E731
    else:
        factory = _import_factory(scheme, rest, spec)
    try:
        model = factory(*args, **kwargs)
    except TargetError:
        raise
    except Exception as e:
        raise TargetError(f"target {spec!r}: building it failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise TargetError(f"target {spec!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _import_factory(module_name: str, attr: str, spec: str) -> Callable[..., Any]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TargetError(f"target {spec!r}: cannot import {module_name!r} ({e})") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"target {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TargetError(f"target {spec!r}: {module_name}:{attr} is not callable")
    return obj


def _torchvision(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    try:
        import torchvision
    except ImportError as e:
        raise TargetError("torchvision targets need torchvision: pip install 'weightport[zoo]'") from e
    if name not in torchvision.models.list_models():
        raise TargetError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    kwargs.setdefault("weights", None)
    return torchvision.models.get_model(name, *args, **kwargs)


def _timm(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise TargetError("timm targets need timm: pip install 'weightport[zoo]'") from e
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise TargetError(f"timm has no model {arch!r}; see timm.list_models()")
    kwargs.setdefault("pretrained", False)
    return timm.create_model(arch, *args, **kwargs)


def _transformers(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """``transformers:CLASS(k=v)`` builds ``CLASS(CLASS.config_class(k=v))`` with random weights; constructor
    arguments such as ``add_pooling_layer`` go to the class."""
    try:
        import transformers
    except ImportError as e:
        raise TargetError("transformers targets need transformers: pip install transformers") from e
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "config_class"):
        raise TargetError(f"transformers has no model class {name!r}")
    init_names = set(inspect.signature(cls).parameters) - {"self", "config", "args", "kwargs"}
    init = {k: v for k, v in kwargs.items() if k in init_names}
    config = cls.config_class(**{k: v for k, v in kwargs.items() if k not in init_names})
    return cls(config, *args, **init).eval()


register_target("torchvision", _torchvision)
register_target("timm", _timm)
register_target("transformers", _transformers)
