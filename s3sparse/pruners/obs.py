"""Shared-C Structured OBS (Optimal Brain Surgeon) on any regular S3 pattern.

Notation (one weight row w, inverse Hessian ``C = (H + λI)⁻¹``): removing the set
S of coordinates costs ``w_Sᵀ (C_SS)⁻¹ w_S``; the optimal compensation of the
other weights is ``w ← w − C_{:,S} (C_SS)⁻¹ w_S``. Rows are independent (the layer
loss is a sum over rows), so a scope spanning several rows costs the sum of its
rows' costs: the scope's sub-block of C is block-diagonal by row.

One C is shared by all rows. Phase 1 picks, per (row group, scope), the subset of
blocks with the least OBS cost among all ``C(g, g−nnz)`` subsets
(:func:`select_subsets`, op ``score_subsets``). Phase 2 compensates: ``local``
(inside the scope), ``full`` (every still-active column, scopes in sequence, C
frozen), ``split`` (C recomputed from H on the unvisited columns between
``n_splits`` column chunks, visited columns frozen), ``interleaved`` (as
``split``, with each chunk's masks selected from the compensated weights under
the recomputed C). A per-row C, the Schur complement of the row's pruned
columns (kept in factored form, never stored), is True OBS (:mod:`.true_obs`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import ops
from ..checks import check_choice, check_damp, check_int
from ..errors import ArgumentError, NumericalError
from .hessian import _with_dead_inputs_fixed, damping_value
from .method import MethodOptions, ProgressFn, PruningMethod
from .obs_layer import OBSLayer

__all__ = ["SharedOBS", "SharedOBSOptions", "select_subsets", "shared_blocks"]

# Bytes a gathered temporary (weights, C sub-blocks) may take; larger work is chunked.
_GATHER_BUDGET = 1 << 28
# Pruned columns per row group in one batched triangular solve of phase 2: the
# gathers cost (rows × pruned columns × this), the launches (pruned columns / this).
_SOLVE_COLS = 128

COMPENSATE = ("local", "full", "split", "interleaved")


@dataclasses.dataclass(frozen=True)
class SharedOBSOptions(MethodOptions):
    """Options of shared-C OBS, checked when built.

    Attributes:
        damp: damping; relative to mean(diag H) when < 1, absolute otherwise.
            0.01: C is shared by all rows and frozen while it compensates; with
            1e-4, ``full``/``split``/``interleaved`` lose to plain OBD on
            ill-conditioned Hessians, and 0.01 lowered their error on every real
            layer we measured.
        block_size: column chunk of the subset search (bounds memory).
        compensate: ``'local'``, ``'full'``, ``'split'`` or ``'interleaved'``.
        n_splits: column chunks of ``'split'`` and ``'interleaved'`` (unused by
            the others); 4 (1 would make both ``'full'``).
    """

    damp: float = 0.01
    block_size: int = 2048
    compensate: str = dataclasses.field(default="local", metadata={"choices": COMPENSATE})
    n_splits: int = 4

    def __post_init__(self):
        self._set("damp", check_damp(self.damp))
        self._set("block_size", check_int(self.block_size, "block_size", minimum=1,
                                          what="columns per selection chunk"))
        check_choice(self.compensate, "compensate", COMPENSATE)
        self._set("n_splits", check_int(self.n_splits, "n_splits", minimum=1, what="column chunks"))

    @property
    def enumerates_subsets(self) -> bool:
        return True


class SharedOBS(PruningMethod):
    """Shared-C OBS: the best subset of every scope under one C, then compensation.

    ``SharedOBS(compensate='interleaved', n_splits=16).prune(scope, H, nnz)``;
    :meth:`prune_layer` prunes an :class:`OBSLayer` (whose inverses it reuses).
    """

    Options = SharedOBSOptions

    def prune(self, scope, hessian: Tensor, nnz: int, progress_fn: ProgressFn = None, process_group=None) -> None:
        """Prune the weight behind ``scope`` (one 2-D weight) to ``nnz`` blocks per scope, in place."""
        self._refuse_process_group(process_group)
        self.prune_layer(OBSLayer(scope, hessian), nnz)

    @torch.no_grad()
    def prune_layer(self, layer: OBSLayer, nnz: int) -> None:
        """Prune ``layer`` to ``nnz`` blocks per scope, in place.

        Phase 1 enumerates all ``C(g, g−nnz)`` subsets per scope and picks the best
        per (row group, scope) by OBS cost under ``C = (H + λI)⁻¹``. Phase 2:

        * ``'local'``: compensate within the scope only (fast, scopes independent).
          Selection and compensation use the scope's own inverse
          ``(H_SS + λI)⁻¹``, the exact OBS step when only the scope may move (the
          reference uses the scope's block of the global C, which assumes every
          column moves and on real layers did worse than OBD);
        * ``'full'``: scopes in column order, each compensating every still-active
          column of its rows, C frozen;
        * ``'split'``: like ``'full'``, but C is recomputed from H on the columns not
          yet visited between ``n_splits`` column chunks, and compensation goes to
          those columns only (visited ones are frozen);
        * ``'interleaved'``: like ``'split'``, but the masks of each of the
          ``n_splits`` chunks are chosen just before the chunk is pruned, from the
          weights compensated so far, with the same recomputed C that then
          compensates the chunk (``n_splits=1`` is ``'full'``).

        In ``'split'`` and ``'interleaved'`` a visited chunk is frozen, its kept
        and pruned columns alike: ``C = (H_AA + λI)⁻¹`` on the unvisited columns
        A, and compensation flows only into A (the reference's semantics).

        Phase 2 of ``'full'``/``'split'``/``'interleaved'`` runs in blocked form: per
        chunk, only the rows of C at the chunk's columns are formed (one Cholesky
        factorisation and one triangular solve), and its scopes are compensated by
        batched triangular solves and GEMMs in runs of about ``_SOLVE_COLS`` pruned
        columns (see ``_compensate_chunk``), not scope by scope.

        The weight is written once, at the end; on any error it is left unchanged.
        """
        layer.check_weight_finite()
        num_prune = layer.num_prune(nnz)
        if num_prune == 0:
            return
        o = self.options
        subsets = layer.subsets(num_prune)
        C = layer.inverse(o.damp)
        W = layer.working_copy()
        if o.compensate == "local":
            _prune_local(layer, W, subsets, o.damp, o.block_size)
        else:
            _prune_in_chunks(layer, W, C, subsets, o)
        layer.write_back(W)


# ------------------------------------------------------------ phase 1: subset selection
def _positions_by_col_chunk(layer: OBSLayer, block_size: int) -> list[Tensor]:
    """Scope positions split so that each chunk's first columns span ``block_size`` columns."""
    first = layer.groups.cols.amin(dim=1).cpu()
    chunk_of = torch.div(first, max(int(block_size), 1), rounding_mode="floor")
    bounds = torch.unique_consecutive(chunk_of, return_counts=True)[1].tolist()
    return list(torch.arange(len(first)).split(bounds))


