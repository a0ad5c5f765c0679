"""Pruners: magnitude, OBD, SparseGPT, shared-C OBS and True OBS on any S3 pattern,
and :func:`refine_mask` (exact swap refinement of any pruned layer's mask).

Each method is one class with a frozen options dataclass (its defaults and what
it can do, see :mod:`.method`): :class:`Magnitude`, :class:`OBD`,
:class:`SparseGPT`, :class:`SharedOBS`, :class:`TrueOBS`. The reference API —
``prune_magnitude``, ``prune_obd``, ``prune_sparsegpt``,
``StructuredOBS(scope, H).prune(...)`` / ``.prune_true_obs(...)`` — calls them.
The reference implementation's functional entry points (``magnitude``,
``obd_prune``, ``sparsegpt_prune``, ``sparsegpt_coupled_24``,
``sparsegpt_block16``: a weight in, a pruned copy out) are a compatibility
layer in :mod:`s3sparse.pruners.functional`; reaching them here or on the
top-level package still works, with a ``DeprecationWarning``.
"""

import warnings

from .hessian import HessianAccumulator, compute_hessian, output_error
from .magnitude import Magnitude, MagnitudeOptions, prune_magnitude
from .method import MethodOptions, PruningMethod
from .obd import OBD, OBDOptions, prune_obd
from .obs import SharedOBS, SharedOBSOptions
from .refine import RefineResult, refine_mask
from .sparsegpt import SparseGPT, SparseGPTOptions, prune_sparsegpt
from .structured_obs import StructuredOBS
from .true_obs import TrueOBS, TrueOBSOptions

__all__ = [
    "HessianAccumulator",
    "Magnitude",
    "MagnitudeOptions",
    "MethodOptions",
    "OBD",
    "OBDOptions",
    "PruningMethod",
    "RefineResult",
    "SharedOBS",
    "SharedOBSOptions",
    "SparseGPT",
    "SparseGPTOptions",
    "StructuredOBS",
    "TrueOBS",
    "TrueOBSOptions",
    "compute_hessian",
    "output_error",
    "prune_magnitude",
    "prune_obd",
    "prune_sparsegpt",
    "refine_mask",
]

#: The compatibility layer's names, once exported here and on ``s3sparse``.
FUNCTIONAL_NAMES = ("magnitude", "obd_prune", "sparsegpt_prune", "sparsegpt_coupled_24", "sparsegpt_block16")


def deprecated_functional(name: str, where: str, stacklevel: int = 3):
    """``s3sparse.pruners.functional.<name>``, with a DeprecationWarning for reaching it as ``<where>.<name>``."""
    warnings.warn(
        f"{where}.{name} is deprecated: the reference implementation's functional entry points live in "
        f"s3sparse.pruners.functional (`from s3sparse.pruners.functional import {name}`); "
        "or prune through a pattern with prune_magnitude / prune_obd / prune_sparsegpt",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    from . import functional

    return getattr(functional, name)


def __getattr__(name: str):
    if name in FUNCTIONAL_NAMES:
        return deprecated_functional(name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
