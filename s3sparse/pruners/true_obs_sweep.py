"""True OBS on one chunk of rows: the left-looking sweep over the batches of scopes.

Row r's C after batches 1..i-1 is ``C0 - Σ_j U_j U_jᵀ`` with
``U_j = C_{j-1}[:, S_j] L_j⁻ᵀ`` (``L_j`` the Cholesky factor of
``C_{j-1}[S_j, S_j]``), so only the factors U are stored (rounded to ``c_dtype``) and each
batch forms just what it reads: the diagonal (or scope blocks) of its columns for
scoring, and the panel ``C[S_b, R] = C0[S_b, R] - U[S_b] U[R]ᵀ`` over the columns R
that later batches still visit: the Schur complement of the columns pruned so far,
in factored form. The panel and the scope blocks are the Schur-update op
:func:`s3sparse.ops.lowrank_sub`; each new factor U_b is :func:`s3sparse.ops.lowrank_factor`
(and the diagonal row-local scoring reads is kept up to date from it). A row group (rows whose scopes
couple them) keeps one factor matrix: each factor column belongs to the one row
that pruned that column, so a batch of a row-coupled pattern costs one group's
pruned columns, not every row's worst case.
Sequential OBS steps equal one joint step on the union S of a row's pruned
columns, so its final weights are ``w0 - C0[:, S] C0[S, S]⁻¹ w0[S]``,
``C0[S, S]⁻¹ w0[S]`` being solved through the block-triangular factor the U's
form (forward during the sweep, backward at the end) and the product by the
shared C0 one GEMM.

Every shape here depends on the batch index only, and nothing waits for the
device: the whole sweep of a chunk can be recorded once as a CUDA graph and
replayed for every chunk (:mod:`.true_obs` does).

* :func:`lazy_plan` / :class:`LazyPlan`: the column order that makes every
  batch's panel one suffix of the factors' rows;
* :class:`DevicePlan`: how the factors are held on this kind of device (the only
  device-dependent choices; the results are the same to fp32 round-off);
* :class:`ScaledInverse`: C0 in Jacobi-scaled coordinates, shared by the chunks;
* :class:`ChunkSweep`: the sweep itself, one method per step of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..dtypes import opmath_dtype
from .layout import subset_ranks
from .obs_layer import OBSLayer

__all__ = ["ChunkSweep", "DevicePlan", "LazyPlan", "ScaledInverse", "lazy_plan"]

# Conditional variance (diagonal of the Jacobi-scaled per-row C, 1 at the start)
# below which a stored C is treated as round-off: its row is redone in higher precision.
_HEALTH_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 0.0, torch.float64: 0.0}


DEFAULT_HYBRID_TAU = 4.0  # hybrid scoring: the independent choice unless its exact cost is above this × the best


@dataclass(frozen=True)
class DevicePlan:
    """How one device holds the factors U: the sweep's only device-dependent choices.

    ``c_dtype`` (the option) is the precision of the factors: every U_b is rounded to it,
    and it sets the health tolerance and retry levels. Where they live is this plan,
    chosen by measurement:

    * CUDA: U stored in ``c_dtype`` (fp16 halves the memory traffic the sweep is bound
      by, and tensor cores read it), chunks of up to 4 GiB of factors (the sweep is
      replayed as a CUDA graph, so small chunks cost little).
    * CPU: U stored in fp32 holding the same fp16-rounded values (CPU BLAS has no fp16
      GEMM: fp16 factors were widened to fp32 on every read, 40% of the time on MiniLM),
      chunks of up to 256 MiB (peak memory stays small; per-chunk overhead is a few
      dozen ops per batch).

    How U_b is multiplied is the op's (:func:`s3sparse.ops.lowrank_factor`: hi/lo
    tensor-core products on CUDA, one fp32 GEMM on the CPU). Outputs match across
    plans to fp32 round-off (the factor product's rounding order).
    """

    store_dtype: torch.dtype  # what U physically lives in
    factor_budget_bytes: int  # chunk rows so their factors and workspaces stay within this (chunk_size=None)

    @staticmethod
    def for_device(device: torch.device, c_dtype: torch.dtype) -> "DevicePlan":
        if torch.device(device).type == "cuda":
            return DevicePlan(store_dtype=c_dtype, factor_budget_bytes=4 << 30)
        return DevicePlan(store_dtype=opmath_dtype(c_dtype), factor_budget_bytes=256 << 20)


def free_memory_bytes(device: torch.device) -> int:
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


@dataclass(frozen=True)
class ScaledInverse:
    """C0 = (H + λI)⁻¹ in Jacobi-scaled coordinates, C~ = D^-1/2 C0 D^-1/2 with D = diag(C0)
    (unit diagonal; w~ = D^-1/2 w). OBS costs and compensations are the same in them,
    and every column keeps its relative precision in fp16 factors. Built once per
    retry level and shared by every row chunk."""

    scale: Tensor  # (K,) sqrt(diag C0), in C0's dtype
    C: Tensor  # (K, K) C~, math dtype
    C_plan: Tensor  # (Kc, Kc) C~ on the plan's columns, in plan order

    @staticmethod
    def of(C0: Tensor, math_dtype: torch.dtype, order: Tensor) -> "ScaledInverse":
        scale = torch.diagonal(C0).clamp(min=torch.finfo(C0.dtype).tiny).sqrt()
        C = (C0 / scale.unsqueeze(1) / scale.unsqueeze(0)).to(math_dtype)
        return ScaledInverse(scale=scale, C=C, C_plan=C[order][:, order])


@dataclass(frozen=True)
class LazyPlan:
    """Column order of left-looking True OBS (see :func:`lazy_plan`).

    ``order``: the visited columns, by the last batch visiting them; ``pos``: each
    column's place in ``order`` (-1: never visited; ``pos[K] = -1`` for padding);
    ``start[b]``: first place batch b and later batches read; ``p``: columns a row
    group prunes per batch at most.
    """

    order: Tensor
    pos: Tensor
    start: list
    p: int

    def bytes_per_group(self, store_dtype: torch.dtype, rows_per_group: int) -> int:
        """Memory one row group takes: its factors U (Kc × batches·p, held in ``store_dtype``),
        the per-batch factors L and workspaces, and its rows' state."""
        Kc, nb = self.order.numel(), len(self.start)
        elem = torch.empty((), dtype=store_dtype).element_size()
        return Kc * nb * self.p * elem + nb * self.p * (self.p + 3) * 8 + 4 * Kc * (3 * self.p + 8 * rows_per_group)


def lazy_plan(layer: OBSLayer, batches: list[Tensor], p_max: int) -> LazyPlan:
    """Column order and panel bounds of left-looking True OBS for these batches.

    Columns are ordered by the last batch that visits them: the rows of the
    factors that batch b and every later batch read are then one suffix
    ``[start[b], Kc)`` of that order. Columns no scope visits are left out.
    """
    g = layer.groups
    K = layer.num_cols
    device = layer.W.device
    last = torch.full((K,), -1, dtype=torch.long, device=device)
    for b, positions in enumerate(batches):
        last[g.cols[positions].reshape(-1)] = b
    visited = torch.nonzero(last >= 0).squeeze(1)
    order = visited[torch.sort(last[visited], stable=True).indices]
    pos = torch.full((K + 1,), -1, dtype=torch.long, device=device)  # pos[K] = -1 for padding
    pos[order] = torch.arange(order.numel(), device=device)
    counts = torch.bincount(last[visited], minlength=len(batches))
    start = (torch.cumsum(counts, 0) - counts).tolist()
    return LazyPlan(order=order, pos=pos, start=start, p=p_max)


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


class ChunkSweep:
    """True OBS for the rows ``w_rows`` (B, K) of Rc whole row groups (group-major).

    ``ChunkSweep(layer, w_rows, batches, nnz, scoring, subsets, inv, c_dtype, plan, device_plan).run()``
    returns their new rows (B, K) fp32 and a failed-group mask (Rc,). ``inv`` is
    C0 = (H + λI)⁻¹ in Jacobi-scaled coordinates, for ``plan``; ``subsets`` the
    candidate subsets of a scope (``scoring='joint'`` or ``'hybrid'``, whose threshold is
    ``hybrid_tau``); ``device_plan`` how the
    factors are held (None: :meth:`DevicePlan.for_device`). Each batch of scopes
    is :meth:`_choose` (its blocks), :meth:`_pruned_positions` (the group's pruned
    columns), :meth:`_pivot_inverse` (``L⁻¹`` of their C block) and :meth:`_eliminate`
    (the factors U_b and the weights' forward update); :meth:`_finish` solves
    backwards and forms the weights.
    """

    def __init__(self, layer: OBSLayer, w_rows: Tensor, batches: list[Tensor], nnz: int, scoring: str,
                 subsets: Optional[Tensor], inv: ScaledInverse, c_dtype: torch.dtype, plan: LazyPlan,
                 device_plan: Optional[DevicePlan] = None, panel_batches: int = 1,
                 hybrid_tau: float = DEFAULT_HYBRID_TAU):
        g = layer.groups
        self.hybrid_tau = float(hybrid_tau)
        self.G = max(1, int(panel_batches))  # batches whose panels one read of the factors forms
        self.bp: Optional[Tensor] = None  # the block panel of the current run of G batches (see _block_panel)
        self.g, self.batches, self.nnz, self.scoring, self.subsets, self.plan = g, batches, nnz, scoring, subsets, plan
        self.blocks_per_scope, self.num_cols = layer.blocks_per_scope, layer.num_cols
        self.rpc, self.E, self.bk = g.rows_per_group, layer.layout.elems_per_scope, layer.bk
        self.B = w_rows.shape[0]
        self.Rc = Rc = self.B // self.rpc
        self.device = device = w_rows.device
        self.c_dtype, self.math_dtype = c_dtype, opmath_dtype(c_dtype)
        dp = device_plan if device_plan is not None else DevicePlan.for_device(w_rows.device, c_dtype)
        self.P, self.Kc, self.nb = P, Kc, nb = plan.p, plan.order.numel(), len(batches)
        self.pruned_per_scope = (self.blocks_per_scope - nnz) * self.bk  # per group, exactly
        self.col_scale, self.C0s, self.C0p = inv.scale, inv.C, inv.C_plan
        # Rows whose scopes lie in one row score blocks by diag C alone: keep each row's
        # diag C = C0 - Σ U² up to date (one pass over each new U_b) instead of
        # re-reading every factor of the scored columns each batch (38× the bytes at 2:4).
        # ('hybrid' makes the independent choice the same way, then reads the scope blocks too.)
        self.track_diag = scoring in ("independent", "hybrid") and self.rpc == 1
        self.diag = torch.diagonal(self.C0p).expand(Rc, Kc).clone() if self.track_diag else None  # (Rc, Kc)
        self.w0 = (w_rows.to(self.col_scale.dtype) / self.col_scale).to(self.math_dtype)  # (B, K), scaled
        self.w_cur = self.w0[:, plan.order].contiguous()  # (B, Kc): current weights, plan order
        # group factors, P columns a batch: values rounded to c_dtype, held in dp.store_dtype.
        # Not zeroed: batch b writes rows [start[b], Kc) of its columns, and nothing reads
        # other rows of them (checked: a NaN-filled U gives the same result bit for bit).
        self.U = torch.empty(Rc, Kc, nb * P, dtype=dp.store_dtype, device=device)
        self.owner = torch.full((Rc, nb * P), -1, dtype=torch.long, device=device)  # row slot of each factor column
        self.z = torch.zeros(Rc, nb * P, dtype=self.math_dtype, device=device)
        self.Linv_all = torch.empty(nb, Rc, P, P, dtype=self.math_dtype, device=device)
        self.S_all = torch.empty(nb, Rc, P, dtype=torch.long, device=device)  # plan positions, -1 pad
        self.health_tol = _HEALTH_TOL[c_dtype]
        self.failed = torch.zeros(Rc, dtype=torch.bool, device=device)
        self.alive = torch.ones(self.B, Kc + 1, dtype=torch.bool, device=device)  # spare column for padding
        self.g_idx = torch.arange(Rc, device=device).unsqueeze(1)
        self.slots = torch.arange(self.rpc, device=device)
        self.local_base = (torch.arange(Rc, device=device) * self.rpc).view(Rc, 1, 1)
        self.eye = torch.eye(P, dtype=self.math_dtype, device=device)

    def run(self) -> tuple[Tensor, Tensor]:
        """The sweep: ``(new rows (B, K) fp32, failed groups (Rc,))``."""
        for bi, positions in enumerate(self.batches):
            s0 = self.plan.start[bi]
            pcols = self.plan.pos[self.g.cols[positions]]  # (n, E) plan positions
            lr = self.g.local_rows[positions]  # (n, E) row slot of each element
            if self.G > 1 and bi % self.G == 0:
                self._block_panel(bi)
            pruned = self._choose(bi, pcols, lr)
            S, slot, valid, Sc, sel = self._pruned_positions(pruned, pcols, lr, s0)
            panel = self._panel(bi, Sc, slot, sel)
            Linv, ok = self._pivot_inverse(panel, s0, Sc, slot, valid)
            self._eliminate(bi, panel, Linv, ok, S, Sc, slot)
            if self.G > 1 and (bi + 1) % self.G and bi + 1 < self.nb:
                self._update_block_panel(bi)
        return self._finish()

    # Blocked form (panel_batches = G > 1): the factors U[R] are read once per G
    # batches, not once per batch. At the first batch b of a run of G, every
    # candidate element e = (row slot, column) of the run's scopes gets its row of
    # its row's current C, C_slot[col_e, R0] = C0[col_e, R0] - U[col_e] U[R0]ᵀ over the
    # factor columns that slot owns (R0 = [start[b], Kc)): the block panel. Each
    # batch of the run reads its scope blocks and its pruned rows from it, and after
    # its elimination the rows of the run's later batches are brought up to date by
    # the batch's own rank-P factor U_j (right-looking inside the run). Same math as
    # G = 1 to round-off; the block panel holds G·(elements a batch) rows.
    def _block_panel(self, b0: int) -> None:
        """Form the block panel of batches b0 .. b0+G-1: (Rc, elements, Kc - start[b0])."""
        self.bp = None  # the previous run's panel: freed before the new one is formed
        run = self.batches[b0 : b0 + self.G]
        s0, o, Rc = self.plan.start[b0], b0 * self.P, self.Rc
        cols = torch.cat([self.plan.pos[self.g.cols[pos]].reshape(-1) for pos in run])  # (Ne,) plan positions
        slots = torch.cat([self.g.local_rows[pos].reshape(-1) for pos in run])  # (Ne,)
        counts = [pos.numel() * self.E for pos in run]
        self.bp_first = {b0 + j: sum(counts[:j]) for j in range(len(run))}  # batch -> its first row
        self.bp_cols, self.bp_slots, self.bp_s0 = cols, slots, s0
        U = self.U
        a = U[self.g_idx, cols.unsqueeze(0), :o]  # (Rc, Ne, o)
        if self.rpc > 1:
            a = a * (self.owner[:, None, :o] == slots.view(1, -1, 1))
        base = self.C0p[cols, s0:].unsqueeze(0).expand(Rc, -1, -1)
        self.bp = ops.lowrank_sub(base, a, U[:, s0:, :o])

    def _update_block_panel(self, bi: int) -> None:
        """Bring the block panel's rows of the batches after bi up to date with batch bi's
        factor: C_slot[col_e, R] -= U_bi[col_e] U_bi[R]ᵀ over U_bi's columns that slot owns."""
        s0, o, P = self.plan.start[bi], bi * self.P, self.P
        first = self.bp_first[bi + 1]
        cols, slots = self.bp_cols[first:], self.bp_slots[first:]
        off = s0 - self.bp_s0
        Ub = self.U[:, :, o : o + P]  # as stored (rounded to c_dtype), as the G = 1 panels read it
        a = Ub[self.g_idx, cols.unsqueeze(0)]  # (Rc, rest, P)
        if self.rpc > 1:
            a = a * (self.owner[:, None, o : o + P] == slots.view(1, -1, 1))
        rest = self.bp[:, first:, off:]
        rest.copy_(ops.lowrank_sub(rest, a, Ub[:, s0:]))  # (a temporary of rest's size: counted in the chunk plan)

    def _choose(self, bi: int, pcols: Tensor, lr: Tensor) -> Tensor:
        """The pruned elements of this batch's scopes in every group: (Rc, n, E) bool.

        'independent' scores each block on its own: Σ w² / C_cc over its elements
        where scopes lie in one row; its exact OBS cost w_bᵀ (C_bb)⁻¹ w_b where rows
        compete for a scope (measured better there on real layers, and worse for
        row-local blocks of 2 under batches of 64 scopes). 'joint' scores whole
        subsets of a scope exactly. 'hybrid' makes the independent choice, and takes
        the least-cost subset instead where the choice's exact cost is above
        ``hybrid_tau`` times it (:meth:`_hybrid`).
        """
        Rc, E, bk = self.Rc, self.E, self.bk
        n = pcols.shape[0]
        w = self.w_cur[self.local_base + lr, pcols]  # (Rc, n, E)
        blocks = None
        if self.track_diag:
            d = self.diag[:, pcols]  # (Rc, n, E)
            cost = w * w / d.clamp(min=torch.finfo(d.dtype).tiny)
            block_cost = cost.view(Rc, n, self.blocks_per_scope, bk).sum(-1)
            if self.scoring == "hybrid":
                blocks = self._scope_blocks(bi, pcols, lr)  # (Rc·n, E, E)
        else:
            blocks = self._scope_blocks(bi, pcols, lr)  # (Rc·n, E, E)
            d = torch.diagonal(blocks, dim1=1, dim2=2).reshape(Rc, n, E)
            if self.scoring != "joint":
                block_cost = _block_costs(w.reshape(-1, E), blocks, self.blocks_per_scope).view(Rc, n, -1)
        if self.scoring != "independent":
            costs, best = ops.score_subsets(w.reshape(-1, E).to(self.math_dtype), blocks, self.subsets)
        # A visited coordinate's conditional variance (diag of C~, 1 at the start)
        # at or below the storage's noise level means the group's factors no longer
        # describe its C: the group is redone in higher precision.
        self.failed |= ((d <= self.health_tol) | ~torch.isfinite(d)).reshape(Rc, -1).any(dim=1)
        if self.scoring != "joint":
            _, keep = ops.kth_largest(block_cost, self.nnz)
            if self.scoring == "independent":
                return (~keep).repeat_interleave(bk, dim=-1)
            best = self._hybrid(~keep, costs, best)
        pruned = torch.zeros(Rc * n, E, dtype=torch.bool, device=self.device)
        pruned.scatter_(1, self.subsets[best], True)
        return pruned.view(Rc, n, E)

    def _hybrid(self, pruned_blocks: Tensor, costs: Tensor, best: Tensor) -> Tensor:
        """'hybrid': per scope of each row, the subset index of the independent choice
        ``pruned_blocks`` (Rc, n, blocks_per_scope), or ``best`` (the least-cost subset)
        where the choice's exact cost ``costs`` (Rc·n, subsets) is above ``hybrid_tau`` × the
        least cost (never with an infinite tau): (Rc·n,) int64."""
        k = self.blocks_per_scope - self.nnz
        flags = pruned_blocks.reshape(-1, self.blocks_per_scope).to(torch.uint8)
        chosen = torch.sort(flags, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        ind = subset_ranks(chosen, self.blocks_per_scope)  # (Rc·n,) the independent choice's subset
        ind_cost = costs.gather(1, ind.unsqueeze(1)).squeeze(1)
        best_cost = costs.gather(1, best.unsqueeze(1)).squeeze(1)
        return torch.where(ind_cost > self.hybrid_tau * best_cost, best, ind)

    def _scope_blocks(self, bi: int, pcols: Tensor, lr: Tensor) -> Tensor:
        """Current C of each row on each scope's elements, block-diagonal by row: (Rc·n, E, E).

        Row r's C is ``C0 - Σ_i U[:, i] U[:, i]ᵀ`` over the factor columns i it owns;
        in the blocked form it is read from the block panel (kept up to date).
        """
        o = bi * self.P
        U, Rc = self.U, self.Rc
        n, E = pcols.shape
        same_row = (lr.unsqueeze(-1) == lr.unsqueeze(-2)).repeat(Rc, 1, 1)
        if self.bp is not None:  # from the block panel: rows of this batch, its own columns
            first = self.bp_first[bi]
            rows = self.bp[:, first : first + n * E].reshape(Rc, n, E, -1)
            idx = (pcols - self.bp_s0).view(1, n, 1, E).expand(Rc, n, E, E)
            return torch.gather(rows, 3, idx).reshape(Rc * n, E, E) * same_row
        Ug = U[torch.arange(Rc, device=U.device).view(Rc, 1, 1), pcols, :o]  # (Rc, n, E, o)
        mine = self.owner[:, None, None, :o] == lr[None, :, :, None]
        base = self.C0p[pcols.unsqueeze(-1), pcols.unsqueeze(-2)].expand(Rc, n, E, E).reshape(Rc * n, E, E)
        blocks = ops.lowrank_sub(base, (Ug * mine).reshape(Rc * n, E, o), Ug.reshape(Rc * n, E, o))
        return blocks * same_row

    def _pruned_positions(self, pruned: Tensor, pcols: Tensor, lr: Tensor, s0: int):
        """The group's pruned elements, in element order (every group prunes exactly
        ``pruned_per_scope`` elements of each scope), padded to P: their plan
        positions S (-1: padding), row slots, ``valid``, ``Sc`` (S with padding
        and failed groups reading the harmless position ``s0``) and ``sel`` (each one's
        element index in the batch; padding: element 0, whose panel row L⁻¹ then
        ignores), each (Rc, P)."""
        Rc, P, E = self.Rc, self.P, self.E
        n = pcols.shape[0]
        Pb = n * self.pruned_per_scope
        sel = torch.sort(pruned.reshape(Rc, n * E).to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :Pb]
        S = torch.nn.functional.pad(pcols.reshape(-1)[sel], (0, P - Pb), value=-1)  # (Rc, P) positions
        slot = torch.nn.functional.pad(lr.reshape(-1)[sel], (0, P - Pb), value=0)  # (Rc, P)
        valid = (S >= 0) & ~self.failed.unsqueeze(1)
        Sc = torch.where(valid, S, s0)  # padding reads a harmless position
        sel = torch.nn.functional.pad(sel, (0, P - Pb), value=0)  # (Rc, P) element of the batch
        return S, slot, valid, Sc, sel

    def _panel(self, bi: int, Sc: Tensor, slot: Tensor, sel: Tensor) -> Tensor:
        """Panel C_row[S_b, R] = C0[S_b, R] - Σ_{own factor cols} U[S_b] U[R]ᵀ, R = [s0, Kc): (Rc, P, |R|)."""
        s0, o, U = self.plan.start[bi], bi * self.P, self.U
        if self.bp is not None:  # the block panel's rows of the pruned elements, from column s0
            rows = self.bp[:, :, s0 - self.bp_s0 :]
            return torch.gather(rows, 1, (self.bp_first[bi] + sel).unsqueeze(-1).expand(-1, -1, rows.shape[2]))
        a = U[self.g_idx, Sc, :o]
        if self.rpc > 1:
            a = a * (self.owner[:, None, :o] == slot.unsqueeze(-1))
        return ops.lowrank_sub(self.C0p[:, s0:][Sc], a, U[:, s0:, :o])

    def _pivot_inverse(self, panel: Tensor, s0: int, Sc: Tensor, slot: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """``L⁻¹`` of the pruned columns' C block (block-diagonal by row; rows of padding
        zeroed) and ``ok``, the (Rc, P) columns actually pruned: a group whose block is
        not positive definite (or whose pivots are round-off) is marked failed."""
        Rc, P, eye, health_tol = self.Rc, self.P, self.eye, self.health_tol
        C_SS = torch.gather(panel, 2, (Sc - s0).unsqueeze(1).expand(Rc, P, P))
        same = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        if self.rpc > 1:
            same = same & (slot.unsqueeze(-1) == slot.unsqueeze(-2))
        C_SS = torch.where(same, 0.5 * (C_SS + C_SS.mT), eye)
        piv = torch.diagonal(C_SS, dim1=1, dim2=2)
        bad = ((piv <= health_tol) | ~torch.isfinite(piv)).logical_and(valid).any(dim=1)
        L, info = torch.linalg.cholesky_ex(C_SS)
        bad |= info != 0
        self.failed |= bad
        ok = valid & ~bad.unsqueeze(1)
        L = torch.where(bad.view(Rc, 1, 1), eye, L)
        # L⁻¹ (block-diagonal by row); rows of padding zeroed, so U_b's padding
        # columns are zero whatever the panel holds there.
        Linv = torch.linalg.solve_triangular(L, eye.expand(Rc, P, P), upper=False) * ok.unsqueeze(-1)
        return Linv, ok

    def _eliminate(self, bi: int, panel: Tensor, Linv: Tensor, ok: Tensor, S: Tensor, Sc: Tensor,
                   slot: Tensor) -> None:
        """Store the batch's factors U_b and its part of the forward solve; update the
        rows' weights on the columns later batches visit; retire the pruned columns."""
        s0, o, P, Kc, Rc, rpc = self.plan.start[bi], bi * self.P, self.P, self.Kc, self.Rc, self.rpc
        Ub = ops.lowrank_factor(panel, Linv, self.c_dtype)  # U_b = panelᵀ L⁻ᵀ (Rc, |R|, P), fp32 accuracy
        U_new = self.U[:, s0:, o : o + P]
        U_new.copy_(Ub if U_new.dtype == self.c_dtype else Ub.to(self.c_dtype))  # rounded to c_dtype
        if self.track_diag:
            self.diag[:, s0:] -= torch.linalg.vector_norm(U_new, dim=-1, dtype=self.math_dtype).square()
        # z_b = L⁻¹ w[S_b];  w[R] -= U_b z_b (into each pruned column's own row).
        row_of = self.g_idx * rpc + slot  # (Rc, P) row within the chunk
        zb = torch.bmm(Linv, (self.w_cur[row_of, Sc] * ok).unsqueeze(-1)).squeeze(-1)
        if rpc == 1:
            self.w_cur[:, s0:] -= torch.bmm(Ub, zb.unsqueeze(-1)).squeeze(-1)
        else:
            mine = (slot.unsqueeze(-1) == self.slots).to(self.math_dtype)  # (Rc, P, rpc)
            self.w_cur.view(Rc, rpc, Kc)[:, :, s0:] -= torch.bmm(Ub, zb.unsqueeze(-1) * mine).mT
        self.owner[:, o : o + P] = torch.where(ok, slot, -1)
        self.z[:, o : o + P] = zb
        self.Linv_all[bi] = Linv
        self.S_all[bi] = torch.where(ok, S, -1)
        # (fills and copies only from device tensors: nothing crosses from the host,
        # so the sweep can be recorded as a CUDA graph)
        self.alive.view(-1).index_fill_(0, (row_of * (Kc + 1) + torch.where(ok, S, Kc)).view(-1), False)
        self.alive[:, Kc].fill_(True)
        self.w_cur.masked_fill_(~self.alive[:, :Kc], 0.0)

    def _finish(self) -> tuple[Tensor, Tensor]:
        """Backward solve ``y = Lfull⁻ᵀ z``, batch by batch from the last (v holds y at the
        plan positions solved so far, one row of v per weight row), then the weights
        ``w0 - y C0`` with the pruned columns zeroed, back in unscaled coordinates."""
        B, Kc, Rc, rpc, P, plan = self.B, self.Kc, self.Rc, self.rpc, self.P, self.plan
        v = torch.zeros(B, Kc + 1, dtype=self.math_dtype, device=self.device)
        for bi in range(self.nb - 1, -1, -1):
            s0, o = plan.start[bi], bi * P
            S = self.S_all[bi]
            slot = self.owner[:, o : o + P].clamp(min=0)
            v_rows = v.view(Rc, rpc, Kc + 1)[:, :, s0:Kc]
            t = torch.bmm(self.U[:, s0:, o : o + P].mT.to(self.math_dtype), v_rows.mT)  # (Rc, P, rpc): U_bᵀ v
            rhs = self.z[:, o : o + P] - t.gather(2, slot.unsqueeze(-1)).squeeze(-1)
            y = torch.bmm(self.Linv_all[bi].mT, rhs.unsqueeze(-1)).squeeze(-1)
            flat = (self.g_idx * rpc + slot) * (Kc + 1) + torch.where(S >= 0, S, Kc)
            v.view(-1).index_copy_(0, flat.view(-1), torch.where(S >= 0, y, 0.0).view(-1))
            v[:, Kc].fill_(0.0)
        Y = torch.zeros(B, self.num_cols, dtype=self.math_dtype, device=self.device)
        Y[:, plan.order] = v[:, :Kc]
        w_new = self.w0 - Y @ self.C0s  # C0s symmetric: row r is w0 - C0[:, S] y
        pruned_cols = torch.zeros(B, self.num_cols, dtype=torch.bool, device=self.device)
        pruned_cols[:, plan.order] = ~self.alive[:, :Kc]
        w_new.masked_fill_(pruned_cols, 0.0)
        self.failed |= ~torch.isfinite(w_new).view(Rc, -1).all(dim=1)
        Wc = (w_new.to(self.col_scale.dtype) * self.col_scale).to(torch.float32)
        return Wc, self.failed
