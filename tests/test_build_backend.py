"""The in-tree build backend (_build_backend/s3sparse_build.py) finds the caller's torch.

`pip install .` runs the backend behind pip's build isolation, which hides the
environment's site-packages (a ``sitecustomize`` on ``PYTHONPATH``, and
``PYTHONNOUSERSITE=1``). The backend must still find that torch, and must stop
with one line when there is none. The full `pip install .` round trip takes
minutes: tools/check_pip_install.sh runs it in fresh venvs.
"""

from __future__ import annotations

import importlib.util
import os
import site
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backend():
    spec = importlib.util.spec_from_file_location("s3sparse_build", ROOT / "_build_backend" / "s3sparse_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pip_like_isolation(tmp_path: Path, monkeypatch) -> None:
    """The environment pip's BuildEnvironment gives the backend: site-packages hidden."""
    hidden = [os.path.normcase(p) for p in site.getsitepackages() + [site.getusersitepackages()]]
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import os, sys
            hidden = {hidden!r}
            sys.path[:] = [p for p in sys.path if os.path.normcase(p) not in hidden]
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")


def test_pyproject_uses_the_backend_and_never_requires_torch():
    text = (ROOT / "pyproject.toml").read_text()
    build_system = text.split("[build-system]", 1)[1].split("\n[", 1)[0]
    assert 'build-backend = "s3sparse_build"' in build_system
    assert 'backend-path = ["_build_backend"]' in build_system
    requires = build_system.split("requires", 1)[1].split("]", 1)[0]
    assert "torch" not in requires


def test_behind_build_isolation_the_callers_torch_is_found(backend, tmp_path, monkeypatch):
    _pip_like_isolation(tmp_path, monkeypatch)
    monkeypatch.delenv("S3SPARSE_TORCH_PYTHON", raising=False)
    hidden = backend._probe(sys.executable, clean=False)
    assert hidden.get("error") == "missing", hidden  # the isolation really hides torch
    info = backend.find_torch()  # ... and the backend finds it anyway
    assert info["version"] == torch.__version__
    assert os.path.samefile(info["cmake_prefix"], torch.utils.cmake_prefix_path)
    assert info["cuda"] == (torch.version.cuda or "")
    settings = backend._with_torch({"cmake.define.OTHER": "1"})
    assert settings["cmake.define.S3SPARSE_TORCH_VERSION"] == torch.__version__
    assert settings["cmake.define.OTHER"] == "1"


def test_without_torch_the_build_stops_with_one_line(backend, tmp_path, monkeypatch):
    no_site = tmp_path / "python-without-torch"
    no_site.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # -S: no site-packages, so no torch
    no_site.chmod(no_site.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("S3SPARSE_TORCH_PYTHON", str(no_site))
    for hook in (backend.find_torch, backend.get_requires_for_build_wheel, backend.get_requires_for_build_editable):
        with pytest.raises(SystemExit) as info:
            hook()
        message = str(info.value.code)
        assert "\n" not in message and message.startswith("s3sparse: ")
        assert "install torch first" in message and str(no_site) in message
