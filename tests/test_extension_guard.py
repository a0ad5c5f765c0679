"""``import s3sparse`` next to another torch than the extension was built for: one clear line.

Each case runs ``import s3sparse`` in a fresh interpreter, with the torch version
or the extension's loading tampered with first, and checks the error's last line
(the one a user reads): an ``ImportError`` that is an ``S3Error``, naming the
torch the extension was built for, the imported torch, and the rebuild command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import s3sparse

REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall ."

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(s3sparse.__file__)))
BUILT = s3sparse.build_info()["torch_version"]

_REPORT = """
try:
    import s3sparse
except ImportError as exc:
    from s3sparse.errors import ExtensionBuildError, S3Error  # importable without the extension
    assert isinstance(exc, ExtensionBuildError) and isinstance(exc, S3Error), type(exc).__mro__
    assert exc.__context__ is None or exc.__suppress_context__, "the loader's own traceback is not chained in"
    print("ERROR", str(exc))
else:
    print("IMPORTED", s3sparse.build_info()["torch_version"])
"""


def _import_after(setup: str) -> str:
    """What ``import s3sparse`` prints in a fresh interpreter after running ``setup``."""
    code = textwrap.dedent(setup) + _REPORT
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, f"not one line: {out.stdout!r}"
    return lines[0]


def _fail_loading(exc: str) -> str:
    """Setup code: loading s3sparse._C raises ``exc`` (as the dynamic loader would): the module
    is found where it is (its file stays readable), its loader fails."""
    return f"""
    import importlib.abc, sys

    class _FailingLoader(importlib.abc.Loader):
        def create_module(self, spec):
            raise {exc}

        def exec_module(self, module):
            pass

    class _Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "s3sparse._C":
                return None
            for finder in sys.meta_path:
                spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
                if spec is not None:
                    spec.loader = _FailingLoader()
                    return spec
            raise {exc}

    sys.meta_path.insert(0, _Refuse())
    """


def test_matching_torch_imports():
    assert _import_after("") == f"IMPORTED {BUILT}"


def test_a_version_mismatch_after_load_is_one_clear_line():
    """The library loads but says it was built for another torch: refused (today it imports)."""
    line = _import_after("""
    import torch
    torch.__version__ = "2.8.1+cu126"
    """)
    assert line.startswith("ERROR "), line
    assert f"built against torch {BUILT}" in line
    assert "but torch 2.8.1+cu126 (from " in line and "is imported" in line
    assert REBUILD_COMMAND in line


def test_a_local_tag_mismatch_is_refused_too():
    """A CPU build next to a CUDA torch of the same version would silently lack its CUDA kernels."""
    base = BUILT.split("+")[0]
    line = _import_after(f"""
    import torch
    torch.__version__ = "{base}+cu999"
    """)
    assert line.startswith("ERROR ") and f"{base}+cu999" in line and REBUILD_COMMAND in line


def test_an_undefined_symbol_at_load_is_one_clear_line():
    """The loader's error (an undefined torch symbol) becomes one line naming both torches and the fix."""
    symbol = "_ZN3c1017RegisterOperatorsD1Ev"
    line = _import_after(_fail_loading(f'ImportError("/x/s3sparse/_C.so: undefined symbol: {symbol}")'))
    assert line.startswith("ERROR "), line
    assert f"built against torch {BUILT}" in line, "the version is read from the library file"
    assert "is imported" in line and f"undefined symbol: {symbol}" in line
    assert REBUILD_COMMAND in line


def test_a_missing_extension_says_how_to_build_it():
    line = _import_after(_fail_loading('ModuleNotFoundError("No module named \'s3sparse._C\'", name="s3sparse._C")'))
    assert line.startswith("ERROR ") and "missing" in line and REBUILD_COMMAND in line


def test_the_built_version_is_read_from_the_library_file(tmp_path):
    from s3sparse._extension import REBUILD_COMMAND as command, built_torch_version_from_file, mismatch_message

    assert command == REBUILD_COMMAND
    library = s3sparse._C.__file__  # beside the package, or elsewhere for an editable install
    assert built_torch_version_from_file(library) == BUILT
    ambiguous = tmp_path / "two.so"
    ambiguous.write_bytes(b"\x002.8.0+cpu\x00torch_version\x002.9.1\x00")
    assert built_torch_version_from_file(str(ambiguous)) is None
    assert built_torch_version_from_file(str(tmp_path / "absent.so")) is None
    message = mismatch_message(None, "_C.so", ImportError("undefined symbol: x\nmore"))
    assert "another torch (its version could not be read)" in message and "\n" not in message
