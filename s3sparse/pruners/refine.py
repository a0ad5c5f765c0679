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
that row by the block-inverse formula (rank q). Rows are independent and batched (in chunks): a
chunk's ``A⁻¹`` is computed once, carried through all its sweeps by these updates (float64), and
gives the final weights after one step of iterative refinement against ``C_PP`` (the updates'
round-off does not reach them; inverting is most of a chunk's cost on a GPU). Scopes are swept in
blocks: one GEMM applies every row's ``A⁻¹`` to the panel of a block's scopes, and the block's swaps
are carried as low-rank factors until its end (same swaps as one scope at a time; 3.6× faster on
a 1536-column layer's 2:4 on the CPU).

Row-coupled patterns (scopes shared by rows p and p+8, the 16-column blocks):
the rows sharing scopes form a row group (:func:`~.layout.row_groups`). A
candidate kept set of such a scope changes the pruned sets of every row of the
group it touches; the layer error is a sum of independent row costs, so the
candidate's exact cost is the sum over the group's rows of each row's exact
cost, and a candidate is taken only when that sum drops. Every row still holds
its own ``A⁻¹`` (the machinery above, rows of a group batched together); as a
candidate may prune a different number of a row's columns than the current set,
every row's pruned set is padded to a fixed number of slots per scope with
dummy columns: ``C`` is extended by an identity block and ``w`` by zeros there,
so a dummy neither costs nor couples (its Schur complement is 1, its residual 0).
Single-row patterns never need a dummy (every candidate prunes ``q`` elements of
the row) and run exactly as before.

Scope: every pattern :func:`~.layout.row_groups` accepts (N:M, N:M blocks,
coupled N:M, the row-coupled 16-column blocks; regular patterns).

Guarantee (never worse than the input): the output error
``tr(ΔW H ΔWᵀ)`` of every row group is compared with the input weight's; a group
whose refined error is higher (possible only through damping or the input
already being better than the OBS optimum of its own mask under the damped H)
keeps its input weights (a whole group: its rows share scopes).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from ..checks import check_callable, check_damp, check_int
from ..errors import ArgumentError
from .hessian import check_hessian, damped_inverse
from .layout import block_subsets, count_subsets, normalize_nnz, row_groups, scope_layout
from .obs_layer import MAX_SUBSETS
from .refine_sweep import ChunkSweeps, SweepGraphs, chunk_weights, scopes_per_block
from .sharding import AllRanks, RowShard, check_process_group
from .true_obs_sweep import free_memory_bytes

__all__ = ["RefineResult", "check_refinable", "refine_mask", "refining"]

# Bytes a chunk's sweep holds when chunk_size is not given (the row inverses and the block panels:
# _sweep_bytes): on CUDA large chunks keep the GPU busy (the sweep is a Python loop
# over scopes, its host work paid once per chunk); on the CPU a chunk is as fast as all rows at once,
# in a fraction of the memory.
_CHUNK_BYTES = {"cuda": 12 << 30, "cpu": 192 << 20}


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
    """(layout, row groups) of a pattern; refuses patterns not split into regular row groups."""
    layout = scope_layout(scope)
    try:
        groups = row_groups(layout)
    except ArgumentError as e:
        raise ArgumentError(f"refine_mask: {e}") from None
    return layout, groups


def check_refinable(scope, nnz: Optional[int] = None) -> None:
    """Raise ArgumentError unless :func:`refine_mask` can refine ``scope``'s pattern: one whose rows split
    into regular row groups (:func:`~.layout.row_groups`; single-row and row-coupled patterns alike)
    and, with ``nnz``, whose scopes have at most ``MAX_SUBSETS`` candidate kept sets. Methods call it
    before pruning, so a refusal leaves the weight unchanged."""
    layout, _ = _row_scopes(scope)
    if nnz is not None:
        G = layout.blocks_per_scope
        _check_subsets(G, G - normalize_nnz(nnz, G))


def _check_subsets(blocks: int, num_prune: int) -> None:
    if count_subsets(blocks, num_prune) > MAX_SUBSETS:
        raise ArgumentError(
            f"refine_mask: choosing {num_prune} of {blocks} blocks has more than {MAX_SUBSETS} subsets; "
            "refine a pattern with smaller scopes"
        )


def _check_options(sweeps: int, damp: float, progress_fn) -> tuple:
    """(sweeps, damp) checked and normalised; ``progress_fn`` checked."""
    check_callable(progress_fn, "progress_fn")
    return check_int(sweeps, "sweeps", minimum=0, what="sweeps over the scopes"), check_damp(damp)


@contextlib.contextmanager
def refining(scope, hessian: Tensor, nnz: int, sweeps: int, damp: float = 1e-4,
             progress_fn: Optional[Callable[[str], None]] = None, process_group=None) -> Iterator[None]:
    """A pruning method's ``refine=N`` option, the one home of its plumbing: ``with refining(...):`` around
    the method's pruning of the weight behind ``scope``.

    With ``sweeps > 0`` the pattern is checked first (:func:`check_refinable`: a refusal leaves the
    weight unchanged) and the dense weight copied; when the block ends without an error,
    :func:`refine_mask` runs ``sweeps`` sweeps from the pruned weight against that copy (with
    ``process_group``, split over its ranks like the pruning); if it raises, the dense weight is put
    back, so the method leaves the weight unchanged on any error. With ``sweeps == 0`` it does nothing."""
    if not sweeps:
        yield
        return
    _check_options(sweeps, damp, progress_fn)
    check_refinable(scope, nnz)
    param = scope_layout(scope).param
    dense = param.detach().clone()
    yield
    try:
        refine_mask(scope, hessian, nnz, dense, sweeps=sweeps, damp=damp, progress_fn=progress_fn,
                    process_group=process_group)
    except BaseException:
        param.data.copy_(dense)  # the method's promise: on any error the weight is left unchanged
        raise


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
    process_group=None,
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
        min_change: a chunk of rows stops after a sweep that changes fewer than
            this fraction of its scopes (a sweep that changes none always stops;
            rows are independent, and a chunk's rows are finished, all sweeps,
            before the next chunk's are inverted).
        chunk_size: row groups held at once (default: as many as fit 192 MiB of sweep memory on the
            CPU, 12 GiB on CUDA within 3/4 of the free memory; see ``_sweep_bytes``).
        progress_fn: optional ``callable(str)`` for progress messages.
        process_group: a torch.distributed ProcessGroup (every rank calls this with the same
            arguments and H): each rank sweeps a contiguous run of whole row groups, the rows are
            gathered, and every rank ends with the same whole weight, the one a single process
            computes (rows are independent; with ``min_change`` > 0 a chunk's stop depends on its
            rows, and the chunks differ); the sweeps' counts are summed over the ranks. An error on
            one rank is raised on all.

    Returns:
        a :class:`RefineResult`. The weight is written once, at the end.
    """
    sweeps, damp = _check_options(sweeps, damp, progress_fn)
    group = check_process_group(process_group)
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
        return RefineResult((), groups.num_groups * S, 0)
    _check_subsets(G, num_prune)

    dev = param.device
    f64 = torch.float64
    NG, R = groups.num_groups, groups.rows_per_group
    rows = groups.rows.reshape(-1)  # row instance i = row R·(group) + local row, group-major
    cols = groups.cols.to(dev)  # (S, E), blocks B elements each, block-major
    local_rows = groups.local_rows.to(dev)  # (S, E): each element's row within its group
    W_in = param.detach()[rows].to(f64)
    W0 = dense_weight.detach().to(device=dev, dtype=f64)[rows]
    C, _ = damped_inverse(hessian, damp, dtype=f64, what="refine_mask's H + damp*I")
    C = (C + C.mT) * 0.5  # exactly symmetric (the sweep reads C[P, E] as C[E, P]); a no-op where it already is
    block_sets, elem_sets = block_subsets(G, num_prune, B, dev)  # (n_c, np), (n_c, q)
    slots = _slot_table(local_rows, elem_sets, R)  # (S, n_c, R, w)
    w = slots.shape[3]
    if bool((slots < 0).any()):  # dummy columns K.. (identity in C, zero in w): see the module docstring
        n_d = S * w
        C = torch.block_diag(C, torch.eye(n_d, dtype=f64, device=dev))
        W0 = torch.cat([W0, W0.new_zeros(W0.shape[0], n_d)], dim=1)
    cand = _starting_candidates(W_in, cols, local_rows, R, block_sets, num_prune, G, B)  # (NG, S)

    m = chunk_size or _default_chunk(dev, R * _sweep_bytes(S * w, w, cols.shape[1]))
    m = check_int(m, "chunk_size", minimum=1, what="row groups held at once")
    shard = RowShard.of_groups(groups.rows, group) if group is not None else None
    g_lo, g_hi = (shard.group_bounds[shard.rank], shard.group_bounds[shard.rank + 1]) if shard else (0, NG)
    mine = slice(g_lo * R, g_hi * R)  # this rank's row groups (all of them without a process group)
    cand = cand[g_lo:g_hi]
    changed, W_out = _run_sweeps(C, W0[mine], cand, cols, slots, K, sweeps, m, min_change, progress_fn, NG, group)

    with AllRanks(group, "setting refine_mask's weights") as sync:
        worse = _keep_better_groups(W_out, W_in[mine], W0[mine, :K], hessian, R)
        if not torch.isfinite(W_out).all():
            raise ArgumentError("refine_mask produced non-finite weights; the weight was left unchanged. Raise `damp`")
        sync.payload = int(worse.sum())
    W_out = W_out.to(param.dtype)
    result = param.detach().clone()
    result[rows[mine]] = W_out
    if shard is not None:
        shard.gather(result, W_out)
    param.data.copy_(result)
    if progress_fn is not None:
        progress_fn("")
    return RefineResult(tuple(changed), NG * S, sum(sync.results))


def _default_chunk(dev: torch.device, group_bytes: int) -> int:
    """Row groups a chunk holds: ``_CHUNK_BYTES`` of sweep memory, within 3/4 of the free memory on CUDA."""
    budget = _CHUNK_BYTES["cuda" if dev.type == "cuda" else "cpu"]
    if dev.type == "cuda":
        budget = min(budget, free_memory_bytes(dev) * 3 // 4)
    return max(1, budget // max(1, group_bytes))


def _sweep_bytes(p: int, w: int, E: int) -> int:
    """Bytes one row holds during a sweep: its p × p float64 inverse and the block's panels (X and A⁻¹X,
    p × (1 + b·E) each; the factors U, U_D and UᵀX, 2w·b × p each). (Rows are inverted one at a time:
    the inversion's transients, one row's C_PP and factor, are not per row.)"""
    b = scopes_per_block(p, w)
    return 8 * (p * p + 2 * p * (1 + b * E) + 6 * w * b * p)


def _slot_table(local_rows: Tensor, elem_sets: Tensor, R: int) -> Tensor:
    """(S, n_c, R, w): for scope g, candidate c and local row ρ, the elements (positions in the scope)
    of the candidate's pruned set that lie in row ρ, in order, padded with −1 (a dummy) to ``w``,
    the most any candidate prunes of one row. Single-row patterns: ``elem_sets`` itself (w = q)."""
    S = local_rows.shape[0]
    n_c, q = elem_sets.shape
    lr = local_rows[:, elem_sets]  # (S, n_c, q)
    hit = lr[:, :, None, :] == torch.arange(R, device=lr.device)[None, None, :, None]  # (S, n_c, R, q)
    w = int(hit.sum(-1).max())
    order = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices[..., :w]
    valid = hit.gather(-1, order)
    elems = elem_sets[None, :, None, :].expand(S, n_c, R, q).gather(-1, order)
    return torch.where(valid, elems, -1)


def _starting_candidates(
    W_in: Tensor, cols: Tensor, local_rows: Tensor, R: int, block_sets: Tensor, num_prune: int, G: int, B: int
) -> Tensor:
    """(NG, S) index into ``block_sets`` of every scope's starting pruned set: its first ``num_prune`` all-zero blocks."""
    S, NG = cols.shape[0], W_in.shape[0] // R
    vals = W_in.reshape(NG, R, -1)[:, local_rows, cols]  # (NG, S, E)
    zero = (vals == 0).reshape(NG, S, G, B).all(-1)  # (NG, S, G)
    if bool((zero.sum(-1) < num_prune).any()):
        raise ArgumentError(
            f"refine_mask: some scope of the weight has fewer than {num_prune} all-zero blocks; the weight behind "
            "`scope` must be pruned to the pattern (nnz blocks kept per scope) first"
        )
    order = torch.sort((~zero).to(torch.int8), dim=-1, stable=True).indices[..., :num_prune]
    cur_blocks = torch.sort(order, dim=-1).values  # (NG, S, np), ascending as block_sets
    return (cur_blocks[:, :, None, :] == block_sets[None, None]).all(-1).to(torch.int8).argmax(-1)


def _run_sweeps(
    C: Tensor,
    W0: Tensor,
    cand: Tensor,
    cols: Tensor,
    slots: Tensor,
    K: int,
    sweeps: int,
    m: int,
    min_change: float,
    progress_fn: Optional[Callable[[str], None]],
    num_groups: int,
    group=None,
) -> tuple:
    """Refine this rank's row groups (``cand``'s rows, updated in place) ``m`` at a time: a chunk is
    inverted once, swept up to ``sweeps`` times (it stops after a sweep that changes none of its scopes,
    or fewer than ``min_change`` of them: its rows are independent of the others') and given the
    optimal weights for its final mask. Returns the scopes changed per sweep, over all ``num_groups``
    groups (summed over the chunks and the ranks of ``group``), and the weights (``W0``'s rows, K columns)."""
    NG, S = cand.shape
    R = slots.shape[2]
    m = max(1, min(m, NG))
    sweeper = SweepGraphs(m) if SweepGraphs.applies(C) else ChunkSweeps(m)
    W_out = W0.new_empty(W0.shape[0], K)
    with AllRanks(group, "sweeping refine_mask's scopes") as sync:
        mine = []  # this rank's scopes changed per sweep, over the sweeps any chunk ran
        for lo in range(0, NG, m):
            part, rows = cand[lo : lo + m], slice(lo * R, (lo + m) * R)
            st = sweeper.load(C, W0[rows], part, cols, slots, K)
            for sweep in range(sweeps):
                n = sweeper.sweep(st)
                mine += [0] * (sweep + 1 - len(mine))
                mine[sweep] += n
                if n == 0 or n < min_change * part.shape[0] * S:
                    break
            part.copy_(st.cand)
            W_out[rows] = chunk_weights(st)[:, :K]
            del st  # (before the next chunk is loaded: one chunk's state in memory at a time)
            if progress_fn is not None and lo + m < NG:
                progress_fn(f"refine_mask: rows {(lo + m) * R} of {NG * R} refined (scopes changed per sweep: {mine})")
        sync.payload = mine
    changed = [sum(r[i] for r in sync.results if i < len(r)) for i in range(max(len(r) for r in sync.results))]
    if progress_fn is not None:
        for sweep, n in enumerate(changed):
            progress_fn(f"refine_mask: sweep {sweep + 1}/{sweeps}: {n} of {num_groups * S} scopes changed")
    return changed, W_out


def _keep_better_groups(W_out: Tensor, W_in: Tensor, W0: Tensor, hessian: Tensor, R: int) -> Tensor:
    """Never worse than the input: row groups of ``W_out`` (R rows each, consecutive) with a higher undamped
    output error take ``W_in``'s rows (in place; whole groups: their rows share scopes). The rows kept."""
    H = hessian.detach().to(torch.float64)
    d_out, d_in = W_out - W0, W_in - W0
    e_out = ((d_out @ H) * d_out).sum(1).reshape(-1, R).sum(1)
    e_in = ((d_in @ H) * d_in).sum(1).reshape(-1, R).sum(1)
    worse = (e_out > e_in).repeat_interleave(R)
    W_out[worse] = W_in[worse]
    return worse
