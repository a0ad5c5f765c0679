"""``StructuredOBS``: the reference API of both OBS methods on one layer.

``StructuredOBS(scope, H, damp=None, inv_h=None)`` holds the layer (an
:class:`~s3sparse.pruners.obs_layer.OBSLayer`, so the damped inverse is computed
once for both calls); :meth:`~StructuredOBS.prune` is shared-C OBS
(:class:`~s3sparse.pruners.obs.SharedOBS`) and :meth:`~StructuredOBS.prune_true_obs`
is True OBS (:class:`~s3sparse.pruners.true_obs.TrueOBS`). Both only build their
method's options and call it; an argument left at None takes the option's own
default, so e.g. ``StructuredOBS(scope, H).prune_true_obs(nnz)`` is
``TrueOBS().prune(scope, H, nnz)``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..checks import check_damp
from .obs import SharedOBS, SharedOBSOptions
from .obs_layer import OBSLayer, compute_inverse
from .true_obs import TrueOBS, TrueOBSOptions

__all__ = ["StructuredOBS"]

# Attributes of the layer that StructuredOBS has always exposed.
_LAYER_ATTRIBUTES = ("layout", "W", "M", "num_cols", "hessian", "groups", "blocks_per_scope", "bk")


def _given(**options) -> dict:
    """The options that are not None (None: the option's own default)."""
    return {k: v for k, v in options.items() if v is not None}


class StructuredOBS:
    """Structured OBS pruner operating through a ScopeSpec.

    Args:
        scope: ScopeSpec whose blocks lie on one 2-D weight (M, K) — any regular
            pattern: N:M, coupled N:M, column blocks, row-coupled blocks.
        hessian: (K, K) layer Hessian ``XᵀX/N`` on the weight's device.
        damp: damping; relative to mean(diag H) when < 1, absolute otherwise.
            Default (None): each method's own (``SharedOBSOptions.damp``, 0.01, for
            :meth:`prune`; ``TrueOBSOptions.damp``, 1e-4, for :meth:`prune_true_obs`).
        inv_h: precomputed (K, K) damped inverse; skips the inversion (used by both
            methods, whatever ``damp`` says).
    """

    def __init__(self, scope, hessian: Tensor, damp: Optional[float] = None, inv_h: Optional[Tensor] = None):
        self.scope = scope
        self.layer = OBSLayer(scope, hessian, inv_h=inv_h)
        self._damp = None if damp is None else check_damp(damp)

    def __getattr__(self, name: str):
        layer = self.__dict__.get("layer")
        if layer is not None and name in _LAYER_ATTRIBUTES:
            return getattr(layer, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def inverse(self, damp: float) -> Tensor:
        """``(H + damp·I)⁻¹`` in fp32, computed once per damping (or the given ``inv_h``)."""
        return self.layer.inverse(damp)

    @staticmethod
    def compute_inverse(hessian: Tensor, damp: float = 1e-4) -> Tensor:
        """``(H + damp·I)⁻¹`` (damp relative to mean(diag H) when < 1), fp32; see
        :func:`~s3sparse.pruners.obs_layer.compute_inverse`."""
        return compute_inverse(hessian, damp)

    def prune(self, nnz: int, block_size: int = SharedOBSOptions.block_size, compensate: str = "local",
              n_splits: int = 1) -> None:
        """Shared-C OBS to ``nnz`` blocks per scope, in place: the best subset of every
        scope under one C, then ``'local'`` / ``'full'`` / ``'split'`` / ``'interleaved'``
        compensation over ``n_splits`` column chunks (see :meth:`SharedOBS.prune_layer`
        and :class:`SharedOBSOptions`). ``n_splits=1`` (the reference's default) makes
        ``'split'`` and ``'interleaved'`` equal to ``'full'``.
        """
        options = SharedOBSOptions(**_given(damp=self._damp, block_size=block_size, compensate=compensate,
                                            n_splits=n_splits))
        SharedOBS(options).prune_layer(self.layer, nnz)

    def prune_true_obs(
        self,
        nnz: int,
        ng: Optional[int] = None,
        chunk_size: Optional[int] = None,
        order: str = TrueOBSOptions.order,
        scoring: str = TrueOBSOptions.scoring,
        c_dtype: Optional[torch.dtype] = None,
        progress_fn: Optional[Callable[[str], None]] = None,
        process_group=None,
        refine: int = 0,
        panel_batches: Optional[int] = TrueOBSOptions.panel_batches,
        hybrid_tau: float = TrueOBSOptions.hybrid_tau,
    ) -> None:
        """Per-row True OBS with Schur-complement updates, in place.

        What runs is left-looking: no per-row C is stored. Each row's C is the Schur
        complement of its pruned columns in ``C0 = (H + λI)⁻¹``, kept in factored
        form ``C0 − U Uᵀ``; each batch of ``ng`` scopes forms only the panel it reads,
        ``C0[S, R] − U[S] U[R]ᵀ`` (op :func:`~s3sparse.ops.lowrank_sub`), prunes,
        appends the factors of its pruned columns, and updates the row's remaining
        weights; the final weights are one GEMM with C0 (see :mod:`.true_obs`).

        The options are those of :class:`TrueOBSOptions` (``ng``: 64, 1 on
        row-coupled patterns; ``chunk_size``: from free memory; ``c_dtype``: fp16 factors U);
        ``progress_fn`` and ``process_group`` as in :meth:`TrueOBS.prune_layer`;
        ``refine=N``: then N sweeps of exact swap refinement of the mask
        (:func:`~s3sparse.pruners.refine_mask`), any regular pattern, row-coupled included;
        ``panel_batches=G``: the blocked form, the factors read once per G batches (the
        same result to round-off; None: 4 on CUDA for row-coupled patterns, else 1);
        ``scoring`` / ``hybrid_tau``: how a batch's blocks are chosen (see :class:`TrueOBSOptions`).
        """
        options = TrueOBSOptions(**_given(damp=self._damp, ng=ng, chunk_size=chunk_size, order=order,
                                          scoring=scoring, c_dtype=c_dtype, refine=refine,
                                          panel_batches=panel_batches, hybrid_tau=hybrid_tau))
        TrueOBS(options).prune_layer(self.layer, nnz, progress_fn, process_group)
