"""Structured OBS (Optimal Brain Surgeon) on any regular S3 pattern.

Notation (one weight row w, inverse Hessian ``C = (H + λI)⁻¹``): removing the set
S of coordinates costs ``w_Sᵀ (C_SS)⁻¹ w_S``; the optimal compensation of the
other weights is ``w ← w − C_{:,S} (C_SS)⁻¹ w_S``, after which the row's inverse
Hessian over the remaining coordinates is the Schur complement
``C ← C − C_{:,S} (C_SS)⁻¹ C_{S,:}``. Rows are independent (the layer loss is a
sum over rows), so a scope spanning several rows costs the sum of its rows' costs:
the scope's sub-block of C is block-diagonal by row.

Two families:

* :meth:`StructuredOBS.prune` — one shared ``C`` for all rows. Phase 1 picks, per
  (row group, scope), the subset of blocks with the least OBS cost among all
  ``C(g, g−nnz)`` subsets. Phase 2 compensates: ``local`` (inside the scope),
  ``full`` (every still-active column, scopes in sequence, C frozen), ``split``
  (C recomputed from H on the unvisited columns between ``n_splits`` column
  chunks, visited columns frozen), ``interleaved`` (as ``split``, with each chunk's
  masks selected from the compensated weights under the recomputed C).
* :meth:`StructuredOBS.prune_true_obs` — every row has its own C, Schur-updated
  after each batch of ``ng`` scopes; a batch's blocks are chosen by
  ``independent`` (Σ w²/diag C per block, exact block costs where rows compete)
  or ``joint`` (exact subset cost, op ``score_subsets``) scoring and compensated
  jointly on all remaining weights of the row. C is never stored: each row group
  keeps the factors of its updates (left-looking, op ``lowrank_sub`` forms the
  panels it reads), and the sweep is replayed per row chunk as a CUDA graph.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import ops
from ..checks import check_callable, check_choice, check_damp, check_dtype, check_finite, check_int
from ..dtypes import opmath_dtype
from ..errors import ArgumentError, NumericalError
from .hessian import _with_dead_inputs_fixed, check_hessian, damped_inverse, damping_value
from .replay import GraphReplay
from .sharding import AllRanks, RowShard, check_process_group
from .layout import RowGroups, block_subsets, count_subsets, normalize_nnz, row_groups, scope_layout

__all__ = ["StructuredOBS"]

# Largest number of candidate subsets per scope that exhaustive selection enumerates.
MAX_SUBSETS = 20_000
# Most columns one row group prunes in one batch of prune_true_obs (bounds C_SS and the panel).
MAX_PRUNED_PER_STEP = 256
# Conditional variance (diagonal of the Jacobi-scaled per-row C, 1 at the start)
# below which a stored C is treated as round-off: its row is redone in higher precision.
_HEALTH_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 0.0, torch.float64: 0.0}
# Factors held at once by prune_true_obs when chunk_size is not given (at least 32 rows).
_CHUNK_TARGET_BYTES = 4 << 30
# Bytes a gathered temporary (weights, C sub-blocks, C rows) may take; larger work is chunked.
_GATHER_BUDGET = 1 << 28
# Pruned columns per row group in one batched triangular solve of prune's phase 2: the
# gathers cost (rows × pruned columns × this), the launches (pruned columns / this).
_SOLVE_COLS = 128

_COMPENSATE = ("local", "full", "split", "interleaved")
_DEFAULT_DAMP = {"prune": 1e-2, "prune_true_obs": 1e-4}
_ORDERS = ("left_to_right", "largest_first")
_SCORINGS = ("independent", "joint")


def _free_memory_bytes(device: torch.device) -> int:
    """Memory the pruner may plan to use on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks the caching allocator holds but no tensor uses are free to us too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


_math_dtype = opmath_dtype  # the dtype to compute in for C stored in a given dtype


def _more_damping(damp: float, factor: float, relative_cap: float) -> float:
    """Damping ``factor`` times larger; a relative damping (< 1) stays relative, at most ``relative_cap``."""
    if damp >= 1.0:
        return damp * factor
    return max(damp, min(max(damp * factor, 1e-6), relative_cap))


