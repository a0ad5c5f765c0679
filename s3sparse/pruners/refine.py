"""Exact swap refinement of a pruned layer's mask (issue 19).

A pruned layer's mask fixes, for every row, its pruned columns P; with the
dense weight ``w`` (before pruning) and ``C = (H + λI)⁻¹``, the least output
error any weights on the kept columns reach is the one-shot OBS cost

    cost(P) = w_Pᵀ (C_PP)⁻¹ w_P,

reached by ``w ← w − C_{:,P} (C_PP)⁻¹ w_P`` (pruned columns zero). Greedy
methods (True OBS, SparseGPT, magnitude) decide each scope once; this module
revisits them: for every row, scope after scope, it tries every kept set of the
scope (every subset of ``nnz`` of its blocks) with the rest of the row's mask
fixed, and takes the one of least exact cost when it is strictly lower than the
current one. Then the kept weights are set to the exact optimum for the final mask.

Cost of a candidate without a new solve: the row holds ``A⁻¹ = (C_PP)⁻¹``
explicitly (float64). Dropping the scope's current pruned set Q is a rank-q
downdate of it (``B = A⁻¹ − A⁻¹_{:,Q} (A⁻¹_QQ)⁻¹ A⁻¹_{Q,:}``, the inverse over
P' = P \\ Q); adding a candidate R back costs, with ``V = B C_{P',E}`` for the
scope's elements E, ``r = w_E − C_{E,P'} B w_{P'}`` and the Schur complement
``S = C_EE − C_{E,P'} V``: ``cost(P' ∪ R) = w_{P'}ᵀ B w_{P'} + r_Rᵀ (S_RR)⁻¹ r_R``
(q × q solves only; B is applied, never formed). A swap updates ``A⁻¹`` of
that row by the block-inverse formula (rank q). ``A⁻¹`` is recomputed from scratch at the start of every sweep, so
round-off does not accumulate. Rows are independent and batched (in chunks).

Scope: patterns whose every scope lies in one row (N:M, N:M blocks, coupled
N:M, any ScopeSpec with single-row scopes). Row-coupled patterns (scopes shared
by rows p and p+8) are refused.

Guarantee (never worse than the input): the output error
``tr(ΔW H ΔWᵀ)`` of every row is compared with the input weight's; a row whose
refined error is higher (possible only through damping or the input already
being better than the OBS optimum of its own mask under the damped H) keeps its
input weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from ..checks import check_callable, check_damp, check_int
from ..errors import ArgumentError
from .hessian import check_hessian, damped_inverse
from .layout import block_subsets, count_subsets, normalize_nnz, row_groups, scope_layout
from .obs_layer import MAX_SUBSETS

__all__ = ["RefineResult", "check_refinable", "refine_mask"]

# Relative decrease of the row's cost a swap must bring (round-off guard: no flip-flops).
_REL_TOL = 1e-10
# float64 elements of the per-row inverses held at once when chunk_size is not given.
_CHUNK_ELEMS = 1 << 24


@dataclasses.dataclass(frozen=True)
class RefineResult:
    """What :func:`refine_mask` did.

    Attributes:
        changed: scopes whose kept set changed, per sweep run.
        num_scopes: scopes of the layer (M × scopes per row).
        rows_kept_input: rows left at their input weights by the never-worse guard.
    """

    changed: tuple
    num_scopes: int
    rows_kept_input: int


def _row_scopes(scope):
    """(layout, cols (S, E)) of a pattern whose scopes lie in one row each; refuses row-coupled ones."""
    layout = scope_layout(scope)
    groups = row_groups(layout)
    if groups.rows_per_group != 1:
        raise ArgumentError(
            "refine_mask: this pattern's scopes span several rows (a row-coupled pattern such as the 16-column "
            "blocks); only patterns whose scopes each lie in one row (N:M, N:M blocks, coupled N:M) are supported. "
            "Prune it with prune_true_obs() without refine"
        )
    return layout, groups


def check_refinable(scope) -> None:
    """Raise ArgumentError unless every scope of ``scope`` lies in one row (what :func:`refine_mask` refines)."""
    _row_scopes(scope)


@torch.no_grad()
def refine_mask(
    scope,
    hessian: Tensor,
    nnz: int,
    dense_weight: Tensor,
    sweeps: int = 2,
    damp: float = 1e-4,
    min_change: float = 0.0,
    chunk_size: Optional[int] = None,
    progress_fn: Optional[Callable[[str], None]] = None,
) -> RefineResult:
    """Refine the mask of an already pruned weight by exact swaps, in place.

    Args:
        scope: the pattern's ScopeSpec; its weight holds the pruned weight (any
            method's result) whose zero blocks are the starting mask: in every
            scope, the first ``blocks − nnz`` all-zero blocks are the pruned ones
            (a scope with fewer all-zero blocks is refused).
        hessian: (K, K) layer Hessian.
        nnz: blocks kept per scope.
        dense_weight: (M, K) the weight before pruning (the error is measured
            against it).
        sweeps: passes over every scope (0: only set the kept weights to the
            optimum for the starting mask).
        damp: damping of ``C = (H + λI)⁻¹`` (as True OBS: relative to mean(diag H) when < 1).
        min_change: stop after a sweep that changes fewer than this fraction of
            the scopes (a sweep that changes none always stops).
        chunk_size: rows held at once (default: from the inverse's size).
        progress_fn: optional ``callable(str)`` for progress messages.

    Returns:
        a :class:`RefineResult`. The weight is written once, at the end.
    """
    sweeps = check_int(sweeps, "sweeps", minimum=0, what="sweeps over the scopes")
    damp = check_damp(damp)
    check_callable(progress_fn, "progress_fn")
    if not (0.0 <= float(min_change) <= 1.0):
        raise ArgumentError(f"refine_mask: `min_change` must be a fraction in [0, 1], got {min_change!r}")
    layout, groups = _row_scopes(scope)
    param = layout.param
    M, K = param.shape
    check_hessian(hessian, K, like=param)
    if not isinstance(dense_weight, Tensor) or tuple(dense_weight.shape) != (M, K):
        raise ArgumentError(f"refine_mask: `dense_weight` must be a tensor of shape {(M, K)}")
    G, B = layout.blocks_per_scope, layout.block_numel
    num_prune = G - normalize_nnz(nnz, G)
    S = groups.scopes_per_group
    if num_prune == 0 or S == 0:
        return RefineResult((), M * S, 0)
    if count_subsets(G, num_prune) > MAX_SUBSETS:
        raise ArgumentError(f"refine_mask: choosing {num_prune} of {G} blocks has more than {MAX_SUBSETS} subsets")

    dev = param.device
    f64 = torch.float64
    rows = groups.rows[:, 0]  # group r is row rows[r]
    cols = groups.cols.to(dev)  # (S, E), blocks B elements each, block-major
    W_in = param.detach()[rows].to(f64)
    W0 = dense_weight.detach().to(device=dev, dtype=f64)[rows]
    C, _ = damped_inverse(hessian, damp, dtype=f64, what="refine_mask's H + damp*I")
    block_sets, elem_sets = block_subsets(G, num_prune, B, dev)  # (n_c, np), (n_c, q)
    q = elem_sets.shape[1]
    cand = _starting_candidates(W_in, cols, block_sets, num_prune, G, B)  # (M, S)

    m = chunk_size or max(1, _CHUNK_ELEMS // max(1, (S * q) ** 2))
    m = check_int(m, "chunk_size", minimum=1, what="rows held at once")
    changed = _run_sweeps(C, W0, cand, cols, elem_sets, sweeps, m, min_change, progress_fn)

    W_out = torch.empty_like(W0)
    for lo in range(0, M, m):
        W_out[lo : lo + m] = _optimal_weights(C, W0[lo : lo + m], _pruned_cols(cand[lo : lo + m], cols, elem_sets))
    worse = _keep_better_rows(W_out, W_in, W0, hessian)
    if not torch.isfinite(W_out).all():
        raise ArgumentError("refine_mask produced non-finite weights; the weight was left unchanged. Raise `damp`")
    result = param.detach().clone()
    result[rows] = W_out.to(param.dtype)
    param.data.copy_(result)
    if progress_fn is not None:
        progress_fn("")
    return RefineResult(tuple(changed), M * S, int(worse.sum()))


def _starting_candidates(W_in: Tensor, cols: Tensor, block_sets: Tensor, num_prune: int, G: int, B: int) -> Tensor:
    """(M, S) index into ``block_sets`` of every scope's starting pruned set: its first ``num_prune`` all-zero blocks."""
    M, S = W_in.shape[0], cols.shape[0]
    zero = (W_in[:, cols] == 0).reshape(M, S, G, B).all(-1)  # (M, S, G)
    if bool((zero.sum(-1) < num_prune).any()):
        raise ArgumentError(
            f"refine_mask: some scope of the weight has fewer than {num_prune} all-zero blocks; the weight behind "
            "`scope` must be pruned to the pattern (nnz blocks kept per scope) first"
        )
    order = torch.sort((~zero).to(torch.int8), dim=-1, stable=True).indices[..., :num_prune]
    cur_blocks = torch.sort(order, dim=-1).values  # (M, S, np), ascending as block_sets
    return (cur_blocks[:, :, None, :] == block_sets[None, None]).all(-1).to(torch.int8).argmax(-1)


def _run_sweeps(
    C: Tensor,
    W0: Tensor,
    cand: Tensor,
    cols: Tensor,
    elem_sets: Tensor,
    sweeps: int,
    m: int,
    min_change: float,
    progress_fn: Optional[Callable[[str], None]],
) -> list:
    """Sweep the rows ``m`` at a time, updating ``cand`` in place; the scopes changed per sweep run."""
    M, S = cand.shape
    changed = []
    for sweep in range(sweeps):
        n = 0
        for lo in range(0, M, m):
            n += _sweep_chunk(C, W0[lo : lo + m], cand[lo : lo + m], cols, elem_sets)
        changed.append(n)
        if progress_fn is not None:
            progress_fn(f"refine_mask: sweep {sweep + 1}/{sweeps}: {n} of {M * S} scopes changed")
        if n == 0 or n < min_change * M * S:
            break
    return changed


def _keep_better_rows(W_out: Tensor, W_in: Tensor, W0: Tensor, hessian: Tensor) -> Tensor:
    """Never worse than the input: rows of ``W_out`` with a higher undamped output error take ``W_in``'s (in place)."""
    H = hessian.detach().to(torch.float64)
    d_out, d_in = W_out - W0, W_in - W0
    worse = ((d_out @ H) * d_out).sum(1) > ((d_in @ H) * d_in).sum(1)
    W_out[worse] = W_in[worse]
    return worse


def _pruned_cols(cand: Tensor, cols: Tensor, elem_sets: Tensor) -> Tensor:
    """(m, S·q) pruned columns of every row, scope after scope."""
    S = cols.shape[0]
    per_scope = cols[:, elem_sets]  # (S, n_c, q)
    return per_scope[torch.arange(S, device=cols.device)[None, :], cand.long()].reshape(cand.shape[0], -1)


def _inverse_pp(C: Tensor, P: Tensor) -> Tensor:
    """(C_PP)⁻¹ of every row, (m, p, p)."""
    L = torch.linalg.cholesky(C[P[:, :, None], P[:, None, :]])
    return torch.cholesky_inverse(L)


def _optimal_weights(C: Tensor, W0: Tensor, P: Tensor) -> Tensor:
    """``w − C_{:,P} (C_PP)⁻¹ w_P`` with the pruned columns zero, per row."""
    u = (_inverse_pp(C, P) @ W0.gather(1, P)[..., None])  # (m, p, 1)
    W = W0 - (C[P].transpose(1, 2) @ u).squeeze(-1)
    return W.scatter_(1, P, 0.0)


def _sweep_chunk(C: Tensor, W0: Tensor, cand: Tensor, cols: Tensor, elem_sets: Tensor) -> int:
    """One sweep over the scopes of a chunk of rows; updates ``cand`` in place, returns the swaps."""
    m, S = cand.shape
    q = elem_sets.shape[1]
    ar = torch.arange(m, device=C.device)
    P = _pruned_cols(cand, cols, elem_sets)  # (m, p)
    Ainv = _inverse_pp(C, P)
    wP = W0.gather(1, P)
    swaps = 0
    for g in range(S):
        sl = slice(g * q, (g + 1) * q)
        E = cols[g]
        # Downdate: B = the inverse over P' = P without this scope's pruned set (zero at its
        # slots), applied to [w_P', C_P'E] without forming it: B X = A⁻¹X − A⁻¹_{:,Q} (A⁻¹_QQ)⁻¹ A⁻¹_{Q,:} X.
        Aq = Ainv[:, :, sl]
        Aqq = Ainv[:, sl, sl]
        CPE = C[P[:, :, None], E[None, None, :]]  # (m, p, E)
        X = torch.cat([wP[..., None], CPE], dim=2)
        X[:, sl] = 0
        Y = Ainv @ X - Aq @ torch.linalg.solve(Aqq, Aq.transpose(1, 2) @ X)
        Y[:, sl] = 0
        u, V = Y[:, :, :1], Y[:, :, 1:]  # B w_P', B C_P'E
        base = (X[:, :, 0][:, None, :] @ u).reshape(m)
        r = W0[:, E] - (X[:, :, 1:].transpose(1, 2) @ u).squeeze(-1)  # (m, E)
        SE = C[E[:, None], E[None, :]] - X[:, :, 1:].transpose(1, 2) @ V  # (m, E, E)
        SR = SE[:, elem_sets[:, :, None], elem_sets[:, None, :]]  # (m, n_c, q, q)
        rR = r[:, elem_sets]  # (m, n_c, q)
        L = torch.linalg.cholesky(SR)
        cost = base[:, None] + (rR * torch.cholesky_solve(rR[..., None], L).squeeze(-1)).sum(-1)  # (m, n_c)
        cur = cand[:, g].long()
        cur_cost = cost[ar, cur]
        best_cost, best = cost.min(dim=1)
        swap = best_cost < cur_cost - _REL_TOL * cur_cost.abs()
        if not bool(swap.any()):
            continue
        idx = swap.nonzero().squeeze(1)
        swaps += idx.numel()
        new = best[idx]
        R = elem_sets[new]  # (n, q) element indices within the scope
        # Update (swapped rows only): the block inverse of P' ∪ R, R at the scope's slots.
        Aqi = Aq[idx]
        Binv = Ainv[idx] - Aqi @ torch.linalg.solve(Aqq[idx], Aqi.transpose(1, 2))
        Binv[:, sl, :] = 0
        Binv[:, :, sl] = 0
        SRinv = torch.cholesky_inverse(L[idx, new])
        VR = V[idx].gather(2, R[:, None, :].expand(idx.numel(), V.shape[1], q))  # (n, p, q), zero at the slots
        VS = VR @ SRinv
        newA = Binv + VS @ VR.transpose(1, 2)
        newA[:, :, sl] = -VS
        newA[:, sl, :] = -VS.transpose(1, 2)
        newA[:, sl, sl] = SRinv
        Ainv[idx] = newA
        cand[idx, g] = new.to(cand.dtype)
        P[idx, sl] = E[R]
        wP[idx, sl] = W0[idx].gather(1, E[R])
    return swaps
