"""Model facts in op parameters: ``"$heads"``, ``"$kv_heads * $head_dim"``.

A mapping written once for a family (every Llama size) cannot spell the head count of the
rotary permutation or the group count of a fused attention as numbers. Such a parameter names
a *fact* of the model instead: a string naming facts with ``$``, a fact name or integer arithmetic
on fact names (``+ - * //``, parentheses). Planning resolves the facts (from the ``facts=``
option, the target model, the source's config: :mod:`weightport.planning.facts`) and binds
every rule's parameters before routing (:meth:`Rule.bind`), so ops only ever see integers.

The well-known facts, found automatically: ``heads`` (attention heads), ``kv_heads`` (key/value
heads: ``heads`` without grouped-query attention), ``head_dim``, ``hidden`` (model width) and
``vocab`` (embedding rows). Any other name must be given with ``facts=``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from weightport.errors import MappingError

__all__ = ["FACTS", "bind", "check", "is_fact", "refs"]

FACTS: dict[str, str] = {
    "heads": "attention heads (query heads)",
    "kv_heads": "key/value heads (equal to heads without grouped-query attention)",
    "head_dim": "size of one attention head",
    "hidden": "model width (embedding size)",
    "vocab": "vocabulary size (embedding rows)",
}

_NAME = re.compile(r"\$([A-Za-z_]\w*)")
_BARE = re.compile(r"(?<![$\w])[A-Za-z_]\w*")
_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}


def is_fact(value: Any) -> bool:
    """Whether ``value`` is a fact expression (a string naming a fact with ``$``)."""
    return isinstance(value, str) and "$" in value


@lru_cache(maxsize=512)
def _parse(text: str) -> tuple[ast.expr, frozenset[str]]:
    """The expression tree of ``text`` and the fact names it uses; raises ``ValueError`` with why."""
    names = frozenset(_NAME.findall(text))
    if not names:
        raise ValueError("names no fact (write $heads, $kv_heads …)")
    try:
        tree = ast.parse(_NAME.sub(r"\1", text), mode="eval").body
    except SyntaxError:
        raise ValueError("is not an expression of facts and integers") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            ok = type(node.value) is int
        elif isinstance(node, ast.UnaryOp):
            ok = isinstance(node.op, ast.USub)
        else:
            ok = isinstance(node, (ast.BinOp, ast.Name, ast.Load, ast.USub, *_OPS))
        if not ok:
            raise ValueError(f"uses {type(node).__name__}; only + - * // on facts and integers are allowed")
    bare = _BARE.search(text)
    if bare:
        raise ValueError(f"names {bare.group()!r} without '$'; facts are written ${bare.group()}")
    return tree, names


def check(value: Any, where: str) -> None:
    """Raise :class:`MappingError` at ``where`` if ``value`` (or an item of a list) is a malformed fact."""
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if is_fact(item):
            try:
                _parse(item.strip())
            except ValueError as e:
                raise MappingError(f"{where}: {item!r} {e}") from None


def refs(value: Any) -> frozenset[str]:
    """The fact names ``value`` (or the items of a list, or the values of a dict) uses."""
    if isinstance(value, Mapping):
        return frozenset().union(*map(refs, value.values())) if value else frozenset()
    if isinstance(value, (list, tuple)):
        return frozenset().union(*map(refs, value)) if value else frozenset()
    return _parse(value.strip())[1] if is_fact(value) else frozenset()


def bind(value: Any, facts: Mapping[str, int]) -> Any:
    """``value`` with every fact expression evaluated (lists and dicts item by item).

    Raises:
        MappingError: the expression divides by zero or gives a non-integer.
    """
    if isinstance(value, Mapping):
        return {k: bind(v, facts) for k, v in value.items()}
    if isinstance(value, list):
        return [bind(v, facts) for v in value]
    if isinstance(value, tuple):
        return tuple(bind(v, facts) for v in value)
    if not is_fact(value):
        return value
    tree, _ = _parse(value.strip())
    try:
        return _eval(tree, facts)
    except ZeroDivisionError:
        raise MappingError(f"{value!r} divides by zero with {dict(facts)}") from None


def _eval(node: ast.expr, facts: Mapping[str, int]) -> int:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int)
        return node.value
    if isinstance(node, ast.Name):
        return int(facts[node.id])
    if isinstance(node, ast.UnaryOp):
        return -_eval(node.operand, facts)
    assert isinstance(node, ast.BinOp)
    return _OPS[type(node.op)](_eval(node.left, facts), _eval(node.right, facts))  # type: ignore[no-any-return]
