"""The package keeps its house style: every module says its one job, no function runs past ~100 lines.

Read from the source with ``ast`` (nothing is imported): every ``.py`` file
under ``s3sparse/`` opens with a module docstring, and every function or
method, nested ones included, spans at most ``MAX_FUNCTION_LINES`` lines
(signature, docstring and body, decorators excluded). A longer one is to be
split into helpers that each do one job.
"""

from __future__ import annotations

import ast
import pathlib
from typing import List

import s3sparse

ROOT = pathlib.Path(s3sparse.__file__).resolve().parent

# The project's rule is "under ~100 lines"; the guard leaves a little slack.
MAX_FUNCTION_LINES = 110
# Functions allowed to be longer, as "relative/path.py:qualified.name" -> why. None so far.
LONG_FUNCTIONS_ALLOWED: dict = {}


def _sources() -> List[pathlib.Path]:
    """Every Python source file of the package."""
    return sorted(ROOT.rglob("*.py"))


def long_functions(source: str, filename: str, limit: int) -> List[str]:
    """``"filename:qualified.name (N lines)"`` for every function of ``source`` longer than ``limit`` lines."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > limit:
                        found.append(f"{filename}:{name} ({lines} lines)")
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source, filename), "")
    return found


def test_the_length_check_sees_methods_and_nested_functions():
    """A check of the checker: top-level, method and nested functions are all measured."""
    body = "\n".join(["    x = 1"] * 5)
    source = (
        f"def top():\n{body}\n"
        f"class C:\n    def method(self):\n{body.replace('    ', '        ')}\n"
        f"def outer():\n    def inner():\n{body.replace('    ', '        ')}\n    return inner\n"
        "def short():\n    pass\n"
    )
    found = long_functions(source, "m.py", 4)
    assert found == ["m.py:top (6 lines)", "m.py:C.method (6 lines)", "m.py:outer (8 lines)", "m.py:outer.inner (6 lines)"]


def test_no_function_is_too_long():
    offenders = []
    for path in _sources():
        rel = path.relative_to(ROOT.parent).as_posix()
        for entry in long_functions(path.read_text(encoding="utf-8"), rel, MAX_FUNCTION_LINES):
            if entry.split(" (")[0] not in LONG_FUNCTIONS_ALLOWED:
                offenders.append(entry)
    assert not offenders, (
        f"functions over {MAX_FUNCTION_LINES} lines; split them into helpers that each do one job: " + ", ".join(offenders)
    )


def test_every_module_has_a_docstring():
    missing = [
        path.relative_to(ROOT.parent).as_posix()
        for path in _sources()
        if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    ]
    assert not missing, "modules without a docstring saying their one job: " + ", ".join(missing)
