"""Pruners: magnitude, OBD, SparseGPT, shared-C OBS and True OBS on any S3 pattern.

Each method is one class with a frozen options dataclass (its defaults and what
it can do, see :mod:`.method`): :class:`Magnitude`, :class:`OBD`,
:class:`SparseGPT`, :class:`SharedOBS`, :class:`TrueOBS`. The reference API —
``prune_magnitude``, ``prune_obd``, ``prune_sparsegpt``,
``StructuredOBS(scope, H).prune(...)`` / ``.prune_true_obs(...)`` and the
functional wrappers — calls them.
"""

from .functional import magnitude, obd_prune, sparsegpt_block16, sparsegpt_coupled_24, sparsegpt_prune
from .hessian import HessianAccumulator, compute_hessian, output_error
from .magnitude import Magnitude, MagnitudeOptions, prune_magnitude
from .method import MethodOptions, PruningMethod
from .obd import OBD, OBDOptions, prune_obd
from .obs import SharedOBS, SharedOBSOptions
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
    "SharedOBS",
    "SharedOBSOptions",
    "SparseGPT",
    "SparseGPTOptions",
    "StructuredOBS",
    "TrueOBS",
    "TrueOBSOptions",
    "compute_hessian",
    "magnitude",
    "obd_prune",
    "output_error",
    "prune_magnitude",
    "prune_obd",
    "prune_sparsegpt",
    "sparsegpt_block16",
    "sparsegpt_coupled_24",
    "sparsegpt_prune",
]
