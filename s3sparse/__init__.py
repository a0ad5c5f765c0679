"""s3sparse: the S3 structured sparsity specification and second-order pruning.

Describe a pattern with a View, a BlockSpec and a ScopeSpec (or a named pattern
from :mod:`s3sparse.patterns`), then prune a layer with magnitude, OBD,
SparseGPT or Structured OBS.
"""

from __future__ import annotations

import torch  # noqa: F401  (torch's libraries must be loaded before ours)

from . import _C, ops, reference

__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled extension contains.

    Returns a dict with ``cpu`` (always True), ``cuda`` (CUDA kernels compiled),
    ``cuda_arch_list``, ``cuda_version``, ``torch_version`` (the torch it was
    built against) and ``cxx_standard``.
    """
    return dict(_C.build_info())


__all__ = ["build_info", "ops", "reference", "__version__"]
