"""Pruners: magnitude, OBD, SparseGPT and Structured OBS on any S3 pattern."""

from .functional import magnitude, obd_prune, sparsegpt_block16, sparsegpt_coupled_24, sparsegpt_prune
from .hessian import HessianAccumulator, compute_hessian, output_error
from .obd import prune_magnitude, prune_obd
from .obs import StructuredOBS
from .sparsegpt import prune_sparsegpt

__all__ = [
    "HessianAccumulator",
    "StructuredOBS",
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
