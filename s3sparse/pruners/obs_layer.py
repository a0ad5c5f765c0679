"""The layer an OBS method prunes: its weight, its scopes as row groups, H and C.

Both OBS methods — shared-C OBS (:mod:`.obs`) and True OBS (:mod:`.true_obs`) —
read the weight through an :class:`OBSLayer`: the scope layout and row groups,
the Hessian, the damped inverse ``C = (H + λI)⁻¹`` (:meth:`OBSLayer.inverse`, the
one accessor: computed once per damping, or a precomputed ``inv_h``), the
candidate subsets of a scope, and the fp32 working copy that is written back to
the weight once, at the end.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..checks import check_finite
from ..errors import ArgumentError, NumericalError
from .hessian import check_hessian, damped_inverse
from .layout import RowGroups, block_subsets, count_subsets, normalize_nnz, row_groups, scope_layout

__all__ = ["MAX_SUBSETS", "OBSLayer", "compute_inverse"]

# Largest number of candidate subsets per scope that exhaustive selection enumerates.
MAX_SUBSETS = 20_000


def compute_inverse(hessian: Tensor, damp: float) -> Tensor:
    """``(H + damp·I)⁻¹`` (damp relative to mean(diag H) when < 1), fp32.

    Dead inputs (zero diagonal) get unit curvature; damping is raised (with a
    warning) until the matrix is positive definite.
    """
    return damped_inverse(hessian, damp, what="StructuredOBS's H + damp*I")[0]


class OBSLayer:
    """One 2-D weight (M, K) seen through a ScopeSpec, with its (K, K) Hessian.

    Args:
        scope: ScopeSpec whose blocks lie on one 2-D weight — any regular
            pattern: N:M, coupled N:M, column blocks, row-coupled blocks.
        hessian: (K, K) layer Hessian ``XᵀX/N`` on the weight's device.
        inv_h: precomputed (K, K) damped inverse, returned by :meth:`inverse`
            whatever damping is asked for.
    """

    def __init__(self, scope, hessian: Tensor, inv_h: Optional[Tensor] = None):
        self.scope = scope
        self.layout = scope_layout(scope)
        self.W = self.layout.param
        self.M, self.num_cols = self.W.shape
        check_hessian(hessian, self.num_cols, like=self.W)
        self.hessian = hessian
        self._inverses: dict = {}
        self.groups: RowGroups = row_groups(self.layout)
        self.blocks_per_scope = self.layout.blocks_per_scope
        self.bk = self.layout.block_numel
        # The most elements one row holds in one scope (E for per-row patterns).
        slots = torch.nn.functional.one_hot(self.groups.local_rows, self.groups.rows_per_group)
        self.row_elems_per_scope = int(slots.sum(dim=1).max()) if slots.numel() else 0
        self._inv_h = None
        if inv_h is not None:
            check_hessian(inv_h, self.num_cols, like=self.W, name="inv_h")
            self._inv_h = inv_h.to(torch.float32)

    def inverse(self, damp: float) -> Tensor:
        """``(H + damp·I)⁻¹`` in fp32 (see :func:`compute_inverse`), computed once per
        damping; the given ``inv_h`` instead, when there is one."""
        if self._inv_h is not None:
            return self._inv_h
        if damp not in self._inverses:
            self._inverses[damp] = compute_inverse(self.hessian, damp)
        return self._inverses[damp]

    def num_prune(self, nnz: int) -> int:
        """Blocks pruned per scope when ``nnz`` are kept (``nnz`` checked)."""
        return self.blocks_per_scope - normalize_nnz(nnz, self.blocks_per_scope)

    def subsets(self, num_prune: int) -> Tensor:
        """Every set of ``num_prune`` blocks of a scope, as element indices: (count, num_prune·bk).

        Raises ArgumentError past :data:`MAX_SUBSETS` candidates.
        """
        n = count_subsets(self.blocks_per_scope, num_prune)
        if n > MAX_SUBSETS:
            raise ArgumentError(
                f"choosing {num_prune} of {self.blocks_per_scope} blocks per scope has {n} candidate subsets "
                f"(more than {MAX_SUBSETS}); use prune_true_obs(scoring='independent') or SparseGPT for this pattern"
            )
        return block_subsets(self.blocks_per_scope, num_prune, self.bk, self.W.device)[1]

    def check_weight_finite(self) -> None:
        """The weight holds no NaN/Inf now (it may have changed since the layer was built)."""
        check_finite(self.W, "the weight behind `scope`")

    def working_copy(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """A copy of the weight to prune."""
        return self.W.detach().to(dtype, copy=True)

    def write_back(self, W: Tensor) -> None:
        """Write the pruned working copy ``W`` into the weight (refused if not finite)."""
        if not torch.isfinite(W).all():
            raise NumericalError(
                "Structured OBS produced non-finite weights (an overflow: weights or H too large for float32, or H "
                "too ill-conditioned); the weight was left unchanged. Raise `damp`, or prune this layer with prune_obd"
            )
        self.W.data.copy_(W.to(self.W.dtype))

    def gather_weights(self, W: Tensor, positions: Tensor) -> Tensor:
        """Weights of the scopes at ``positions`` of every group: (R, n, E)."""
        g = self.groups
        rows = g.rows[:, g.local_rows[positions]]
        return W[rows, g.cols[positions]]
