"""The package's shape: which module imports which, and how large a module may grow.

The import graph is read from the source (every ``import`` statement, at module level or inside
a function: a lazy import is still a dependency; those under ``if TYPE_CHECKING:`` are left out,
they never run). An import of ``a.b.c`` is an edge to ``a.b.c`` alone, not to the packages above it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "weightport"
MAX_LINES = 500


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` by its dotted name."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except in the body of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
            continue
        yield from _imports(child)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """``name``, or the longest enclosing package of it that is a module of ours."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(stmt: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    if isinstance(stmt, ast.Import):
        names = [alias.name for alias in stmt.names]
    else:
        base = stmt.module or ""
        if stmt.level:
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(stmt.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        # ``from a import b`` imports the module ``a.b`` when there is one, else a name from ``a``
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in stmt.names]
    found = {_known(n, modules) for n in names if n == "weightport" or n.startswith("weightport.")}
    return {t for t in found if t is not None and t != module}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``module -> modules of weightport it imports``, for every module of the package."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set().union(*(_targets(s, name, is_package, modules) for s in _imports(tree)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# -- the checker checks what it claims --------------------------------------------------------------


def test_cycles_finds_components_and_only_them():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_counts_lazy_imports_and_leaves_type_checking_out(tmp_path):
    package = tmp_path / "weightport"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import b\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from weightport.sub import c\n"
        "def f():\n    from weightport.sub.b import x\n"
    )
    (package / "sub" / "b.py").write_text("import weightport.a\n")
    (package / "sub" / "c.py").write_text("from ..sub import b\nfrom .. import a\n")
    graph = import_graph(package)
    assert graph["weightport.a"] == {"weightport.sub.b"}
    assert graph["weightport.sub"] == {"weightport.sub.b"}
    assert graph["weightport.sub.c"] == {"weightport.sub.b", "weightport.a"}
    assert cycles(graph) == [["weightport.a", "weightport.sub.b"]]


# -- the package --------------------------------------------------------------------------------------


def test_no_import_cycle_inside_weightport():
    assert cycles(import_graph()) == []


def test_planning_and_applying_depend_one_way():
    graph = import_graph()
    planning = [m for m in graph if _under(m, "weightport.planning")]
    assert "weightport.apply" in graph["weightport.planning.build"]  # the builder hands the plan its applier
    assert not [m for m in planning if m != "weightport.planning.build" and "weightport.apply" in graph[m]]
    assert graph["weightport.apply"] & set(planning) == {"weightport.planning.data"}  # consumes plans only
    assert graph["weightport.planning"] == set()  # the package imports none of its modules


def test_no_module_is_named_like_a_public_function():
    import importlib.util

    import weightport as wp

    for name in wp.__all__:
        if callable(getattr(wp, name)) and not isinstance(getattr(wp, name), type):
            assert importlib.util.find_spec(f"weightport.{name}") is None, name


def test_modules_stay_small():
    too_large = {}
    for name, path in _modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            too_large[name] = lines
    assert too_large == {}


# -- the scheme registry ---------------------------------------------------------------------------


@pytest.mark.slow  # a fresh interpreter
def test_importing_weightport_imports_no_zoo():
    zoo = ("weightport.sources.zoo_", "timm", "huggingface_hub", "torchvision")
    code = f"import sys, weightport; print(sorted(m for m in sys.modules if m.startswith({zoo!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_every_listed_scheme_has_an_opener():
    from weightport.sources import list_schemes
    from weightport.sources._schemes import find_opener

    assert {"checkpoint", "hf", "timm", "torchvision"} <= set(list_schemes())
    for name in list_schemes():
        assert callable(find_opener(name)), name
    assert find_opener("nosuchscheme") is None
