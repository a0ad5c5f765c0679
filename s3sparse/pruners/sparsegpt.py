"""SparseGPT over any ScopeSpec.

The published algorithm (Frantar & Alistarh, 2023) sweeps the columns of W left
to right with one shared upper Cholesky factor ``U`` of ``C = (H + λI)⁻¹``: the
weights of column i are pruned by the mask, and the error ``(w − q)/U_ii`` is
propagated to the later columns through row i of U. Columns are processed in
lazy blocks (128): inside a block updates are applied eagerly, to later blocks
once per block.

Generalised here to any pattern: a scope's mask is chosen when the sweep reaches
the first column of the scope, keeping the ``nnz`` blocks of largest
``Σ_block w² / U_cc²`` (w as updated so far — for columns beyond the current lazy
block the pending update is applied to the values being scored, so lazy and eager
sweeps choose the same masks). Row-coupled scopes compare the rows' block scores.
For N:M patterns this is exactly the original algorithm.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import ops
from ..checks import check_callable, check_damp, check_int
from .hessian import check_hessian, damped_inverse
from .layout import normalize_nnz, scope_layout

__all__ = ["prune_sparsegpt"]


@torch.no_grad()
def prune_sparsegpt(
    scope,
    hessian: Tensor,
    nnz: int,
    blocksize: int = 128,
    damp: float = 0.01,
    progress_fn: Optional[Callable[[str], None]] = None,
) -> None:
    """Prune the weight behind ``scope`` to ``nnz`` blocks per scope with SparseGPT, in place.

    Args:
        scope: a ScopeSpec whose blocks lie on one 2-D weight (M, K).
        hessian: (K, K) layer Hessian ``XᵀX/N``, on the weight's device.
        nnz: blocks kept per scope.
        blocksize: lazy-batch width in columns (128 in the paper).
        damp: damping, relative to mean(diag H) when < 1 (0.01 in the paper).
        progress_fn: optional ``callable(str)`` told about each lazy block.

    The weight is written once, at the end; on any error it is left unchanged.
    """
    layout = scope_layout(scope)
    param = layout.param
    M, K = param.shape
    check_hessian(hessian, K, like=param)
    nnz = normalize_nnz(nnz, layout.blocks_per_scope)
    blocksize = check_int(blocksize, "blocksize", minimum=1, what="columns per lazy block")
    damp = check_damp(damp)
    check_callable(progress_fn, "progress_fn")
    device = param.device

    W = param.detach().to(torch.float32, copy=True)
    U, _ = damped_inverse(hessian, damp, upper_factor=True, what="SparseGPT's H + damp*I")
    d2 = torch.diagonal(U) ** 2

    rows, cols = layout.rows, layout.cols  # (S, blocks, elems)
    first_col = cols.reshape(cols.shape[0], -1).amin(dim=1)
    last_col = cols.reshape(cols.shape[0], -1).amax(dim=1)
    order = torch.argsort(first_col, stable=True)
    rows, cols = rows[order], cols[order]
    first_col, last_col = first_col[order], last_col[order]
    # Host-side schedule: which scopes start at each column, and whether any of
    # them reaches past the lazy block of that column.
    starts = torch.zeros(K + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(torch.bincount(first_col.cpu(), minlength=K), 0)
    starts = starts.tolist()
    reach = torch.full((K,), -1, dtype=torch.long).scatter_reduce(
        0, first_col.cpu(), last_col.cpu(), reduce="amax"
    ).tolist()

    pruned = torch.zeros(M, K, dtype=torch.bool, device=device)
    num_blocks = (K + blocksize - 1) // blocksize
    for bi, i1 in enumerate(range(0, K, blocksize)):
        i2 = min(i1 + blocksize, K)
        if progress_fn is not None:
            progress_fn(f"SparseGPT: columns {i1}-{i2 - 1} of {K} (block {bi + 1}/{num_blocks})")
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            s0, s1 = starts[col], starts[col + 1]
            if s1 > s0:
                r, c = rows[s0:s1], cols[s0:s1]
                vals = W1[r, (c - i1).clamp(max=i2 - i1 - 1)]
                if reach[col] >= i2:
                    # Scope reaches past this lazy block: score its later columns
                    # with the updates they are still owed from this block.
                    outside = c >= i2
                    ro, co = r[outside], c[outside]
                    owed = (Err1[ro, :i] * U[i1:col, co].T).sum(dim=1) if i else 0.0
                    vals[outside] = W[ro, co] - owed
                scores = (vals * vals / d2[c]).sum(dim=-1)
                _, keep = ops.kth_largest(scores, nnz)
                prune_elems = (~keep).unsqueeze(-1).expand_as(c)
                pruned.index_put_((r.reshape(-1), c.reshape(-1)), prune_elems.reshape(-1))
            w = W1[:, i]
            q = w.masked_fill(pruned[:, col], 0.0)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if not torch.isfinite(W).all():
        raise FloatingPointError(
            "SparseGPT produced non-finite weights; the weight was left unchanged "
            "(check the Hessian and the weight for NaN/Inf, or raise `damp`)"
        )
    param.data.copy_(W.to(param.dtype))
