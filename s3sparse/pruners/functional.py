"""The reference implementation's functional entry points, over the generic pruners: a compatibility layer.

Each takes a weight ``W0`` (M, K) and returns a pruned copy (``W0`` is not
modified), so scripts written for the reference run unchanged once they import
from here. They are not part of the API beside the pruners (``s3sparse.magnitude``
and ``s3sparse.pruners.magnitude`` still reach them, with a ``DeprecationWarning``);
new code prunes through a pattern: ``prune_magnitude(scope, nnz)``,
``prune_obd``, ``prune_sparsegpt``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..checks import check_finite, check_hessian, check_int, check_nnz, check_weight
from ..errors import ArgumentError
from .magnitude import prune_magnitude
from .obd import prune_obd
from .sparsegpt import prune_sparsegpt

__all__ = ["magnitude", "obd_prune", "sparsegpt_prune", "sparsegpt_coupled_24", "sparsegpt_block16"]


def _copy(W0: Tensor, H: Optional[Tensor] = None) -> Tensor:
    check_weight(W0, "W0", ndim=2)
    check_finite(W0, "W0")
    if H is not None:
        check_hessian(H, W0.shape[1], like=W0, name="H")
    return W0.detach().clone()


def _row_groups_scope(W: Tensor, block_cols: int, scope_blocks: int):
    from ..block import BlockSpec
    from ..scope import ScopeSpec

    block_cols = check_int(block_cols, "block_size", minimum=1, what="columns per block")
    scope_blocks = check_int(scope_blocks, "scope_size", minimum=1, what="blocks per scope")
    K = W.shape[1]
    if K % (block_cols * scope_blocks):
        raise ArgumentError(
            f"K={K} is not a multiple of {block_cols * scope_blocks} (scopes of {scope_blocks} blocks of "
            f"{block_cols} columns); choose sizes that divide K"
        )
    return ScopeSpec(BlockSpec(W, (1, block_cols)), (1, scope_blocks))


def _check_keep(num_keep: int, scope_size: int) -> int:
    return check_nnz(num_keep, check_int(scope_size, "scope_size", minimum=1, what="blocks per scope"), "num_keep")


def magnitude(W0: Tensor, scope_size: int = 4, num_keep: int = 2) -> Tensor:
    """N:M magnitude pruning: keep the ``num_keep`` largest |w| of every ``scope_size`` consecutive weights of a row."""
    W = _copy(W0)
    keep = _check_keep(num_keep, scope_size)
    prune_magnitude(_row_groups_scope(W, 1, scope_size), keep)
    return W


def obd_prune(W0: Tensor, H: Tensor, scope_size: int = 4, num_keep: int = 2) -> Tensor:
    """N:M OBD pruning: keep the ``num_keep`` weights of largest ``w²·H_cc`` in every ``scope_size`` group of a row."""
    W = _copy(W0, H)
    keep = _check_keep(num_keep, scope_size)
    prune_obd(_row_groups_scope(W, 1, scope_size), H, keep)
    return W


def sparsegpt_prune(
    W0: Tensor,
    H: Tensor,
    block_size: int = 1,
    scope_size: int = 4,
    blocksize: int = 128,
    damp: float = 0.01,
    num_keep: Optional[int] = None,
) -> Tensor:
    """SparseGPT with blocks of ``block_size`` columns, scopes of ``scope_size`` blocks along rows.

    Keeps ``num_keep`` blocks per scope (default half): ``block_size=1`` is 2:4,
    ``block_size=2`` the 4:8 pattern of the paper.
    """
    W = _copy(W0, H)
    scope_size = check_int(scope_size, "scope_size", minimum=1, what="blocks per scope")
    keep = scope_size // 2 if num_keep is None else _check_keep(num_keep, scope_size)
    prune_sparsegpt(_row_groups_scope(W, block_size, scope_size), H, keep, blocksize=blocksize, damp=damp)
    return W


def sparsegpt_coupled_24(W0: Tensor, H: Tensor, blocksize: int = 128, damp: float = 0.01) -> Tensor:
    """SparseGPT to coupled 2:4 (columns j and j+8 of every 16-column tile pruned together)."""
    from ..patterns import coupled_nm

    W = _copy(W0, H)
    scope, nnz = coupled_nm(W)
    prune_sparsegpt(scope, H, nnz, blocksize=blocksize, damp=damp)
    return W


def sparsegpt_block16(W0: Tensor, H: Tensor, blocksize: int = 128, damp: float = 0.01) -> Tensor:
    """SparseGPT to 16-column blocks where rows p and p+8 of each 16-row group compete (keep 1 of 2)."""
    from ..patterns import row_coupled_blocks

    W = _copy(W0, H)
    scope, nnz = row_coupled_blocks(W)
    prune_sparsegpt(scope, H, nnz, blocksize=blocksize, damp=damp)
    return W
