"""Every ```python block of README.md runs on its own.

Each block is executed in a fresh namespace (nothing carried over from the blocks
before it), on one thread (conftest.py), from a scratch directory, so a block that
relies on a name defined in another block, or on a file of the source tree, fails;
and a block that writes into the current directory (not a temporary one) fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4, [line for line, _ in BLOCKS]
    # No block was missed by the fence pattern (e.g. indented or with a trailing attribute).
    assert README.read_text(encoding="utf-8").count("```python") == len(BLOCKS)


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs_on_its_own(line, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    out = capsys.readouterr().out
    # A reader runs the blocks from wherever they are: nothing may land in the current directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == [], \
        f"README.md:{line} wrote into the current directory; write into tempfile.mkdtemp()"
    if "progress_fn=" in code:
        assert out.strip(), f"README.md:{line} passes a progress_fn but printed nothing"
    if "print(" in code:
        assert out.strip(), f"README.md:{line} calls print but printed nothing"


def test_the_readme_shows_a_pruner_printing_progress(capsys):
    text = README.read_text(encoding="utf-8")
    assert "progress_fn" in text
    progress = [(line, code) for line, code in BLOCKS if "progress_fn=print" in code]
    assert progress, "no README block shows a pruner printing its progress"
    line, code = progress[0]
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "SparseGPT: columns" in out and "true OBS: rows chunk" in out, out
