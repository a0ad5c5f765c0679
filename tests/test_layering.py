"""The package's modules import one another in one direction only.

Every module of s3sparse imports on its own, and the imports between them —
read from the source with ``ast``, function-level imports included, since a
deferred import closes a circle just the same — form no cycle. The packed
execution layer (``s3sparse.sparse``) never imports the model pipeline
(``s3sparse.llm``), and the layers below both (the specification, the
pruners, the ops) import neither.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
from typing import Dict, List, Set

import pytest

import s3sparse

ROOT = pathlib.Path(s3sparse.__file__).resolve().parent


def _modules() -> Dict[str, pathlib.Path]:
    """Every Python module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()
COMPILED = {"s3sparse._C"}  # the extension: a module, but no Python source


def _targets(module: str, path: pathlib.Path, node: ast.AST) -> Set[str]:
    """The s3sparse modules one import statement of ``module`` imports."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == "s3sparse"}
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "s3sparse":
        return set()
    known = set(MODULES) | COMPILED
    # `from . import ops` imports the submodule; `from .errors import S3Error` the module itself.
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the other s3sparse modules its source imports (anywhere in the file)."""
    graph = {}
    for module, path in MODULES.items():
        edges: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(module, path, node)
        graph[module] = {m for m in edges if m in MODULES and m != module}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]`` when there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    assert importlib.import_module(module).__name__ == module


def test_the_import_graph_sees_every_kind_of_import():
    """The graph reads plain, relative, submodule and function-level imports (a check of the checker)."""
    graph = import_graph()
    assert "s3sparse.ops" in graph["s3sparse.view"]  # from . import ops
    assert "s3sparse.errors" in graph["s3sparse.view"]  # from .errors import ...
    assert "s3sparse.llm.recipe" in graph["s3sparse.llm.cli"]  # imported inside a function
    assert "s3sparse.llm.cli" in graph["s3sparse.__main__"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_lower_layers_do_not_import_the_layers_above():
    """sparse/ never imports llm/; nothing below sparse/ and llm/ imports either."""
    graph = import_graph()
    top = ("s3sparse.sparse", "s3sparse.llm")

    def inside(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")

    wrong = []
    for module, deps in sorted(graph.items()):
        if inside(module, "s3sparse.llm") or module == "s3sparse.__main__":
            continue
        above = ("s3sparse.llm",) if inside(module, "s3sparse.sparse") else top
        wrong += [f"{module} -> {dep}" for dep in sorted(deps) if any(inside(dep, p) for p in above)]
    assert not wrong, wrong
