"""s3sparse: the S3 structured sparsity specification and second-order pruning.

Describe a pattern with a View, a BlockSpec and a ScopeSpec (or a named pattern
from :mod:`s3sparse.patterns`), then prune a layer with magnitude, OBD,
SparseGPT or Structured OBS.
"""

from __future__ import annotations

import torch  # noqa: F401  (torch's libraries must be loaded before ours)

from ._extension import load_extension as _load_extension

# The compiled extension, checked against the imported torch: built against another
# one, this raises one ExtensionBuildError line with the rebuild command (instead of
# an undefined symbol now or later).
_C = _load_extension()

from . import ops, reference  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled extension contains.

    Returns a dict with ``cpu`` (always True), ``cuda`` (CUDA kernels compiled),
    ``cuda_arch_list``, ``cuda_version``, ``torch_version`` (the torch it was
    built against) and ``cxx_standard``.
    """
    return dict(_C.build_info())


__all__ = ["build_info", "ops", "reference", "__version__"]

# --- specification (view, block, scope, builder) -----------------------------
from . import tensor_ops  # noqa: E402
from .block import BlockCoupling, BlockSpec, SparseBlock  # noqa: E402
from .builder import SparsityBuilder  # noqa: E402
from . import checks  # noqa: E402
from .errors import (  # noqa: E402
    ArgumentError,
    ArgumentIndexError,
    ArgumentTypeError,
    CouplingError,
    ExtensionBuildError,
    NonFiniteError,
    NumericalError,
    S3Error,
    ShapeMismatchError,
    SparseKitError,
    SpecError,
    UnknownNameError,
)
from .scope import ScopeCoupling, ScopeSpec  # noqa: E402
from .view import View  # noqa: E402

__all__ += [
    "View",
    "SparseBlock",
    "BlockSpec",
    "BlockCoupling",
    "ScopeSpec",
    "ScopeCoupling",
    "SparsityBuilder",
    "S3Error",
    "SparseKitError",
    "ArgumentError",
    "ArgumentTypeError",
    "ArgumentIndexError",
    "SpecError",
    "ShapeMismatchError",
    "CouplingError",
    "UnknownNameError",
    "NonFiniteError",
    "NumericalError",
    "ExtensionBuildError",
    "checks",
    "tensor_ops",
]

# --- pruners ---------------------------------------------------------------
from . import pruners  # noqa: E402
from .pruners import *  # noqa: E402,F401,F403

__all__ += pruners.__all__


def __getattr__(name: str):
    # The reference's functional entry points (s3sparse.pruners.functional), once exported here: deprecated.
    if name in pruners.FUNCTIONAL_NAMES:
        return pruners.deprecated_functional(name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- helpers: solvers, named patterns, pictures --------------------------------
# viz imports matplotlib only inside draw_layout, so importing it here is free.
from . import linalg, patterns, viz  # noqa: E402

__all__ += ["linalg", "patterns", "viz"]