def shared_blocks(
    layer: OBSLayer, C: Tensor, positions: Tensor, col_map: Optional[Tensor] = None, row_map: Optional[Tensor] = None
) -> Tensor:
    """Block-diagonal-by-row sub-blocks of a shared C for the scopes at ``positions``: (n, E, E).

    ``row_map`` / ``col_map`` turn a column of the weight into a row / column of
    ``C`` (``row_map`` defaults to ``col_map``, both to the identity), so ``C`` may
    hold only some rows of the inverse. The blocks are symmetrised (exact for a
    symmetric C; rows computed by triangular solves differ from their transpose
    by round-off).
    """
    g = layer.groups
    cols = g.cols[positions]
    rows = cols if row_map is None and col_map is None else (row_map if row_map is not None else col_map)[cols]
    if col_map is not None:
        cols = col_map[cols]
    lr = g.local_rows[positions]
    block = C[rows.unsqueeze(-1), cols.unsqueeze(-2)]
    return 0.5 * (block + block.mT) * (lr.unsqueeze(-1) == lr.unsqueeze(-2))


def select_subsets(
    layer: OBSLayer, W: Tensor, C: Optional[Tensor], positions: Tensor, subsets: Tensor,
    col_map: Optional[Tensor] = None, blocks_of: Optional[Callable[[Tensor], Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """Least-cost subset per (group, position) under a shared C (or the blocks
    ``blocks_of(positions)`` gives): (best, cost), each (R, n)."""
    R, E = layer.groups.num_groups, layer.layout.elems_per_scope
    per_item = max(1, R * subsets.shape[0] * (subsets.shape[1] ** 2 + E))
    step = max(1, _GATHER_BUDGET // (4 * per_item))
    best, cost = [], []
    for chunk in positions.split(step):
        w = layer.gather_weights(W, chunk).reshape(-1, E)
        blocks = blocks_of(chunk) if blocks_of is not None else shared_blocks(layer, C, chunk, col_map)
        c_index = torch.arange(chunk.numel(), device=W.device).repeat(R)
        costs, b = ops.score_subsets(w, blocks, subsets, c_index)
        best.append(b.view(R, -1))
        cost.append(costs.gather(1, b.unsqueeze(1)).view(R, -1))
    return torch.cat(best, dim=1), torch.cat(cost, dim=1)

# ------------------------------------------------------------ phase 2: compensation
def _prune_local(layer: OBSLayer, W: Tensor, subsets: Tensor, damp: float, block_size: int) -> None:
    """``'local'``: select and compensate each scope under its own ``(H_SS + λI)⁻¹``, in place on ``W``."""
    device = W.device
    local = lambda positions: _local_inverse_blocks(layer, positions, damp)  # noqa: E731
    best = torch.cat(
        [select_subsets(layer, W, None, pos.to(device), subsets, blocks_of=local)[0]
         for pos in _positions_by_col_chunk(layer, block_size)],
        dim=1,
    )
    _compensate_local(layer, W, best, subsets, local)


def _prune_in_chunks(layer: OBSLayer, W: Tensor, C: Tensor, subsets: Tensor, o: SharedOBSOptions) -> None:
    """``'full'``, ``'split'``, ``'interleaved'``: the column chunks in order, each pruned
    with its C frozen and compensating the unvisited columns only, in place on ``W``."""
    compensate = o.compensate
    G = layer.groups.scopes_per_group
    device = W.device
    all_cols = torch.arange(layer.num_cols, device=device)
    splits = 1 if compensate == "full" else int(o.n_splits)
    chunks = [c for c in torch.arange(G, device=device).tensor_split(splits) if c.numel()]
    reselect = compensate == "interleaved"
    if not reselect:
        best_all = torch.cat(
            [select_subsets(layer, W, C, pos.to(device), subsets)[0]
             for pos in _positions_by_col_chunk(layer, o.block_size)],
            dim=1,
        )
    unvisited = torch.ones(layer.num_cols, dtype=torch.bool, device=device)
    row_of = torch.full((layer.num_cols,), -1, dtype=torch.long, device=device)
    col_of = torch.full((layer.num_cols,), -1, dtype=torch.long, device=device)
    for k, positions in enumerate(chunks):
        chunk_cols = torch.unique(layer.groups.cols[positions])
        if not bool(unvisited[chunk_cols].all()):
            raise ArgumentError(
                f"compensate={compensate!r}: a column belongs to scopes of two column chunks in this pattern, "
                "so a chunk cannot be frozen when it is done; use compensate='full' or 'local'"
            )
        # The rows of C on the columns no chunk has visited yet, at this chunk's
        # columns: split compensates with them, interleaved selects this chunk's
        # masks with them.
        if k == 0:
            a_cols = all_cols
            C_VA = C if chunk_cols.numel() == layer.num_cols else C.index_select(0, chunk_cols)
        else:
            C_VA, a_cols = _unvisited_inverse_rows(layer, all_cols[unvisited], chunk_cols, o.damp)
        row_of.fill_(-1)
        row_of[chunk_cols] = torch.arange(chunk_cols.numel(), device=device)
        col_of.fill_(-1)
        col_of[a_cols] = torch.arange(a_cols.numel(), device=device)
        # The chunk's masks: chosen up front ('split') or now, from the weights
        # compensated so far under C_k ('interleaved'). Either way the chunk is
        # pruned with C_k frozen and compensates the unvisited columns only.
        if reselect:
            blocks = lambda pos: shared_blocks(layer, C_VA, pos, col_of, row_of)  # noqa: E731
            best = select_subsets(layer, W, None, positions, subsets, blocks_of=blocks)[0]
        else:
            best = best_all[:, positions]
        _compensate_chunk(layer, W, C_VA, row_of, col_of, a_cols, best, positions, subsets)
        unvisited[chunk_cols] = False


def _local_inverse_blocks(layer: OBSLayer, positions: Tensor, damp: float) -> Tensor:
    """``(H_SS + λI)⁻¹`` of each scope at ``positions``, block-diagonal by row: (n, E, E)."""
    g = layer.groups
    cols = g.cols[positions]
    lr = g.local_rows[positions]
    same_row = lr.unsqueeze(-1) == lr.unsqueeze(-2)
    H_SS = layer.hessian.to(torch.float32)[cols.unsqueeze(-1), cols.unsqueeze(-2)] * same_row
    diag = torch.diagonal(H_SS, dim1=1, dim2=2)
    diag.masked_fill_(diag == 0, 1.0)  # dead inputs: unit curvature, as for the full inverse
    lam = damping_value(layer.hessian, damp)
    eye = torch.eye(H_SS.shape[-1], dtype=H_SS.dtype, device=H_SS.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H_SS + lam * eye)
        if not bool((info != 0).any()):
            return torch.cholesky_inverse(L)
        lam = max(lam * 10.0, damping_value(layer.hessian, 1e-6))
    raise NumericalError("a scope's H_SS + damp*I is not positive definite even with heavy damping; the weight "
                         "was left unchanged. Raise `damp` or compute H in float64")


def _compensate_local(
    layer: OBSLayer, W: Tensor, best: Tensor, subsets: Tensor, blocks_of: Callable[[Tensor], Tensor]
) -> None:
    """Prune each scope's chosen subset and compensate inside the scope only."""
    g = layer.groups
    E = layer.layout.elems_per_scope
    all_elems = torch.arange(E, device=W.device)
    positions = torch.arange(g.scopes_per_group, device=W.device)
    for chunk in positions.split(max(1, _GATHER_BUDGET // (4 * max(1, g.num_groups * E * E)))):
        rows = g.rows[:, g.local_rows[chunk]]
        cols = g.cols[chunk]
        w = W[rows, cols]  # (R, n, E)
        blocks = blocks_of(chunk)  # (n, E, E)
        b = best[:, chunk]
        new_w = w.clone()
        for s in range(subsets.shape[0]):
            chosen = b == s
            P = subsets[s]
            Q = all_elems[~torch.isin(all_elems, P)]
            C_PP = blocks[:, P][:, :, P]
            C_QP = blocks[:, Q][:, :, P]
            L, _ = torch.linalg.cholesky_ex(C_PP)
            # T = C_QP C_PP^-1, per position: (n, |Q|, |P|).
            T = torch.cholesky_solve(C_QP.transpose(1, 2), L).transpose(1, 2)
            delta = torch.einsum("rnp,nqp->rnq", w[:, :, P], T)
            keep_mask = chosen.unsqueeze(-1)
            new_w[:, :, Q] -= delta * keep_mask
            new_w[:, :, P] = new_w[:, :, P].masked_fill(keep_mask, 0.0)
        W[rows, cols] = new_w


def _unvisited_inverse_rows(
    layer: OBSLayer, unvisited_cols: Tensor, chunk_cols: Tensor, damp: float
) -> tuple[Tensor, Tensor]:
    """Rows at the chunk's columns V of ``C = (H_AA + λI)⁻¹``, A the unvisited columns.

    Returns ``(C_VA, a_order)``: C_VA is (|V|, |A|), its rows in the order of
    ``chunk_cols`` (V ⊂ A, ascending) and its columns in ``a_order`` = [A∖V, V].
    λ and the dead-input fix are those of ``damped_inverse`` on H_AA (damping
    relative to mean(diag H_AA), raised tenfold until H_AA + λI is positive
    definite). With V ordered last, ``L⁻¹`` (L the Cholesky factor) restricted to
    V's columns is ``[0; L_VV⁻¹]``, so the rows cost one triangular solve with |V|
    right-hand sides instead of a whole inverse.
    """
    in_chunk = torch.zeros(layer.num_cols, dtype=torch.bool, device=unvisited_cols.device)
    in_chunk[chunk_cols] = True
    a_order = torch.cat([unvisited_cols[~in_chunk[unvisited_cols]], chunk_cols])
    H_AA = _with_dead_inputs_fixed(layer.hessian.index_select(0, a_order).index_select(1, a_order), torch.float32)
    nv, na = chunk_cols.numel(), a_order.numel()
    eye = torch.eye(na, dtype=H_AA.dtype, device=H_AA.device)
    lam = damping_value(H_AA, damp)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H_AA + lam * eye)
        if int(info) == 0:
            L_inv_V = torch.zeros(na, nv, dtype=L.dtype, device=L.device)
            L_inv_V[na - nv :] = torch.linalg.solve_triangular(L[na - nv :, na - nv :], eye[:nv, :nv], upper=False)
            C_AV = torch.linalg.solve_triangular(L.mT, L_inv_V, upper=True)
            if bool(torch.isfinite(C_AV).all()):
                if attempt:
                    warnings.warn(
                        f"H + damp*I on the unvisited columns was not positive definite; damping raised to "
                        f"{lam:.3g} ({attempt} retries)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return C_AV.mT.contiguous(), a_order
        lam = max(lam * 10.0, damping_value(H_AA, 1e-6))
    raise NumericalError(
        f"H + damp*I on the unvisited columns is not positive definite even with damping {lam:.3g}; the weight "
        "was left unchanged. Raise `damp`, compute H in float64, or use compensate='full' or 'local'"
    )


def _scopes_per_solve(layer: OBSLayer, pruned_per_scope: int) -> int:
    """Scopes one batched triangular solve takes: about ``_SOLVE_COLS`` pruned columns
    per group, its (R, P, P) systems within the gather budget."""
    per_group = 8 * max(1, layer.groups.num_groups)  # the system and its scaled copy, fp32
    cols = min(_SOLVE_COLS, math.isqrt(_GATHER_BUDGET // per_group))
    return max(1, cols // max(1, pruned_per_scope))


def _compensate_chunk(
    layer: OBSLayer,
    W: Tensor,
    C_VA: Tensor,
    row_of: Tensor,
    col_of: Tensor,
    a_cols: Tensor,
    best: Tensor,
    positions: Tensor,
    subsets: Tensor,
) -> None:
    """Prune the scopes at ``positions`` in order with a frozen C, compensating the columns A.

    The sequential rule (scope after scope, each pruned set P_j of a row removed by
    ``z_j = C_{P_j P_j}⁻¹ w_{P_j}``, ``w_A -= z_j C_{P_j, A}``, pruned columns
    held at zero) is linear in w: ``z_j`` solves
    ``C_{P_j P_j} z_j + Σ_{i<j} C_{P_i P_j}ᵀ z_i = w⁰_{P_j}``, a block lower
    triangular system in the row's pruned columns S (its diagonal blocks the
    scopes' C_PP), and then ``w_A -= z · C_{S, A}``. Scaled by the inverse
    diagonal blocks it is unit lower triangular, so every row group's system is
    solved in one batched ``solve_triangular``, and the compensation is one GEMM:
    the z's scattered into a dense (rows × V) matrix times the rows of C.

    ``C_VA``: rows of C at the chunk's columns (``row_of`` maps a weight column to
    its row, ``col_of`` to its column, ``a_cols`` lists A in C's column order).
    Scopes go in runs of about ``_SOLVE_COLS`` pruned columns per group (the
    (R, P, P) systems are gathered, so their cost grows with P); a run's update
    reaches later runs through the weights, as the sequential rule does.
    """
    g = layer.groups
    R, rpc = g.num_groups, g.rows_per_group
    device = W.device
    n, p = positions.numel(), subsets.shape[1]
    group_rows = g.rows.reshape(-1)
    # The group rows' weights on A, (R·rpc, |A|): row r·rpc + slot, columns in C_VA's order.
    Wa = W.index_select(0, group_rows).index_select(1, a_cols)
    # Pruned elements of every group, scope by scope: their columns and row slots (R, n, p).
    elems = subsets[best]
    cols = torch.gather(g.cols[positions].expand(R, n, -1), 2, elems)
    slots = torch.gather(g.local_rows[positions].expand(R, n, -1), 2, elems)
    w_row = torch.arange(R, device=device).view(R, 1, 1) * rpc + slots  # row of Wa
    a_idx = col_of[cols]
    v_idx = row_of[cols]
    # Each run's rows of C_VA: the span of its scopes' rows (one host sync per chunk).
    scope_rows = row_of[g.cols[positions]]
    first, last = scope_rows.amin(dim=1).tolist(), scope_rows.amax(dim=1).tolist()
    per_run = _scopes_per_solve(layer, p)
    for j0 in range(0, n, per_run):
        j1 = min(n, j0 + per_run)
        nb, P = j1 - j0, (j1 - j0) * p
        lo, hi = min(first[j0:j1]), max(last[j0:j1]) + 1
        rw, ca, cv = (t[:, j0:j1].reshape(R, P) for t in (w_row, a_idx, v_idx))
        s = slots[:, j0:j1].reshape(R, P)
        w_S = Wa[rw, ca]  # (R, P)
        # T[a, b] = C[col_b, col_a]: what pruning b adds to w at a's column, read
        # from b's row of C as the update GEMM reads it. Rows do not mix.
        T = C_VA[cv.unsqueeze(-2), ca.unsqueeze(-1)] * (s.unsqueeze(-1) == s.unsqueeze(-2))
        D = torch.diagonal(T.view(R, nb, p, nb, p), dim1=1, dim2=3).permute(0, 3, 1, 2)  # (R, nb, p, p)
        L, info = torch.linalg.cholesky_ex(0.5 * (D + D.mT))
        # A scope block that is not positive definite (round-off only) compensates nothing.
        D_inv = torch.where((info == 0).view(R, nb, 1, 1), torch.cholesky_inverse(L), 0.0)
        rhs = (D_inv @ w_S.view(R, nb, p, 1)).view(R, P, 1)
        scaled = (D_inv @ T.view(R, nb, p, P)).view(R, P, P)
        scope_of = torch.arange(P, device=device) // p
        scaled = scaled * (scope_of.unsqueeze(1) > scope_of.unsqueeze(0))  # strictly earlier scopes only
        z = torch.linalg.solve_triangular(scaled, rhs, upper=False, unitriangular=True).view(R, P)
        Y = torch.zeros(Wa.shape[0], hi - lo, dtype=Wa.dtype, device=device)
        Y[rw, cv - lo] = z
        Wa.addmm_(Y, C_VA[lo:hi], alpha=-1.0)
    # The pruned weights took later runs' updates too; nothing read them since.
    Wa[w_row.reshape(R, -1), a_idx.reshape(R, -1)] = 0.0
    W[group_rows.unsqueeze(1), a_cols] = Wa
