"""s3sparse's PEP 517 build backend: scikit-build-core, built against the caller's torch.

s3sparse is a C++/CUDA extension of PyTorch: it must be compiled against the
very torch it will run with. torch is therefore not a build requirement (an
isolated build would pull a multi-GB wheel, possibly another CUDA variant, and
produce an extension that fails next to the user's torch). Instead this
backend, before handing over to scikit-build-core,

1. finds the torch of the interpreter that runs the build: in this process when
   it can import torch (``pip install --no-build-isolation``), else in a clean
   child of the same interpreter (``sys.executable``) without the variables pip's
   build isolation sets to hide the environment (``PYTHONPATH``,
   ``PYTHONNOUSERSITE``), so a plain ``pip install .`` sees the environment's
   torch. ``S3SPARSE_TORCH_PYTHON=/path/to/python`` names another interpreter
   (e.g. for ``python -m build`` or uv, whose isolated builds run in a fresh venv);
2. stops at once, with one line, when there is no usable torch;
3. passes torch's CMake prefix, version and CUDA version to CMake
   (``-DS3SPARSE_TORCH_PREFIX=…`` etc.), so CMake never needs to import torch.

Every hook of scikit-build-core's backend is re-exported; the ones that build
or describe the wheel get the torch settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Optional

from scikit_build_core import build as _backend

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]

MIN_TORCH = (2, 8)
_ISOLATION_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME", "PYTHONSAFEPATH")
_PROBE = r"""
import json, os, sys
try:
    import torch
except ImportError as exc:
    missing = getattr(exc, "name", None) == "torch"
    print(json.dumps({"error": "missing" if missing else "broken", "detail": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
except Exception as exc:
    print(json.dumps({"error": "broken", "detail": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
print(json.dumps({
    "version": torch.__version__,
    "cmake_prefix": torch.utils.cmake_prefix_path,
    "cuda": torch.version.cuda or "",
    "location": os.path.dirname(torch.__file__),
}))
"""


class _NoTorch(SystemExit):
    """Ends the build with one line on stderr (pip shows it as the hook's output)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"s3sparse: {message}")


def _probe(python: str, clean: bool) -> Optional[dict[str, str]]:
    env = dict(os.environ)
    if clean:
        for var in _ISOLATION_VARS:
            env.pop(var, None)
    try:
        out = subprocess.run(
            [python, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=600, check=False
        )
    except OSError as exc:
        raise _NoTorch(f"cannot run the Python named to find torch ({python}): {exc}") from None
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise _NoTorch(f"`import torch` crashed in {python}: {tail}")
    return json.loads(lines[-1])


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def find_torch() -> dict[str, str]:
    """The torch to build against (version, CMake prefix, CUDA version, location)."""
    named = os.environ.get("S3SPARSE_TORCH_PYTHON", "").strip()
    if named:
        attempts = [(named, True)]
    else:
        # As is first (no isolation, or a PYTHONPATH the user set), then without pip's isolation.
        attempts = [(sys.executable, False), (sys.executable, True)]
    info: Optional[dict[str, str]] = None
    for python, clean in attempts:
        info = _probe(python, clean)
        if "error" not in info:
            break
    python = attempts[-1][0]
    assert info is not None
    if info.get("error") == "missing":
        raise _NoTorch(
            f"PyTorch is not installed for {python}; install torch first (e.g. `pip install torch`), "
            "then install s3sparse again"
        )
    if info.get("error") == "broken":
        raise _NoTorch(f"`import torch` fails in {python} ({info['detail']}); repair the torch install first")
    if _version_tuple(info["version"]) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise _NoTorch(f"needs torch >= {need}, found torch {info['version']} for {python}; upgrade torch first")
    return info


def _with_torch(config_settings: Optional[dict[str, Any]]) -> dict[str, Any]:
    info = find_torch()
    settings = dict(config_settings or {})
    defines = {
        "S3SPARSE_TORCH_PREFIX": info["cmake_prefix"],
        "S3SPARSE_TORCH_VERSION": info["version"],
        "S3SPARSE_TORCH_CUDA": info["cuda"],
    }
    for name, value in defines.items():
        settings.setdefault(f"cmake.define.{name}", value)
    print(f"s3sparse: building against torch {info['version']} at {info['location']}", file=sys.stderr)
    return settings


# ---------------------------------------------------------------- PEP 517 / 660 hooks
def get_requires_for_build_wheel(config_settings=None):
    find_torch()  # fail before anything is configured or compiled
    return _backend.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    find_torch()
    return _backend.get_requires_for_build_editable(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _backend.get_requires_for_build_sdist(config_settings)  # an sdist compiles nothing


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _backend.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _backend.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _backend.build_wheel(wheel_directory, _with_torch(config_settings), metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _backend.build_editable(wheel_directory, _with_torch(config_settings), metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    return _backend.build_sdist(sdist_directory, config_settings)
