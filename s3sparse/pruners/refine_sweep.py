"""The sweeps of :func:`~.refine.refine_mask` over the scopes of a chunk of rows (issue 19).

Every row holds ``A⁻¹ = (C_PP)⁻¹`` over its pruned columns P (float64). For each scope, in
order, the row's cost of every candidate kept set comes from a rank-q downdate of ``A⁻¹`` and
q × q solves (``refine``'s module docstring has the formulas); the scope takes the candidate of
least cost when it is strictly lower, and ``A⁻¹`` follows by a rank-2q update. Scopes run in
blocks: one GEMM applies every row's ``A⁻¹`` to the block's panel, the block's swaps are kept
as low-rank factors (:class:`_BlockSwaps`) and added to ``A⁻¹`` at the block's end. A chunk is
inverted once (:class:`ChunkSweeps`: all its sweeps, then its weights from the held ``A⁻¹``).

Two forms of a scope's swap, the same swaps: on the CPU only the row groups that swap compute a
factor (a host sync a scope says which); the sync-free form (``_SYNC_FREE``) computes one for
every row, zero where its group keeps its set, so a block runs with no host sync and can be
replayed as a CUDA graph (:class:`SweepGraphs`: a sweep on CUDA is otherwise bound by the host,
tens of kernels a scope).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..errors import NumericalError

# Relative decrease of the row's cost a swap must bring (round-off guard: no flip-flops).
_REL_TOL = 1e-10
# Rows inverted at once in the batched forms: a quarter of a chunk (C_PP and its factor are transients).
_INVERSION_PARTS = 4
# How the rows' C_PP are inverted when a chunk is loaded (inverse_pp): loop | loop_trinv (one row at a
# time) | batched | trinv (a quarter of the chunk at a time). One row at a time: 2.0x faster than batched
# on an H200 (8 x 4864², float64; benchmarks/results/spd-inverse-forms-h200.txt; the refine of 256 rows
# of 2560x9728 1.1x faster), and the transients are one row's, not half the chunk's inverses (peak 7.9
# against 12.9 GiB there). Lab knob: benchmarks/lab/refine_forms.py --inverse.
_INVERSE = "loop"
# Fewest pruned columns a row has for the loop forms (below, the batched form: many small single-matrix
# calls; one row at a time was measured only at p = 4864).
_LOOP_MIN_COLS = 1024
# The largest refinement correction of a row's final weights, relative to them, taken as round-off
# (chunk_weights; beyond it the sweeps' updates let A⁻¹ drift, and the rows are inverted afresh).
_DRIFT_TOL = 1e-6
# Most scopes swept as one block (one GEMM pass over the row inverses per block).
_MAX_SCOPE_BLOCK = 32
# Sweep without a host sync per scope, by device (CUDA?). The CPU is faster skipping the factors of
# scopes no row swaps (the sync-free form is 10% slower on MiniLM L0's 2:4 there); on an H100 it is
# 1.2x faster, and with graphs 2.1x (benchmarks/results/refine-forms-h100-256x9728.txt).
_SYNC_FREE = {True: True, False: False}
# Replay a chunk's blocks as CUDA graphs (CUDA, sync-free form: full chunks, from the first one's second sweep).
_GRAPHS = True


def pruned_cols(cand: Tensor, cols: Tensor, slots: Tensor, K: int) -> Tensor:
    """(m·R, S·w) pruned columns of every row instance, scope after scope (slot k of scope g: column, or the
    dummy column K + g·w + k)."""
    m, S = cand.shape
    R, w = slots.shape[2], slots.shape[3]
    g = torch.arange(S, device=cols.device)
    el = slots[g[None, :], cand.long()].permute(0, 2, 1, 3)  # (m, R, S, w)
    real = cols[g[None, None, :, None], el.clamp(min=0)]
    dummy = K + torch.arange(S * w, device=cols.device).reshape(S, w)
    return torch.where(el >= 0, real, dummy).reshape(m * R, S * w)


def _spd_inverse(A: Tensor, form: str) -> tuple:
    """``A⁻¹`` of symmetric positive definite ``A`` (…, p, p) by Cholesky, and the factorisation's info
    (non-zero: not numerically positive definite; not checked here, so no host sync): ``cholesky_inverse``
    of the factor, or (``trinv`` forms) ``L⁻ᵀ L⁻¹`` from a triangular solve and a GEMM."""
    L, info = torch.linalg.cholesky_ex(A)
    if "trinv" not in form:
        return torch.cholesky_inverse(L), info
    Li = torch.linalg.solve_triangular(L, torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A), upper=False)
    return Li.mT @ Li, info


def inverse_pp(C: Tensor, P: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """(C_PP)⁻¹ of every row, (m, p, p) (into ``out`` if given), in the form ``_INVERSE`` says: one row
    at a time (single-matrix solver calls; rows of at least ``_LOOP_MIN_COLS`` pruned columns), or
    batched, a quarter of the rows at a time (so that the gathered C_PP and its factor, transients, add
    half of the result's memory, not twice it). One host sync a call: a C_PP that is not numerically
    positive definite raises :class:`~s3sparse.errors.NumericalError`."""
    m, p = P.shape
    if out is None:
        out = torch.empty(m, p, p, dtype=C.dtype, device=C.device)
    loop = _INVERSE.startswith("loop") and p >= _LOOP_MIN_COLS
    step = 1 if loop else max(1, -(-m // _INVERSION_PARTS))
    failed = torch.zeros((), dtype=torch.bool, device=C.device)
    for lo in range(0, m, step):
        Ps = P[lo : lo + step]
        A = C[Ps[:, :, None], Ps[:, None, :]]
        out[lo : lo + step], info = _spd_inverse(A[0] if loop else A, _INVERSE)  # (loop: a single-matrix call)
        del A  # (no gathered part outlives its inversion)
        failed |= (info != 0).any()
    if bool(failed):
        raise NumericalError(
            "refine_mask: a row's C_PP (the damped inverse Hessian over its pruned columns) is not numerically "
            "positive definite; the weight was left unchanged. Raise `damp`"
        )
    return out


@dataclasses.dataclass
class _Chunk:
    """A chunk's sweep state: its rows' pruned columns ``P`` (n, p), their weights there ``wP`` and
    inverses ``Ainv`` (n, p, p), the candidates ``cand`` (m, S) updated in place, and the layer's
    constants (``C``, the dense rows ``W0``, the scopes' columns and slot table)."""

    C: Tensor
    W0: Tensor
    cand: Tensor
    cols: Tensor
    slots: Tensor
    K: int
    P: Tensor
    wP: Tensor
    Ainv: Tensor
    block: int
    sync_free: bool
    has_dummy: list
    swaps: Tensor  # (), scopes changed so far (a device counter: read once a chunk)

    @property
    def m(self) -> int:
        return self.cand.shape[0]


def chunk_state(C, W0, cand, cols, slots, K, scope_block=None, sync_free=None, into: Optional[_Chunk] = None) -> _Chunk:
    """The sweep state of a chunk (``into``: refill that state's tensors in place, same shapes)."""
    w = slots.shape[3]
    P = pruned_cols(cand, cols, slots, K)  # (n, p); scope g owns the slots g·w … g·w + w − 1
    if into is not None:
        into.W0.copy_(W0)
        into.cand.copy_(cand)
        into.P.copy_(P)
        inverse_pp(C, P, out=into.Ainv)
        into.wP.copy_(W0.gather(1, P))
        into.swaps.zero_()
        return into
    p = P.shape[1]
    if sync_free is None:
        sync_free = _SYNC_FREE[C.device.type == "cuda"]
    return _Chunk(
        C, W0, cand, cols, slots, K, P, W0.gather(1, P), inverse_pp(C, P), scope_block or scopes_per_block(p, w),
        sync_free, (slots < 0).flatten(1).any(1).tolist(), torch.zeros((), dtype=torch.int64, device=C.device),
    )


def _refined_solution(st: _Chunk) -> tuple:
    """``u = (C_PP)⁻¹ w_P`` of every row from the held ``A⁻¹`` and one step of iterative refinement
    (the residual of ``C_PP u = w_P``), and that step's correction."""
    C, W0, P, wP, Ainv = st.C, st.W0, st.P, st.wP, st.Ainv
    u = (Ainv @ wP[..., None]).squeeze(-1)  # (n, p)
    r = wP - (torch.zeros_like(W0).scatter_(1, P, u) @ C).gather(1, P)  # C symmetric: (z C)_P = C_PP u
    d = (Ainv @ r[..., None]).squeeze(-1)
    return u + d, d


def chunk_weights(st: _Chunk) -> Tensor:
    """(n, K') weights of the chunk's rows optimal for their current mask, ``w − C_{:,P} (C_PP)⁻¹ w_P`` (zero
    at P), from the held ``A⁻¹`` (folded: no factor pending) and one step of iterative refinement: the
    sweeps' low-rank updates leave ``A⁻¹`` off by round-off, the residual of ``C_PP u = w_P`` corrects
    ``u`` to a fresh solve's accuracy, with no new inversion. Where that correction is not round-off
    sized (``_DRIFT_TOL`` of ``u``, or not finite), the rows are inverted afresh first (one host sync)."""
    u, d = _refined_solution(st)
    small = d.abs().amax(1) <= _DRIFT_TOL * u.abs().amax(1)  # (False for NaN)
    if not bool(small.all()):
        inverse_pp(st.C, st.P, out=st.Ainv)
        u, _ = _refined_solution(st)
    z = torch.zeros_like(st.W0).scatter_(1, st.P, u)
    return (st.W0 - z @ st.C).scatter_(1, st.P, 0.0)


class ChunkSweeps:
    """Refines a chunk of row groups at a time, eagerly: :meth:`load` (the rows' inverses, once a chunk),
    :meth:`sweep` (as often as wanted: a chunk's rows are finished before the next chunk's are loaded,
    so no sweep inverts again), then :func:`chunk_weights`.

    A sweep is blocked: for ``scope_block`` consecutive scopes at a time, every row's ``A⁻¹`` is applied
    once, as one GEMM, to the panel ``X = [w_P, C_{P,E_g} for g in the block]`` (rows at the block's own
    slots zeroed); a swap inside the block is kept as a rank-2w factor ``A⁻¹ ← A⁻¹ + U_D Uᵀ`` (the
    downdate ``−A_q A_qq⁻¹ A_qᵀ`` and the new slots' ``Ṽ S_R⁻¹ Ṽᵀ``, ``Ṽ = V_R − I_sl``) that later
    scopes of the block apply to their thin panels, and all factors are added to ``A⁻¹`` at the block's
    end. The result is the one-scope-at-a-time sweep's, to round-off; the inverse is read twice per
    block instead of once per scope (memory-bound batched GEMVs become GEMMs).
    """

    def __init__(self, m: int, scope_block: Optional[int] = None):
        self.m, self.scope_block = m, scope_block

    def load(self, C, W0, cand, cols, slots, K) -> _Chunk:
        """The sweep state of a chunk (``cand`` (m', S) and ``W0`` its rows; the state's ``cand`` holds the
        result: copy it back)."""
        return chunk_state(C, W0, cand, cols, slots, K, self.scope_block)

    def sweep(self, st: _Chunk) -> int:
        """One sweep over the chunk's scopes (updates the state); the scopes changed (one host sync)."""
        for g0 in range(0, st.cols.shape[0], st.block):
            self._block(st, g0).fold_into(st.Ainv)
        n = int(st.swaps)
        st.swaps.zero_()
        return n

    def _block(self, st: _Chunk, g0: int) -> "_BlockSwaps":
        return _sweep_block(st, g0)


class SweepGraphs(ChunkSweeps):
    """:class:`ChunkSweeps` on CUDA with each scope block replayed as a CUDA graph.

    Full chunks (``m`` row groups) are loaded into one fixed state, refilled per chunk. The first sweep
    of the first full chunk runs eagerly (it loads the kernels and libraries); from its second sweep on,
    each block position is captured once as a graph (all graphs share one memory pool, as they replay
    in capture order, and one set of factor buffers) and replayed. A block's factors are folded into
    ``A⁻¹`` outside its graph (one host sync a block picks the rows). Other chunks (the last, shorter
    one) run eagerly, and every block does once a capture has failed.
    """

    def __init__(self, m: int, scope_block: Optional[int] = None):
        super().__init__(m, scope_block)
        self.state: Optional[_Chunk] = None
        self.warm = False  # a sweep of the fixed state has run eagerly
        self.fac: Optional[_BlockSwaps] = None
        self.graphs: dict = {}  # block start -> (graph, factors in use at its end)
        self.pool = None
        self.failed = False

    @staticmethod
    def applies(C: Tensor) -> bool:
        return _GRAPHS and C.device.type == "cuda" and _SYNC_FREE[True]

    def load(self, C, W0, cand, cols, slots, K) -> _Chunk:
        if cand.shape[0] != self.m:
            if self.state is None:
                return super().load(C, W0, cand, cols, slots, K)
            # A shorter (last) chunk: into a prefix of the fixed state (not a second state beside it),
            # swept eagerly.
            st, n = self.state, W0.shape[0]
            prefix = dataclasses.replace(st, W0=st.W0[:n], cand=st.cand[: cand.shape[0]], P=st.P[:n], wP=st.wP[:n],
                                         Ainv=st.Ainv[:n])
            return chunk_state(C, W0, cand, cols, slots, K, into=prefix)
        if self.state is None:
            self.state = chunk_state(C, W0.clone(), cand.clone(), cols, slots, K, self.scope_block, sync_free=True)
        else:
            chunk_state(C, W0, cand, cols, slots, K, into=self.state)
        return self.state

    def sweep(self, st: _Chunk) -> int:
        n = super().sweep(st)
        self.warm = self.warm or st is self.state
        return n

    def _block(self, st: _Chunk, g0: int) -> "_BlockSwaps":
        if st is not self.state or not self.warm or self.failed:
            return _sweep_block(st, g0)
        if self.fac is None:
            w = st.slots.shape[3]
            self.fac = _BlockSwaps(st.P.shape[0], 2 * w * st.block, st.P.shape[1], 1 + st.block * st.cols.shape[1],
                                   st.C, zeroed=False)
        if st.C.device.type != "cuda":  # (tests: the fixed state and the shared factors, without graphs)
            return _sweep_block(st, g0, self.fac)
        if g0 not in self.graphs:
            stream = torch.cuda.current_stream()
            try:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    _sweep_block(st, g0, self.fac)
                self.graphs[g0] = (graph, self.fac.nf)
            except RuntimeError:  # (a library that syncs or allocates on the host: run eagerly)
                # A failed capture_end leaves the capture's side stream current: restore the caller's.
                torch.cuda.set_stream(stream)
                self.failed, self.graphs = True, {}
                torch.cuda.synchronize()
                return _sweep_block(st, g0)
        graph, self.fac.nf = self.graphs[g0]
        graph.replay()
        return self.fac


def _candidate_costs(C: Tensor, W0: Tensor, X: Tensor, Y: Tensor, E: Tensor, el: Tensor, valid: Tensor,
                     has_dummy: bool):
    """Exact cost of every candidate of one scope, per row: ``(n, n_c)``, and the Cholesky factors of
    the candidates' Schur complements ``S_RR`` (``(n, n_c, w, w)``, for the swap's update).

    ``X = [w_P', C_P'E]`` and ``Y = B X`` over the row's pruned set without the scope's slots (zero
    there); ``el``/``valid``: each row's slots under every candidate (−1: dummy; ``has_dummy``: any,
    known on the host). A candidate whose ``S_RR`` is not numerically positive definite costs +inf: it
    is never taken, and when it is the current set the scope keeps it (the comparison with inf − inf
    is false)."""
    n, n_c, w = el.shape
    u, V = Y[:, :, :1], Y[:, :, 1:]  # B w_P', B C_P'E
    base = (X[:, :, 0][:, None, :] @ u).reshape(n)
    r = W0[:, E] - (X[:, :, 1:].transpose(1, 2) @ u).squeeze(-1)  # (n, E)
    SE = C[E[:, None], E[None, :]] - X[:, :, 1:].transpose(1, 2) @ V  # (n, E, E)
    e0 = el.clamp(min=0)
    ar = torch.arange(n, device=el.device)
    SR = SE[ar[:, None, None, None], e0[..., :, None], e0[..., None, :]]  # (n, n_c, w, w)
    rR = r.gather(1, e0.reshape(n, -1)).reshape(n, n_c, w)
    if has_dummy:  # dummy slots: Schur complement 1, residual 0 (no cost, no coupling)
        eye = torch.eye(w, dtype=SR.dtype, device=SR.device)
        SR = torch.where(valid[..., :, None] & valid[..., None, :], SR, eye)
        rR = rR * valid
    L, info = torch.linalg.cholesky_ex(SR)  # a candidate whose S_RR round-off made indefinite is never taken
    z = torch.linalg.solve_triangular(L, rR[..., None], upper=False)  # r_Rᵀ S_RR⁻¹ r_R = |L⁻¹ r_R|²
    cost = base[:, None] + z.square().sum((-2, -1))
    return torch.where(info == 0, cost, torch.inf), L


def _chol_solve(L: Tensor, B: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ B`` by two triangular solves: no error check (torch's cholesky_solve and
    cholesky_inverse check theirs, a host sync each on CUDA); a failed factor gives non-finite values."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, B, upper=False), upper=True)


def _repeat_rows(t: Tensor, R: int) -> Tensor:
    """``t.repeat_interleave(R)`` along dim 0 by a view and a copy (no host sync on CUDA)."""
    return t[:, None].expand(t.shape[0], R).reshape(-1)


def scopes_per_block(p: int, w: int) -> int:
    """Scopes swept per block: their panel ``A⁻¹ X`` is one GEMM; the swaps' low-rank factors (2w
    columns a scope) stay a small fraction of the p × p inverse."""
    return max(1, min(_MAX_SCOPE_BLOCK, p // (16 * w)))


def _gather(C: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``C[rows[i, j], cols[k]]`` of the symmetric ``C`` as (n, r, c), by row copies (index_select on dim 0,
    which is fast; a 2-index gather or a dim-1 index_select is not, on the CPU)."""
    n, r = rows.shape
    C_cols = C.index_select(0, cols).t().contiguous()  # (K, c) = C[:, cols], C symmetric
    return C_cols.index_select(0, rows.reshape(-1)).reshape(n, r, cols.numel())


def _scope_panel(T: Tensor, j: int, nE: int, wc: int) -> Tensor:
    """Scope j's columns ``[w, its nE elements]`` of a block panel ``[E_0 …, E_{b−1}, w]``, w at column
    ``wc = b·nE`` (by slices: an index tensor on the last dimension is a slow gather on the CPU). w comes
    last so that the columns a scope's factors need, the later scopes' and w, are one slice."""
    return torch.cat([T[..., wc : wc + 1], T[..., j * nE : (j + 1) * nE]], dim=-1)


def _sweep_block(st: _Chunk, g0: int, fac: Optional["_BlockSwaps"] = None) -> "_BlockSwaps":
    """Sweep scopes ``g0 … g0 + block − 1`` of a chunk; returns their factors (in ``fac`` when given: the
    sync-free form only), not yet in ``A⁻¹``. The sync-free form makes no host sync (capturable in a
    CUDA graph)."""
    C, W0, cand, cols, slots, K, P, wP, Ainv = st.C, st.W0, st.cand, st.cols, st.slots, st.K, st.P, st.wP, st.Ainv
    m, S = cand.shape
    n_c, R, w = slots.shape[1:]
    nE, n, p = cols.shape[1], P.shape[0], P.shape[1]
    dev, dt = C.device, C.dtype
    loc = torch.arange(R, device=dev).repeat(m)  # local row of every row instance
    eye = torch.eye(w, dtype=dt, device=dev)
    g1 = min(S, g0 + st.block)
    bsl = slice(g0 * w, g1 * w)  # the block's slots
    wc = (g1 - g0) * nE  # the panel's w column
    Xs = torch.cat([_gather(C, P, cols[g0:g1].reshape(-1)), wP[..., None]], dim=2)  # (n, p, b·E + 1)
    Xs[:, bsl] = 0  # the block's slots change during the block: their rows are applied separately
    T0 = Ainv @ Xs  # the one full pass over A⁻¹ for these scopes
    # (n, p, b·w) A⁻¹'s columns at the block's slots, before its swaps; a contiguous copy, as the
    # block's every scope multiplies it (a strided slice costs BLAS a copy each time).
    A_blk = Ainv[:, :, bsl].contiguous()
    if fac is None:
        fac = _BlockSwaps(n, 2 * w * (g1 - g0), p, Xs.shape[2], Xs, zeroed=not st.sync_free)
    else:  # the caller's buffers (CUDA graphs: one set for every block); every row writes every factor
        fac.reset()
    for g in range(g0, g1):
        j = g - g0
        sl, sl_b = slice(g * w, (g + 1) * w), slice(j * w, (j + 1) * w)
        E = cols[g]
        # X = [w_P, C_PE] over the current P, zero at this scope's slots.
        Xb = torch.cat([wP[:, bsl, None], _gather(C, P[:, bsl], E)], dim=2)  # (n, b·w, 1 + E)
        Xb[:, sl_b] = 0
        X = _scope_panel(Xs, j, nE, wc)
        X[:, bsl] = Xb
        # A⁻¹_cur X = A⁻¹ X_out + UD Uᵀ X_out + A⁻¹_cur[:, block slots] X_block  (X_out: rows outside the block)
        Y = torch.baddbmm(_scope_panel(T0, j, nE, wc), A_blk, Xb)
        Aq = A_blk[:, :, sl_b]
        if fac.nf:
            Uf, UDf = fac.Ut[:, : fac.nf], fac.UDt[:, : fac.nf].transpose(1, 2)  # (n, nf, p), (n, p, nf)
            Y.baddbmm_(UDf, torch.baddbmm(_scope_panel(fac.UtX[:, : fac.nf], j, nE, wc), Uf[:, :, bsl], Xb))
            Aq = torch.baddbmm(Aq, UDf, Uf[:, :, sl])
        # Downdate: B = the inverse over P' = P without this scope's slots (zero there), applied to X.
        # (A_qq is a principal block of a positive definite inverse: Cholesky, and no error check,
        # which would sync the host; the ``_ex`` info is not read, a failure comes out non-finite.)
        Aqq = Aq[:, sl]
        Lq = torch.linalg.cholesky_ex(Aqq)[0]
        Y.baddbmm_(Aq, _chol_solve(Lq, Aq.transpose(1, 2) @ X), alpha=-1)
        Y[:, sl] = 0
        V = Y[:, :, 1:]  # B C_P'E
        el = slots[g][:, loc].transpose(0, 1)  # (n, n_c, w): each row's slots under every candidate
        valid = el >= 0
        cost_rows, L = _candidate_costs(C, W0, X, Y, E, el, valid, st.has_dummy[g])  # (n, n_c)
        cost = cost_rows.reshape(m, R, n_c).sum(1)  # exact cost of the row group per candidate
        cur = cand[:, g].long()
        cur_cost = cost.gather(1, cur[:, None]).squeeze(1)
        best_cost, best = cost.min(dim=1)
        swap = best_cost < cur_cost - _REL_TOL * cur_cost.abs()
        if st.sync_free:  # every row takes part (no host sync); rows that keep their set get zero factors
            idx, rows, on, new = torch.arange(n, device=dev), slice(None), _repeat_rows(swap, R), _repeat_rows(best, R)
            st.swaps.add_(swap.sum())
        elif bool(swap.any()):
            gi, on = swap.nonzero().squeeze(1), None
            idx = (gi[:, None] * R + torch.arange(R, device=dev)).reshape(-1)  # the groups' row instances
            rows, new = idx, _repeat_rows(best[gi], R)
            st.swaps.add_(gi.numel())
        else:
            continue
        take = (lambda t: t) if on is not None else (lambda t: t.index_select(0, idx))  # noqa: E731
        Rel, Rv = el[idx, new], valid[idx, new]  # (k, w)
        # The swap's factor (swapped groups' rows only; zero elsewhere): the new inverse over P' ∪ R is
        # A⁻¹_cur − A_q A_qq⁻¹ A_qᵀ + Ṽ S_R⁻¹ Ṽᵀ, with Ṽ = V_R − I at the slots (V_R zero there and at dummies).
        VR = take(V).gather(2, Rel.clamp(min=0)[:, None, :].expand(idx.numel(), p, w)) * Rv[:, None, :]
        VR[:, sl] = -eye
        Aqi = take(Aq)
        Un = torch.cat([Aqi, VR], dim=2)  # (k, p, 2w)
        UD = torch.cat([-_chol_solve(take(Lq), Aqi.transpose(1, 2)), _chol_solve(L[idx, new], VR.transpose(1, 2))],
                       dim=1)
        dummy = K + torch.arange(g * w, (g + 1) * w, device=dev)
        Pn = torch.where(Rv, E[Rel.clamp(min=0)], dummy)
        if on is not None:  # (where, not a product: a failed factor, Lq's or a candidate's, may hold NaN)
            Un = torch.where(on[:, None, None], Un, 0.0)
            UD = torch.where(on[:, None, None], UD, 0.0)
            Pn = torch.where(on[:, None], Pn, P[:, sl])
            cand[:, g] = torch.where(swap, best, cur).to(cand.dtype)
        else:
            cand[gi, g] = best[gi].to(cand.dtype)
        later = (j + 1) * nE  # (the later scopes' columns and w: all the block reads of this factor)
        fac.add(rows, Un, UD, take(Xs[:, :, later:]), later, on)
        P[rows, sl] = Pn
        wP[rows, sl] = W0[rows].gather(1, Pn)
    return fac


class _BlockSwaps:
    """A block's swaps as low-rank factors of its rows' inverses, ``A⁻¹_cur = A⁻¹ + UDtᵀ Ut``, stored
    transposed (the first ``nf`` factors in use are contiguous): 2w factors per scope with a swap (zero
    for rows that did not swap there), and ``UtX = Uᵀ Xs`` for the block's later scopes. ``zeroed``:
    start from zeros (not needed when every row writes every factor: the sync-free form)."""

    def __init__(self, n: int, max_factors: int, p: int, panel_cols: int, like: Tensor, zeroed: bool = True):
        new = like.new_zeros if zeroed else like.new_empty
        self.Ut = new(n, max_factors, p)
        self.UDt = new(n, max_factors, p)
        self.UtX = new(n, max_factors, panel_cols)
        self.nf = 0
        self.swapped = torch.zeros(n, dtype=torch.bool, device=like.device)

    def reset(self) -> None:
        self.nf = 0
        self.swapped.zero_()

    def add(self, rows, Un: Tensor, UD: Tensor, Xs_rows: Tensor, col0: int, on: Optional[Tensor]) -> None:
        """One scope's factors ``Un`` (k, p, 2w) and ``UD`` (k, 2w, p) for ``rows`` (an index, or every
        row with ``on`` saying which swapped; the others' factors are zero); ``Xs_rows``: their panels from
        column ``col0`` on (the later scopes' and w: the columns of ``UtX`` the block reads)."""
        f = slice(self.nf, self.nf + Un.shape[2])
        self.Ut[rows, f] = Un.transpose(1, 2)
        self.UDt[rows, f] = UD
        self.UtX[rows, f, col0 : col0 + Xs_rows.shape[2]] = Un.transpose(1, 2) @ Xs_rows  # (a shorter last block)
        self.nf = f.stop
        if on is None:
            self.swapped[rows] = True
        else:
            self.swapped |= on

    def fold_into(self, Ainv: Tensor) -> None:
        """Add the factors to ``A⁻¹`` (all rows when most swapped: the others' factors are zero)."""
        if not self.nf:
            return
        k = int(self.swapped.sum())  # one sync a block
        if 2 * k >= Ainv.shape[0]:  # rows that did not swap have zero factors: adding them is exact
            Ainv.baddbmm_(self.UDt[:, : self.nf].transpose(1, 2), self.Ut[:, : self.nf])
        elif k:
            ri = self.swapped.nonzero().squeeze(1)
            Ainv.index_copy_(
                0, ri, torch.baddbmm(Ainv.index_select(0, ri), self.UDt[ri, : self.nf].transpose(1, 2), self.Ut[ri, : self.nf])
            )