class StructuredOBS:
    """Structured OBS pruner operating through a ScopeSpec.

    Args:
        scope: ScopeSpec whose blocks lie on one 2-D weight (M, K) — any regular
            pattern: N:M, coupled N:M, column blocks, row-coupled blocks.
        hessian: (K, K) layer Hessian ``XᵀX/N`` on the weight's device.
        damp: damping; relative to mean(diag H) when < 1, absolute otherwise.
            Default (None): 0.01 for :meth:`prune` (one C shared by all rows, frozen
            while it compensates: with 1e-4, ``full``/``split``/``interleaved`` lose to
            plain OBD on ill-conditioned Hessians, and 0.01 lowered their error on
            every real layer we measured), 1e-4 for :meth:`prune_true_obs` (exact
            Schur updates need little damping).
        inv_h: precomputed (K, K) damped inverse; skips the inversion (used by both
            methods, whatever ``damp`` says).
    """

    def __init__(self, scope, hessian: Tensor, damp: Optional[float] = None, inv_h: Optional[Tensor] = None):
        self.scope = scope
        self.layout = scope_layout(scope)
        self.W = self.layout.param
        self.M, self.num_cols = self.W.shape
        check_hessian(hessian, self.num_cols, like=self.W)
        self.hessian = hessian
        self._damp_arg = None if damp is None else check_damp(damp)
        self._inverses: dict = {}
        self.groups: RowGroups = row_groups(self.layout)
        self.blocks_per_scope = self.layout.blocks_per_scope
        self.bk = self.layout.block_numel
        # The most elements one row holds in one scope (E for per-row patterns).
        slots = torch.nn.functional.one_hot(self.groups.local_rows, self.groups.rows_per_group)
        self._row_elems_per_scope = int(slots.sum(dim=1).max()) if slots.numel() else 0
        self._inv_h = None
        if inv_h is not None:
            check_hessian(inv_h, self.num_cols, like=self.W, name="inv_h")
            self._inv_h = inv_h.to(torch.float32)

    def damp_for(self, method: str) -> float:
        """The damping ``method`` (``'prune'`` or ``'prune_true_obs'``) uses."""
        if self._damp_arg is not None:
            return self._damp_arg
        return _DEFAULT_DAMP[method]

    @property
    def damp(self) -> float:
        """The damping of :meth:`prune_true_obs` (see ``damp_for``)."""
        return self.damp_for("prune_true_obs")

    def inverse(self, damp: float) -> Tensor:
        """``(H + damp·I)⁻¹`` in fp32, computed once per damping (or the given ``inv_h``)."""
        if self._inv_h is not None:
            return self._inv_h
        if damp not in self._inverses:
            self._inverses[damp] = self.compute_inverse(self.hessian, damp)
        return self._inverses[damp]

    @property
    def inv_hessian(self) -> Tensor:
        """The damped inverse Hessian of :meth:`prune_true_obs`."""
        return self.inverse(self.damp)

    # ------------------------------------------------------------ basics
    @staticmethod
    def compute_inverse(hessian: Tensor, damp: float = 1e-4) -> Tensor:
        """``(H + damp·I)⁻¹`` (damp relative to mean(diag H) when < 1), fp32.

        Dead inputs (zero diagonal) get unit curvature; damping is raised (with a
        warning) until the matrix is positive definite.
        """
        return damped_inverse(hessian, damp, what="StructuredOBS's H + damp*I")[0]

    def _num_prune(self, nnz: int) -> int:
        return self.blocks_per_scope - normalize_nnz(nnz, self.blocks_per_scope)

    def _subsets(self, num_prune: int) -> Tensor:
        n = count_subsets(self.blocks_per_scope, num_prune)
        if n > MAX_SUBSETS:
            raise ArgumentError(
                f"choosing {num_prune} of {self.blocks_per_scope} blocks per scope has {n} candidate subsets "
                f"(more than {MAX_SUBSETS}); use prune_true_obs(scoring='independent') or SparseGPT for this pattern"
            )
        return block_subsets(self.blocks_per_scope, num_prune, self.bk, self.W.device)[1]

    def _check_weight_finite(self) -> None:
        """The weight holds no NaN/Inf now (it may have changed since the pruner was built)."""
        check_finite(self.W, "the weight behind `scope`")

    def _working_copy(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.W.detach().to(dtype, copy=True)

    def _write_back(self, W: Tensor) -> None:
        if not torch.isfinite(W).all():
            raise NumericalError(
                "Structured OBS produced non-finite weights (an overflow: weights or H too large for float32, or H "
                "too ill-conditioned); the weight was left unchanged. Raise `damp`, or prune this layer with prune_obd"
            )
        self.W.data.copy_(W.to(self.W.dtype))

    def _positions_by_col_chunk(self, block_size: int) -> list[Tensor]:
        """Scope positions split so that each chunk's first columns span ``block_size`` columns."""
        first = self.groups.cols.amin(dim=1).cpu()
        chunk_of = torch.div(first, max(int(block_size), 1), rounding_mode="floor")
        bounds = torch.unique_consecutive(chunk_of, return_counts=True)[1].tolist()
        return list(torch.arange(len(first)).split(bounds))

    def _gather_weights(self, W: Tensor, positions: Tensor) -> Tensor:
        """Weights of the scopes at ``positions`` of every group: (R, n, E)."""
        g = self.groups
        rows = g.rows[:, g.local_rows[positions]]
        return W[rows, g.cols[positions]]

    def _shared_blocks(
        self, C: Tensor, positions: Tensor, col_map: Optional[Tensor] = None, row_map: Optional[Tensor] = None
    ) -> Tensor:
        """Block-diagonal-by-row sub-blocks of a shared C for the scopes at ``positions``: (n, E, E).

        ``row_map`` / ``col_map`` turn a column of the weight into a row / column of
        ``C`` (``row_map`` defaults to ``col_map``, both to the identity), so ``C`` may
        hold only some rows of the inverse. The blocks are symmetrised (exact for a
        symmetric C; rows computed by triangular solves differ from their transpose
        by round-off).
        """
        g = self.groups
        cols = g.cols[positions]
        rows = cols if row_map is None and col_map is None else (row_map if row_map is not None else col_map)[cols]
        if col_map is not None:
            cols = col_map[cols]
        lr = g.local_rows[positions]
        block = C[rows.unsqueeze(-1), cols.unsqueeze(-2)]
        return 0.5 * (block + block.mT) * (lr.unsqueeze(-1) == lr.unsqueeze(-2))

    # ------------------------------------------------------------ prune (shared C)
    def _select_shared(
        self, W: Tensor, C: Optional[Tensor], positions: Tensor, subsets: Tensor, col_map: Optional[Tensor] = None,
        blocks_of: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> tuple[Tensor, Tensor]:
        """Least-cost subset per (group, position) under a shared C (or the blocks
        ``blocks_of(positions)`` gives): (best, cost), each (R, n)."""
        R, E = self.groups.num_groups, self.layout.elems_per_scope
        per_item = max(1, R * subsets.shape[0] * (subsets.shape[1] ** 2 + E))
        step = max(1, _GATHER_BUDGET // (4 * per_item))
        best, cost = [], []
        for chunk in positions.split(step):
            w = self._gather_weights(W, chunk).reshape(-1, E)
            blocks = blocks_of(chunk) if blocks_of is not None else self._shared_blocks(C, chunk, col_map)
            c_index = torch.arange(chunk.numel(), device=W.device).repeat(R)
            costs, b = ops.score_subsets(w, blocks, subsets, c_index)
            best.append(b.view(R, -1))
            cost.append(costs.gather(1, b.unsqueeze(1)).view(R, -1))
        return torch.cat(best, dim=1), torch.cat(cost, dim=1)

    def _local_inverse_blocks(self, positions: Tensor, damp: float) -> Tensor:
        """``(H_SS + λI)⁻¹`` of each scope at ``positions``, block-diagonal by row: (n, E, E)."""
        g = self.groups
        cols = g.cols[positions]
        lr = g.local_rows[positions]
        same_row = lr.unsqueeze(-1) == lr.unsqueeze(-2)
        H_SS = self.hessian.to(torch.float32)[cols.unsqueeze(-1), cols.unsqueeze(-2)] * same_row
        diag = torch.diagonal(H_SS, dim1=1, dim2=2)
        diag.masked_fill_(diag == 0, 1.0)  # dead inputs: unit curvature, as for the full inverse
        lam = damping_value(self.hessian, damp)
        eye = torch.eye(H_SS.shape[-1], dtype=H_SS.dtype, device=H_SS.device)
        for _ in range(6):
            L, info = torch.linalg.cholesky_ex(H_SS + lam * eye)
            if not bool((info != 0).any()):
                return torch.cholesky_inverse(L)
            lam = max(lam * 10.0, damping_value(self.hessian, 1e-6))
        raise NumericalError("a scope's H_SS + damp*I is not positive definite even with heavy damping; the weight "
                             "was left unchanged. Raise `damp` or compute H in float64")

    def _compensate_local(self, W: Tensor, best: Tensor, subsets: Tensor, blocks_of: Callable[[Tensor], Tensor]) -> None:
        """Prune each scope's chosen subset and compensate inside the scope only."""
        g = self.groups
        E = self.layout.elems_per_scope
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

    def _unvisited_inverse_rows(self, unvisited_cols: Tensor, chunk_cols: Tensor, damp: float) -> tuple[Tensor, Tensor]:
        """Rows at the chunk's columns V of ``C = (H_AA + λI)⁻¹``, A the unvisited columns.

        Returns ``(C_VA, a_order)``: C_VA is (|V|, |A|), its rows in the order of
        ``chunk_cols`` (V ⊂ A, ascending) and its columns in ``a_order`` = [A∖V, V].
        λ and the dead-input fix are those of ``damped_inverse`` on H_AA (damping
        relative to mean(diag H_AA), raised tenfold until H_AA + λI is positive
        definite). With V ordered last, ``L⁻¹`` (L the Cholesky factor) restricted to
        V's columns is ``[0; L_VV⁻¹]``, so the rows cost one triangular solve with |V|
        right-hand sides instead of a whole inverse.
        """
        in_chunk = torch.zeros(self.num_cols, dtype=torch.bool, device=unvisited_cols.device)
        in_chunk[chunk_cols] = True
        a_order = torch.cat([unvisited_cols[~in_chunk[unvisited_cols]], chunk_cols])
        H_AA = _with_dead_inputs_fixed(self.hessian.index_select(0, a_order).index_select(1, a_order), torch.float32)
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

    def _scopes_per_solve(self, pruned_per_scope: int) -> int:
        """Scopes one batched triangular solve takes: about ``_SOLVE_COLS`` pruned columns
        per group, its (R, P, P) systems within the gather budget."""
        per_group = 8 * max(1, self.groups.num_groups)  # the system and its scaled copy, fp32
        cols = min(_SOLVE_COLS, math.isqrt(_GATHER_BUDGET // per_group))
        return max(1, cols // max(1, pruned_per_scope))

    def _compensate_chunk(
        self,
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
        g = self.groups
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
        per_run = self._scopes_per_solve(p)
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

    @torch.no_grad()
    def prune(self, nnz: int, block_size: int = 2048, compensate: str = "local", n_splits: int = 1) -> None:
        """Prune to ``nnz`` blocks per scope with a shared inverse Hessian, in place.

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

        Args:
            nnz: blocks kept per scope.
            block_size: column chunk for the subset search (bounds memory).
            compensate: ``'local'``, ``'full'``, ``'split'`` or ``'interleaved'``.
            n_splits: column chunks for ``'split'`` / ``'interleaved'``.
        """
        self._check_weight_finite()
        check_choice(compensate, "compensate", _COMPENSATE)
        n_splits = check_int(n_splits, "n_splits", minimum=1, what="column chunks")
        block_size = check_int(block_size, "block_size", minimum=1, what="columns per selection chunk")
        num_prune = self._num_prune(nnz)
        if num_prune == 0:
            return
        subsets = self._subsets(num_prune)
        damp = self.damp_for("prune")
        C = self.inverse(damp)
        W = self._working_copy()
        G = self.groups.scopes_per_group
        device = W.device
        all_cols = torch.arange(self.num_cols, device=device)
        if compensate == "local":
            local = lambda positions: self._local_inverse_blocks(positions, damp)  # noqa: E731
            best = torch.cat(
                [self._select_shared(W, None, pos.to(device), subsets, blocks_of=local)[0]
                 for pos in self._positions_by_col_chunk(block_size)],
                dim=1,
            )
            self._compensate_local(W, best, subsets, local)
            self._write_back(W)
            return

        splits = 1 if compensate == "full" else int(n_splits)
        chunks = [c for c in torch.arange(G, device=device).tensor_split(splits) if c.numel()]
        reselect = compensate == "interleaved"
        if not reselect:
            best_all = torch.cat(
                [self._select_shared(W, C, pos.to(device), subsets)[0]
                 for pos in self._positions_by_col_chunk(block_size)],
                dim=1,
            )
        unvisited = torch.ones(self.num_cols, dtype=torch.bool, device=device)
        row_of = torch.full((self.num_cols,), -1, dtype=torch.long, device=device)
        col_of = torch.full((self.num_cols,), -1, dtype=torch.long, device=device)
        for k, positions in enumerate(chunks):
            chunk_cols = torch.unique(self.groups.cols[positions])
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
                C_VA = C if chunk_cols.numel() == self.num_cols else C.index_select(0, chunk_cols)
            else:
                C_VA, a_cols = self._unvisited_inverse_rows(all_cols[unvisited], chunk_cols, damp)
            row_of.fill_(-1)
            row_of[chunk_cols] = torch.arange(chunk_cols.numel(), device=device)
            col_of.fill_(-1)
            col_of[a_cols] = torch.arange(a_cols.numel(), device=device)
            # The chunk's masks: chosen up front ('split') or now, from the weights
            # compensated so far under C_k ('interleaved'). Either way the chunk is
            # pruned with C_k frozen and compensates the unvisited columns only.
            if reselect:
                blocks = lambda pos: self._shared_blocks(C_VA, pos, col_of, row_of)  # noqa: E731
                best = self._select_shared(W, None, positions, subsets, blocks_of=blocks)[0]
            else:
                best = best_all[:, positions]
            self._compensate_chunk(W, C_VA, row_of, col_of, a_cols, best, positions, subsets)
            unvisited[chunk_cols] = False
        self._write_back(W)

    # ------------------------------------------------------------ prune_true_obs (per-row C)
    def _prescore_order(self, W: Tensor, num_prune: int, scoring: str) -> Tensor:
        """Scope positions by descending OBS cost under the shared C (summed over groups)."""
        g = self.groups
        positions = torch.arange(g.scopes_per_group, device=W.device)
        if scoring == "joint" and count_subsets(self.blocks_per_scope, num_prune) <= MAX_SUBSETS:
            _, cost = self._select_shared(W, self.inv_hessian, positions, self._subsets(num_prune))
        else:
            d = torch.diagonal(self.inv_hessian)[g.cols]  # (G, E)
            w = self._gather_weights(W, positions)  # (R, G, E)
            block_cost = (w * w / d).view(*w.shape[:2], self.blocks_per_scope, self.bk).sum(-1)
            cost = block_cost.sort(dim=-1).values[..., :num_prune].sum(-1)
        return torch.argsort(cost.sum(dim=0), descending=True, stable=True)

    def _auto_chunk_rows(self, c_dtype: torch.dtype, plan: "_LazyPlan") -> int:
        """Rows per chunk: within half the free memory, and no more than ~4 GiB of
        factors (or 32 rows): with the sweep replayed as a CUDA graph, smaller chunks
        cost little time, and the peak stays near 8 GiB on a 2560×9728 layer."""
        rpc = self.groups.rows_per_group
        per_row = -(-plan.bytes_per_group(c_dtype, rpc) // rpc)
        fits = _free_memory_bytes(self.W.device) // 2 // per_row
        useful = max(32, _CHUNK_TARGET_BYTES // per_row)
        return int(max(1, min(fits, useful, self.M)))

    def _lazy_plan(self, batches: list[Tensor], p_max: int) -> "_LazyPlan":
        """Column order and panel bounds of left-looking True OBS for these batches.

        Columns are ordered by the last batch that visits them: the rows of the
        factors that batch b and every later batch read are then one suffix
        ``[start[b], Kc)`` of that order. Columns no scope visits are left out.
        """
        g = self.groups
        K = self.num_cols
        device = self.W.device
        last = torch.full((K,), -1, dtype=torch.long, device=device)
        for b, positions in enumerate(batches):
            last[g.cols[positions].reshape(-1)] = b
        visited = torch.nonzero(last >= 0).squeeze(1)
        order = visited[torch.sort(last[visited], stable=True).indices]
        pos = torch.full((K + 1,), -1, dtype=torch.long, device=device)  # pos[K] = -1 for padding
        pos[order] = torch.arange(order.numel(), device=device)
        counts = torch.bincount(last[visited], minlength=len(batches))
        start = (torch.cumsum(counts, 0) - counts).tolist()
        return _LazyPlan(order=order, pos=pos, start=start, p=p_max)

    def _scope_blocks(self, U: Tensor, owner: Tensor, C0p: Tensor, pcols: Tensor, lr: Tensor, o: int) -> Tensor:
        """Current C of each row on each scope's elements, block-diagonal by row: (Rc·n, E, E).

        Row r's C is ``C0 - Σ_i U[:, i] U[:, i]ᵀ`` over the factor columns i it owns.
        """
        Rc = U.shape[0]
        n, E = pcols.shape
        Ug = U[torch.arange(Rc, device=U.device).view(Rc, 1, 1), pcols, :o]  # (Rc, n, E, o)
        mine = owner[:, None, None, :o] == lr[None, :, :, None]
        base = C0p[pcols.unsqueeze(-1), pcols.unsqueeze(-2)].expand(Rc, n, E, E).reshape(Rc * n, E, E)
        blocks = ops.lowrank_sub(base, (Ug * mine).reshape(Rc * n, E, o), Ug.reshape(Rc * n, E, o))
        same_row = (lr.unsqueeze(-1) == lr.unsqueeze(-2)).repeat(Rc, 1, 1)
        return blocks * same_row

    def _true_obs_chunk(
        self,
        w_rows: Tensor,
        batches: list[Tensor],
        nnz: int,
        scoring: str,
        subsets: Optional[Tensor],
        inv: "_ScaledInverse",
        c_dtype: torch.dtype,
        plan: "_LazyPlan",
    ) -> tuple[Tensor, Tensor]:
        """True OBS for the rows ``w_rows`` (B, K) of Rc whole row groups (group-major);
        returns their new rows (B, K) fp32 and a failed-group mask (Rc,). ``inv`` is
        C0 = (H + λI)⁻¹ in Jacobi-scaled coordinates, for ``plan``.

        Left-looking form. Row r's C after batches 1..i-1 is ``C0 - Σ_j U_j U_jᵀ``
        with ``U_j = C_{j-1}[:, S_j] L_j⁻ᵀ`` (``L_j`` the Cholesky factor of
        ``C_{j-1}[S_j, S_j]``), so only the factors U are stored (c_dtype) and each
        batch forms just what it reads: the diagonal (or scope blocks) of its
        columns for scoring, and the panel ``C[S_b, R]`` over the columns R that
        later batches still visit. A row group (rows whose scopes couple them)
        keeps one factor matrix: each factor column belongs to the one row that
        pruned that column, so a batch of a row-coupled pattern costs one group's
        pruned columns, not every row's worst case. Sequential OBS steps equal
        one joint step on the union S of a row's pruned columns, so its final
        weights are ``w0 - C0[:, S] C0[S, S]⁻¹ w0[S]``, ``C0[S, S]⁻¹ w0[S]`` being
        solved through the block-triangular factor the U's form (forward during
        the sweep, backward at the end) and the product by the shared C0 one GEMM.

        Every shape here depends on the batch index only, and nothing waits for
        the device: the whole sweep can be recorded once and replayed per chunk.
        """
        g = self.groups
        rpc, E, bk = g.rows_per_group, self.layout.elems_per_scope, self.bk
        B = w_rows.shape[0]
        Rc = B // rpc
        device = w_rows.device
        math_dtype = _math_dtype(c_dtype)
        split = c_dtype in (torch.float16, torch.bfloat16)
        P, Kc, nb = plan.p, plan.order.numel(), len(batches)
        pruned_per_scope = (self.blocks_per_scope - nnz) * bk  # per group, exactly
        col_scale, C0s, C0p = inv.scale, inv.C, inv.C_plan
        C0p_diag = torch.diagonal(C0p)
        w0 = (w_rows.to(col_scale.dtype) / col_scale).to(math_dtype)  # (B, K), scaled
        w_cur = w0[:, plan.order].contiguous()  # (B, Kc): current weights, plan order
        U = torch.zeros(Rc, Kc, nb * P, dtype=c_dtype, device=device)  # group factors, P columns a batch
        owner = torch.full((Rc, nb * P), -1, dtype=torch.long, device=device)  # row slot of each factor column
        z = torch.zeros(Rc, nb * P, dtype=math_dtype, device=device)
        Linv_all = torch.empty(nb, Rc, P, P, dtype=math_dtype, device=device)
        S_all = torch.empty(nb, Rc, P, dtype=torch.long, device=device)  # plan positions, -1 pad
        health_tol = _HEALTH_TOL[c_dtype]
        failed = torch.zeros(Rc, dtype=torch.bool, device=device)
        alive = torch.ones(B, Kc + 1, dtype=torch.bool, device=device)  # spare column for padding
        g_idx = torch.arange(Rc, device=device).unsqueeze(1)
        slots = torch.arange(rpc, device=device)
        local_base = (torch.arange(Rc, device=device) * rpc).view(Rc, 1, 1)
        eye = torch.eye(P, dtype=math_dtype, device=device)
        for bi, positions in enumerate(batches):
            s0, o = plan.start[bi], bi * P
            cols = g.cols[positions]  # (n, E)
            pcols = plan.pos[cols]  # (n, E) plan positions
            lr = g.local_rows[positions]  # (n, E) row slot of each element
            row_local = local_base + lr  # (Rc, n, E)
            w = w_cur[row_local, pcols]
            n = positions.numel()
            # 'independent' scores each block on its own: Σ w² / C_cc over its elements
            # where scopes lie in one row; its exact OBS cost w_bᵀ (C_bb)⁻¹ w_b where
            # rows compete for a scope (measured better there on real layers, and
            # worse for row-local blocks of 2 under batches of 64 scopes).
            # 'joint' scores whole subsets of a scope exactly.
            if scoring == "independent" and rpc == 1:
                Ug = U[g_idx.unsqueeze(-1), pcols, :o]  # (Rc, n, E, o)
                d = C0p_diag[pcols] - torch.linalg.vector_norm(Ug, dim=-1, dtype=math_dtype).square()
                cost = w * w / d.clamp(min=torch.finfo(d.dtype).tiny)
                block_cost = cost.view(Rc, n, self.blocks_per_scope, bk).sum(-1)
            else:
                blocks = self._scope_blocks(U, owner, C0p, pcols, lr, o)  # (Rc·n, E, E)
                d = torch.diagonal(blocks, dim1=1, dim2=2).reshape(Rc, n, E)
                if scoring == "independent":
                    block_cost = _block_costs(w.reshape(-1, E), blocks, self.blocks_per_scope).view(Rc, n, -1)
                else:
                    _, best = ops.score_subsets(w.reshape(-1, E).to(math_dtype), blocks, subsets)
            # A visited coordinate's conditional variance (diag of C~, 1 at the start)
            # at or below the storage's noise level means the group's factors no longer
            # describe its C: the group is redone in higher precision.
            failed |= ((d <= health_tol) | ~torch.isfinite(d)).reshape(Rc, -1).any(dim=1)
            if scoring == "independent":
                _, keep = ops.kth_largest(block_cost, nnz)
                pruned = (~keep).repeat_interleave(bk, dim=-1)
            else:
                pruned = torch.zeros(Rc * n, E, dtype=torch.bool, device=device)
                pruned.scatter_(1, subsets[best], True)
                pruned = pruned.view(Rc, n, E)
            # The group's pruned elements, in element order: every group prunes exactly
            # pruned_per_scope elements of each scope.
            Pb = n * pruned_per_scope
            sel = torch.sort(pruned.reshape(Rc, n * E).to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :Pb]
            S = torch.nn.functional.pad(pcols.reshape(-1)[sel], (0, P - Pb), value=-1)  # (Rc, P) positions
            slot = torch.nn.functional.pad(lr.reshape(-1)[sel], (0, P - Pb), value=0)  # (Rc, P)
            row_of = g_idx * rpc + slot  # (Rc, P) row within the chunk
            valid = (S >= 0) & ~failed.unsqueeze(1)
            Sc = torch.where(valid, S, s0)  # padding reads a harmless position
            # Panel C_row[S_b, R] = C0[S_b, R] - Σ_{own factor cols} U[S_b] U[R]ᵀ, R = [s0, Kc).
            a = U[g_idx, Sc, :o]
            if rpc > 1:
                a = a * (owner[:, None, :o] == slot.unsqueeze(-1))
            panel = ops.lowrank_sub(C0p[:, s0:][Sc], a, U[:, s0:, :o])  # (Rc, P, |R|)
            C_SS = torch.gather(panel, 2, (Sc - s0).unsqueeze(1).expand(Rc, P, P))
            same = valid.unsqueeze(-1) & valid.unsqueeze(-2)
            if rpc > 1:
                same = same & (slot.unsqueeze(-1) == slot.unsqueeze(-2))
            C_SS = torch.where(same, 0.5 * (C_SS + C_SS.mT), eye)
            piv = torch.diagonal(C_SS, dim1=1, dim2=2)
            bad = ((piv <= health_tol) | ~torch.isfinite(piv)).logical_and(valid).any(dim=1)
            L, info = torch.linalg.cholesky_ex(C_SS)
            bad |= info != 0
            failed |= bad
            ok = valid & ~bad.unsqueeze(1)
            L = torch.where(bad.view(Rc, 1, 1), eye, L)
            # L⁻¹ (block-diagonal by row); rows of padding zeroed, so U_b's padding
            # columns are zero whatever the panel holds there.
            Linv = torch.linalg.solve_triangular(L, eye.expand(Rc, P, P), upper=False) * ok.unsqueeze(-1)
            # U_b = C[R, S_b] L⁻ᵀ = panelᵀ Linvᵀ, one GEMM; for fp16/bf16 factors in
            # hi + lo parts (3 products), which keeps it at fp32 accuracy on tensor cores.
            if split:
                ph = panel.to(c_dtype)
                pl = (panel - ph.to(math_dtype)).to(c_dtype)
                Lh = Linv.to(c_dtype)
                Ll = (Linv - Lh.to(math_dtype)).to(c_dtype)
                lhs, rhs = torch.cat([ph, ph, pl], dim=1).mT, torch.cat([-Lh, -Ll, -Lh], dim=2)
            else:
                lhs, rhs = panel.mT, -Linv
            Ub = ops.lowrank_sub(torch.zeros(Rc, Kc - s0, P, dtype=math_dtype, device=device), lhs, rhs)
            U[:, s0:, o : o + P] = Ub.to(c_dtype)
            # z_b = L⁻¹ w[S_b];  w[R] -= U_b z_b (into each pruned column's own row).
            zb = torch.bmm(Linv, (w_cur[row_of, Sc] * ok).unsqueeze(-1)).squeeze(-1)
            if rpc == 1:
                w_cur[:, s0:] -= torch.bmm(Ub, zb.unsqueeze(-1)).squeeze(-1)
            else:
                mine = (slot.unsqueeze(-1) == slots).to(math_dtype)  # (Rc, P, rpc)
                w_cur.view(Rc, rpc, Kc)[:, :, s0:] -= torch.bmm(Ub, zb.unsqueeze(-1) * mine).mT
            owner[:, o : o + P] = torch.where(ok, slot, -1)
            z[:, o : o + P] = zb
            Linv_all[bi] = Linv
            S_all[bi] = torch.where(ok, S, -1)
            # (fills and copies only from device tensors: nothing crosses from the host,
            # so the sweep can be recorded as a CUDA graph)
            alive.view(-1).index_fill_(0, (row_of * (Kc + 1) + torch.where(ok, S, Kc)).view(-1), False)
            alive[:, Kc].fill_(True)
            w_cur.masked_fill_(~alive[:, :Kc], 0.0)
        # Backward solve: y = Lfull⁻ᵀ z, batch by batch from the last; v holds y at
        # the plan positions solved so far, one row of v per weight row.
        v = torch.zeros(B, Kc + 1, dtype=math_dtype, device=device)
        for bi in range(nb - 1, -1, -1):
            s0, o = plan.start[bi], bi * P
            S = S_all[bi]
            slot = owner[:, o : o + P].clamp(min=0)
            v_rows = v.view(Rc, rpc, Kc + 1)[:, :, s0:Kc]
            t = torch.bmm(U[:, s0:, o : o + P].mT.to(math_dtype), v_rows.mT)  # (Rc, P, rpc): U_bᵀ v
            rhs = z[:, o : o + P] - t.gather(2, slot.unsqueeze(-1)).squeeze(-1)
            y = torch.bmm(Linv_all[bi].mT, rhs.unsqueeze(-1)).squeeze(-1)
            flat = (g_idx * rpc + slot) * (Kc + 1) + torch.where(S >= 0, S, Kc)
            v.view(-1).index_copy_(0, flat.view(-1), torch.where(S >= 0, y, 0.0).view(-1))
            v[:, Kc].fill_(0.0)
        Y = torch.zeros(B, self.num_cols, dtype=math_dtype, device=device)
        Y[:, plan.order] = v[:, :Kc]
        w_new = w0 - Y @ C0s  # C0s symmetric: row r is w0 - C0[:, S] y
        pruned_cols = torch.zeros(B, self.num_cols, dtype=torch.bool, device=device)
        pruned_cols[:, plan.order] = ~alive[:, :Kc]
        w_new.masked_fill_(pruned_cols, 0.0)
        failed |= ~torch.isfinite(w_new).view(Rc, -1).all(dim=1)
        Wc = (w_new.to(col_scale.dtype) * col_scale).to(torch.float32)
        return Wc, failed

    @torch.no_grad()
    def prune_true_obs(
        self,
        nnz: int,
        ng: Optional[int] = None,
        chunk_size: Optional[int] = None,
        order: str = "left_to_right",
        scoring: str = "independent",
        c_dtype: Optional[torch.dtype] = None,
        progress_fn: Optional[Callable[[str], None]] = None,
        process_group=None,
    ) -> None:
        """Per-row True OBS with Schur-complement updates, in place.

        Every row keeps its own inverse Hessian C, updated after each batch of
        ``ng`` scopes; the batch's blocks are chosen per scope (``independent``:
        the blocks of least Σ w²/C_cc, or where rows compete for a scope, of least
        exact cost ``w_bᵀ (C_bb)⁻¹ w_b`` each; ``joint``: the subset of least exact
        OBS cost) and
        compensated jointly on every remaining weight of the row, including kept
        weights of scopes already done. Rows that share a scope (row-coupled
        patterns) compete by these costs, each under its own C.

        Args:
            nnz: blocks kept per scope.
            ng: scopes per batch (capped so a row group prunes at most 256 columns
                per step). Default: 64, and 1 for row-coupled patterns — there the
                rows compete for every scope, and a batch chosen with a stale C
                costs 2–14% output error on real layers.
            chunk_size: rows held at once (each group with its K × pruned factors);
                default: from free memory.
            order: ``'left_to_right'`` or ``'largest_first'`` (scopes by descending
                pre-scored cost under the shared C).
            scoring: ``'independent'`` or ``'joint'``.
            c_dtype: storage of the per-row C; default fp16 (math is fp32).
            progress_fn: optional ``callable(str)`` for progress messages.
            process_group: a torch.distributed ProcessGroup to split the rows over
                (every rank of it calls this with the same arguments on a pruner
                built from the same weight and H, e.g. all-reduced): each rank
                prunes a contiguous run of whole row groups (rows sharing a scope
                stay together), the rows are gathered, and every rank ends with
                the whole pruned weight — the one a single process computes, up
                to round-off. ``None``: this process prunes every row.

        Rows whose sub-problem turns out not positive definite (fp16 round-off,
        rank-deficient H) are redone in fp32, then with more damping, then in
        fp64; a warning says how many (over all ranks). The weight is written
        once, at the end; on any error it is left unchanged (on every rank: with
        a process group, an error on one rank is raised on all).
        """
        group = check_process_group(process_group)
        with AllRanks(group, "pruning its rows with True OBS") as sync:
            shard = W = None
            sync.payload = 0
            self._check_weight_finite()
            check_choice(order, "order", _ORDERS)
            check_choice(scoring, "scoring", _SCORINGS)
            if ng is None:
                ng = 1 if self.groups.rows_per_group > 1 else 64
            ng = check_int(ng, "ng", minimum=1, what="scopes per batch")
            if chunk_size is not None:
                chunk_size = check_int(chunk_size, "chunk_size", minimum=1, what="rows held at once, or None")
            c_dtype = torch.float16 if c_dtype is None else c_dtype
            check_dtype(c_dtype, "c_dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
            check_callable(progress_fn, "progress_fn")
            num_prune = self._num_prune(nnz)
            if num_prune:
                g = self.groups
                todo = torch.arange(g.num_groups, device=self.W.device)
                if group is not None:
                    shard = RowShard.of_groups(g.rows, group)
                    todo = todo[shard.group_bounds[shard.rank] : shard.group_bounds[shard.rank + 1]]
                W = self._working_copy()
                sync.payload = self._true_obs_groups(W, todo, num_prune, ng, chunk_size, order, scoring, c_dtype,
                                                     progress_fn)
        if W is None:  # nothing to prune
            return
        if shard is not None:
            shard.gather(W, W[shard.rows])
        redone = sum(sync.results)
        if redone:
            warnings.warn(
                f"prune_true_obs: {redone} of {self.M} rows hit a non-positive-definite sub-problem and were redone "
                "with fp32 C / more damping",
                RuntimeWarning,
                stacklevel=2,
            )
        if progress_fn is not None:
            progress_fn("")
        self._write_back(W)

    def _true_obs_groups(
        self,
        W: Tensor,
        todo: Tensor,
        num_prune: int,
        ng: int,
        chunk_size: Optional[int],
        order: str,
        scoring: str,
        c_dtype: torch.dtype,
        progress_fn: Optional[Callable[[str], None]],
    ) -> int:
        """True OBS on the row groups ``todo``, in place on their rows of ``W`` (the
        working copy: other rows are read only by ``largest_first``'s pre-scoring).
        Returns the number of rows redone at a higher retry level."""
        nnz = self.blocks_per_scope - num_prune
        pruned_per_scope = num_prune * self.bk
        subsets = self._subsets(num_prune) if scoring == "joint" else None
        g = self.groups
        device = self.W.device

        positions = (
            self._prescore_order(W, num_prune, scoring)
            if order == "largest_first"
            else torch.arange(g.scopes_per_group, device=device)
        )
        # A row group prunes exactly pruned_per_scope columns in each scope.
        ng_eff = max(1, min(int(ng), MAX_PRUNED_PER_STEP // max(1, pruned_per_scope)))
        batches = list(positions.split(ng_eff))
        plan = self._lazy_plan(batches, ng_eff * pruned_per_scope)

        rpc = g.rows_per_group
        rows_per_chunk = int(chunk_size) if chunk_size is not None else self._auto_chunk_rows(c_dtype, plan)
        groups_per_chunk = max(1, rows_per_chunk // rpc)

        damp = self.damp_for("prune_true_obs")
        levels = [(c_dtype, damp)]
        if c_dtype in (torch.float16, torch.bfloat16):
            levels.append((torch.float32, damp))
        levels += [(torch.float32, _more_damping(damp, 100.0, 0.1)), (torch.float64, _more_damping(damp, 1e4, 0.5))]

        redone = 0
        for level, (dtype, damp) in enumerate(levels):
            if todo.numel() == 0:
                break
            if level == 0 and dtype != torch.float64:
                C0 = self.inv_hessian
            else:
                C0 = damped_inverse(self.hessian, damp, dtype=_math_dtype(dtype), what="H + damp*I")[0]
            if level:
                redone += todo.numel() * rpc
            failed_all = []
            n_chunks = math.ceil(todo.numel() / groups_per_chunk)
            # Every full chunk runs the same kernels: record them once (CUDA), replay per
            # chunk. score_subsets checks its subsets on the host, so 'joint' runs eagerly.
            inv = _ScaledInverse.of(C0, _math_dtype(dtype), plan.order)

            def sweep(w_rows, dtype=dtype, inv=inv):
                return self._true_obs_chunk(w_rows, batches, nnz, scoring, subsets, inv, dtype, plan)

            def warmup(dtype=dtype, C0=C0):
                mini = batches[:2]
                mini_plan = self._lazy_plan(mini, plan.p)
                self._true_obs_chunk(W[g.rows[todo[:1]].reshape(-1)], mini, nnz, scoring, subsets,
                                     _ScaledInverse.of(C0, _math_dtype(dtype), mini_plan.order), dtype, mini_plan)

            replay = GraphReplay(sweep, warmup=warmup, enabled=scoring != "joint" and len(batches) > 1)
            for ci, group_index in enumerate(todo.split(groups_per_chunk)):
                if progress_fn is not None:
                    progress_fn(
                        f"true OBS: rows chunk {ci + 1}/{n_chunks} ({group_index.numel() * rpc} rows"
                        + (f", retry level {level}" if level else "") + ")"
                    )
                rows = g.rows[group_index].reshape(-1)
                Wc, failed = replay(W[rows])
                ok_rows = g.rows[group_index[~failed]].reshape(-1)
                W[ok_rows] = Wc.view(group_index.numel(), rpc, -1)[~failed].reshape(-1, self.num_cols).to(W.dtype)
                failed_all.append(group_index[failed])
            replay.release()
            todo = torch.cat(failed_all) if failed_all else todo[:0]
        if todo.numel():
            raise NumericalError(
                f"{todo.numel() * rpc} rows stayed numerically unstable even in fp64 with heavy damping; "
                "the weight was left unchanged. Raise `damp`, compute H in float64, or use prune() or SparseGPT"
            )
        return redone


def _block_costs(w: Tensor, blocks: Tensor, blocks_per_scope: int) -> Tensor:
    """Exact OBS cost ``w_bᵀ (C_bb)⁻¹ w_b`` of every block of every scope on its own:
    w (N, E), blocks (N, E, E) → (N, blocks_per_scope); +inf where C_bb is not PD."""
    N, E = w.shape
    bk = E // blocks_per_scope
    idx = torch.arange(blocks_per_scope, device=w.device)
    C_bb = blocks.view(N, blocks_per_scope, bk, blocks_per_scope, bk)[:, idx, :, idx].transpose(0, 1)  # (N, g, bk, bk)
    L, info = torch.linalg.cholesky_ex(C_bb.to(w.dtype))
    y = torch.linalg.solve_triangular(L, w.view(N, blocks_per_scope, bk, 1), upper=False)
    return torch.where(info == 0, y.square().sum(dim=(-1, -2)), torch.inf)


@dataclass(frozen=True)
class _ScaledInverse:
    """C0 = (H + λI)⁻¹ in Jacobi-scaled coordinates, C~ = D^-1/2 C0 D^-1/2 with D = diag(C0)
    (unit diagonal; w~ = D^-1/2 w). OBS costs and compensations are the same in them,
    and every column keeps its relative precision in fp16 factors. Built once per
    prune_true_obs level and shared by every row chunk."""

    scale: Tensor  # (K,) sqrt(diag C0), in C0's dtype
    C: Tensor  # (K, K) C~, math dtype
    C_plan: Tensor  # (Kc, Kc) C~ on the plan's columns, in plan order

    @staticmethod
    def of(C0: Tensor, math_dtype: torch.dtype, order: Tensor) -> "_ScaledInverse":
        scale = torch.diagonal(C0).clamp(min=torch.finfo(C0.dtype).tiny).sqrt()
        C = (C0 / scale.unsqueeze(1) / scale.unsqueeze(0)).to(math_dtype)
        return _ScaledInverse(scale=scale, C=C, C_plan=C[order][:, order])


@dataclass(frozen=True)
class _LazyPlan:
    """Column order of left-looking True OBS (see ``StructuredOBS._lazy_plan``).

    ``order``: the visited columns, by the last batch visiting them; ``pos``: each
    column's place in ``order`` (-1: never visited; ``pos[K] = -1`` for padding);
    ``start[b]``: first place batch b and later batches read; ``p``: columns a row
    group prunes per batch at most.
    """

    order: Tensor
    pos: Tensor
    start: list
    p: int

    def bytes_per_group(self, c_dtype: torch.dtype, rows_per_group: int) -> int:
        """Memory one row group takes: its factors U (Kc × batches·p), the per-batch
        factors L and workspaces, and its rows' state."""
        Kc, nb = self.order.numel(), len(self.start)
        elem = torch.empty((), dtype=c_dtype).element_size()
        return Kc * nb * self.p * elem + nb * self.p * (self.p + 3) * 8 + 4 * Kc * (3 * self.p + 8 * rows_per_group)
