"""Loading the compiled extension ``s3sparse._C``, with a guard against another torch.

The extension is C++ compiled against one torch: loaded next to another, it
fails with an undefined symbol (at load, or later, at the first operator whose
symbols moved) or runs against a different ABI. :func:`load_extension` turns
every such case into one :class:`~s3sparse.errors.ExtensionBuildError` (an
``ImportError``) whose message is one line: which torch the extension was built
for, which one is imported, and the command that rebuilds it.

* The library fails to load (``undefined symbol``, a missing ``libc10_cuda.so``...):
  the torch it was built for is read from the library file itself (the string
  ``build_info()`` returns, best effort), the loader's own error is quoted.
* It loads, but ``build_info()['torch_version']`` is not ``torch.__version__``
  (local tags such as ``+cpu`` / ``+cu128`` included: a CPU build next to a
  CUDA torch would silently run without its CUDA kernels).
* It is not there at all (a source tree that was never built).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from typing import Optional

import torch

from .errors import ExtensionBuildError

__all__ = ["load_extension", "REBUILD_COMMAND", "built_torch_version_from_file"]

#: How to rebuild s3sparse against the torch of the current environment.
REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall ."

_HERE = os.path.dirname(os.path.abspath(__file__))
# A NUL-terminated string that is a whole torch version: 2.13.0, 2.13.0+cpu, 2.14.0.dev20250101+cu128...
_VERSION_STRING = re.compile(rb"\x00(\d+\.\d+\.\d+(?:[.a-z0-9]*)(?:\+[A-Za-z0-9.]+)?)\x00")


def _rebuild_hint() -> str:
    return (
        f"`{REBUILD_COMMAND}` in s3sparse's source directory (an editable install: "
        "`pip install --no-build-isolation -e .`)"
    )


def _imported_torch() -> str:
    where = os.path.dirname(getattr(torch, "__file__", "") or "") or "?"
    return f"torch {torch.__version__} (from {where})"


def _library_files() -> list[str]:
    # Where the import system finds s3sparse._C (an editable install keeps it
    # outside the source tree), then any library beside this file.
    found = []
    try:
        spec = importlib.util.find_spec("s3sparse._C")
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            found.append(spec.origin)
    except (ImportError, ValueError):  # a broken install: fall back to the directory
        pass
    here = sorted(glob.glob(os.path.join(_HERE, "_C.*.so")) + glob.glob(os.path.join(_HERE, "_C.*.pyd")))
    return found + [f for f in here if f not in found]


def built_torch_version_from_file(path: str) -> Optional[str]:
    """The torch version the library at ``path`` was built against, read from its bytes, or None.

    Best effort, for when the library cannot be loaded to ask ``build_info()``: the
    version is stored in it as a plain string; None unless exactly one string
    there looks like a torch version.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    found = {m.decode("ascii") for m in _VERSION_STRING.findall(data)}
    return found.pop() if len(found) == 1 else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def mismatch_message(built: Optional[str], library: str, cause: Optional[BaseException] = None) -> str:
    """The one-line message: built for which torch, which torch is imported, what failed, how to rebuild."""
    built_text = f"torch {built}" if built else "another torch (its version could not be read)"
    failed = f"; loading it failed: {_first_line(cause)}" if cause is not None else ""
    return (
        f"s3sparse's compiled extension ({library}) was built against {built_text}, but {_imported_torch()} "
        f"is imported{failed}. Rebuild s3sparse against the imported torch: {_rebuild_hint()}"
    )


def load_extension():
    """Import and return ``s3sparse._C``, checking that it was built against the imported torch.

    Raises:
        ExtensionBuildError: an ``ImportError`` with a one-line message, when the
            extension is missing, fails to load, or was built against another torch.
    """
    try:
        module = importlib.import_module("s3sparse._C")
    except ModuleNotFoundError as exc:
        if exc.name != "s3sparse._C":
            raise
        raise ExtensionBuildError(
            f"s3sparse's compiled extension s3sparse._C is missing from {_HERE} (a source tree that was never "
            f"built, or a build that failed); build it against the imported {_imported_torch()}: {_rebuild_hint()}"
        ) from None
    except (ImportError, OSError) as exc:
        files = _library_files()
        library = os.path.basename(files[0]) if files else "s3sparse._C"
        built = built_torch_version_from_file(files[0]) if len(files) == 1 else None
        error = ExtensionBuildError(mismatch_message(built, library, exc))
        error.original = exc
        raise error from None
    built = str(dict(module.build_info()).get("torch_version", "unknown"))
    if built != "unknown" and built != str(torch.__version__):
        library = os.path.basename(getattr(module, "__file__", "") or "s3sparse._C")
        raise ExtensionBuildError(mismatch_message(built, library))
    return module
