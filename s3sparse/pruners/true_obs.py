"""True OBS: exact per-row OBS, every row under its own inverse Hessian, left-looking.

Notation as in :mod:`.obs`. Mathematically every row has its own ``C``: after each
batch of ``ng`` scopes its pruned set S is removed with ``w ← w − C_{:,S} (C_SS)⁻¹ w_S``
and ``C ← C − C_{:,S} (C_SS)⁻¹ C_{S,:}`` (Schur complement). A batch's blocks are
chosen by ``independent`` (Σ w²/diag C per block, exact block costs where rows
compete), ``joint`` (exact subset cost, op ``score_subsets``) or ``hybrid``
(the independent choice unless its exact cost is above ``hybrid_tau`` times the
least subset cost, then that subset) scoring and compensated jointly on all
remaining weights of the row.

No per-row C is stored or updated. Each row group keeps the factors U of its
updates (``C = C0 − U Uᵀ``, ``C0 = (H + λI)⁻¹``), and each batch forms only the
part of C it reads, the panel ``C0[S, R] − U[S] U[R]ᵀ``: the Schur complement of
the columns pruned so far, in factored (left-looking) form. That panel and the
scope blocks scoring reads are the Schur-update op :func:`s3sparse.ops.lowrank_sub`,
the new factors :func:`s3sparse.ops.lowrank_factor` (:mod:`.true_obs_sweep`); the
sweep is replayed per row chunk as a CUDA graph (:mod:`.replay`).

This module is the driver: options, the batches and their column plan, the
device plan (:class:`~.true_obs_sweep.DevicePlan`: how the factors are held and
formed on a GPU and on a CPU, the only device-dependent choices), row chunks
within memory, retry levels for rows whose sub-problem is not positive
definite in the storage precision, and rows split over a process group.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ..checks import check_callable, check_choice, check_damp, check_dtype, check_int
from ..dtypes import opmath_dtype
from ..errors import ArgumentError, ArgumentTypeError, NumericalError
from .hessian import damped_inverse
from .layout import count_subsets
from .method import MethodOptions, ProgressFn, PruningMethod
from .obs import select_subsets
from .obs_layer import MAX_SUBSETS, OBSLayer
from .refine import refining
from .replay import GraphReplay
from .sharding import AllRanks, RowShard, check_process_group
from .true_obs_sweep import (DEFAULT_HYBRID_TAU, ChunkSweep, DevicePlan, LazyPlan, ScaledInverse, free_memory_bytes,
                             lazy_plan)

__all__ = ["TrueOBS", "TrueOBSOptions"]

# Most columns one row group prunes in one batch (bounds C_SS and the panel).
MAX_PRUNED_PER_STEP = 256

ORDERS = ("left_to_right", "largest_first")
SCORINGS = ("independent", "joint", "hybrid")
C_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class TrueOBSOptions(MethodOptions):
    """Options of True OBS, checked when built.

    Attributes:
        damp: damping; relative to mean(diag H) when < 1, absolute otherwise.
            1e-4: exact Schur updates need little damping.
        ng: scopes per batch (capped so a row group prunes at most 256 columns
            per step). None: 64, and 1 for row-coupled patterns — there the rows
            compete for every scope, and a batch chosen with a stale C costs
            2–14% output error on real layers (see :meth:`scopes_per_batch`).
        chunk_size: rows held at once (each group with its K × pruned factors);
            None: from free memory and the device plan's budget (4 GiB of
            factors on CUDA, 256 MiB on CPU; at least 32 rows).
        order: ``'left_to_right'`` or ``'largest_first'`` (scopes by descending
            pre-scored cost under the shared C).
        scoring: ``'independent'`` (each block scored alone, the cheapest pruned),
            ``'joint'`` (the candidate subset of a scope of least exact OBS cost
            ``w_Pᵀ (C_PP)⁻¹ w_P``) or ``'hybrid'`` (per row and scope the independent
            choice, unless its exact cost is above ``hybrid_tau`` × the least subset
            cost: then that subset). Independent can prune both columns of a
            duplicated channel (each cheap alone, the other compensating); joint
            fixes that but is slightly worse on some real layers; hybrid keeps
            independent's choice except where it is that far off. Patterns with
            more than ``MAX_SUBSETS`` (20000) candidate subsets per scope: ``'joint'``
            is refused, ``'hybrid'`` runs as ``'independent'``. ``order='largest_first'``
            ranks scopes for ``'hybrid'`` as for ``'independent'``.
        hybrid_tau: the threshold of ``'hybrid'`` scoring, a number >= 1 (inf:
            never switch, i.e. independent; 1: the least-cost subset wherever it
            is cheaper than the independent choice, i.e. joint up to ties).
        c_dtype: precision of the per-row factors U of C (math is fp32, fp64 for fp64):
            they are rounded to it, and stored in it on CUDA (on CPU, whose BLAS
            has no fp16 GEMM, the same values are held in fp32).
        panel_batches: batches whose panels are formed from one read of the factors
            (blocked form: the candidate rows of G batches' scopes formed at once,
            then brought up to date batch by batch with each batch's own factor;
            the same result as 1 to round-off, fewer bytes read where batches are
            small, e.g. row-coupled patterns at ``ng=1``; the block panel holds
            G batches' candidate rows). 1: a read of the factors per batch.
            None (default): 4 on CUDA for row-coupled patterns (16-col on an H100:
            27.6 s against 31.7 at 1 and 35.9 at 16, one run), else 1.
        refine: sweeps of exact swap refinement of the mask after pruning
            (:func:`~s3sparse.pruners.refine_mask`, with this ``damp``); 0: off.
            Patterns whose scopes each lie in one row only (not row-coupled ones).
    """

    shards_rows: ClassVar[bool] = True

    damp: float = 1e-4
    ng: Optional[int] = None
    chunk_size: Optional[int] = None
    order: str = dataclasses.field(default="left_to_right", metadata={"choices": ORDERS})
    scoring: str = dataclasses.field(default="independent", metadata={"choices": SCORINGS})
    hybrid_tau: float = DEFAULT_HYBRID_TAU
    c_dtype: torch.dtype = dataclasses.field(default=torch.float16, metadata={"choices": C_DTYPES})
    refine: int = 0
    panel_batches: Optional[int] = None

    def __post_init__(self):
        self._set("damp", check_damp(self.damp))
        check_choice(self.order, "order", ORDERS)
        check_choice(self.scoring, "scoring", SCORINGS)
        self._set("hybrid_tau", check_hybrid_tau(self.hybrid_tau))
        if self.ng is not None:
            self._set("ng", check_int(self.ng, "ng", minimum=1, what="scopes per batch"))
        if self.chunk_size is not None:
            self._set("chunk_size", check_int(self.chunk_size, "chunk_size", minimum=1,
                                              what="rows held at once, or None"))
        check_dtype(self.c_dtype, "c_dtype", C_DTYPES)
        self._set("refine", check_int(self.refine, "refine", minimum=0, what="sweeps of mask refinement (0: off)"))
        if self.panel_batches is not None:
            self._set("panel_batches", check_int(self.panel_batches, "panel_batches", minimum=1,
                                                 what="batches a read of the factors serves, or None"))

    @property
    def enumerates_subsets(self) -> bool:
        return self.scoring == "joint"

    def scopes_per_batch(self, rows_per_group: int) -> int:
        """``ng``, or when None its default: 1 where rows compete for a scope, else 64."""
        if self.ng is not None:
            return self.ng
        return 1 if rows_per_group > 1 else 64

    def batches_per_panel(self, rows_per_group: int, device: torch.device) -> int:
        """``panel_batches``, or when None its default: 4 on CUDA where rows compete for a scope (batches
        of one scope: the factor reads dominate), else 1."""
        if self.panel_batches is not None:
            return self.panel_batches
        return 4 if device.type == "cuda" and rows_per_group > 1 else 1


def check_hybrid_tau(tau, name: str = "hybrid_tau") -> float:
    """``hybrid_tau``: a real number >= 1 (inf allowed: hybrid scoring never switches)."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise ArgumentTypeError(f"`{name}` must be a real number >= 1, got {type(tau).__name__} {tau!r}")
    value = float(tau)
    if not value >= 1.0:  # NaN too
        raise ArgumentError(
            f"`{name}` must be a number >= 1 (the factor by which the independent choice's exact cost may "
            f"exceed the least subset cost; 4 by default, inf: never switch), got {tau!r}"
        )
    return value


class TrueOBS(PruningMethod):
    """True OBS (see the module docstring); rows can be split over ranks.

    ``TrueOBS(ng=8).prune(scope, H, nnz)``; :meth:`prune_layer` prunes an
    :class:`OBSLayer` (whose inverses it reuses).
    """

    Options = TrueOBSOptions

    def prune(self, scope, hessian: Tensor, nnz: int, progress_fn: ProgressFn = None, process_group=None) -> None:
        """Prune the weight behind ``scope`` (one 2-D weight) to ``nnz`` blocks per scope, in place
        (see :meth:`prune_layer`)."""
        group = check_process_group(process_group)
        # Built on every rank before prune_layer's own sync point: a sync here too,
        # so a rank failing to build it cannot leave the others waiting.
        with AllRanks(group, "setting up True OBS"):
            layer = OBSLayer(scope, hessian)
        self.prune_layer(layer, nnz, progress_fn, group)

    @torch.no_grad()
    def prune_layer(self, layer: OBSLayer, nnz: int, progress_fn: ProgressFn = None, process_group=None) -> None:
        """Per-row True OBS with Schur-complement updates in factored form, in place.

        Every row works under its own inverse Hessian C, the Schur complement of
        its pruned columns in ``C0 = (H + λI)⁻¹``, which is never stored: the row
        group keeps factors U with ``C = C0 − U Uᵀ``, and each batch of ``ng`` scopes
        forms just the panel it reads, ``C0[S, R] − U[S] U[R]ᵀ`` (op ``lowrank_sub``),
        then appends its own factors. The batch's blocks are chosen per scope (``independent``:
        the blocks of least Σ w²/C_cc, or where rows compete for a scope, of least
        exact cost ``w_bᵀ (C_bb)⁻¹ w_b`` each; ``joint``: the subset of least exact
        OBS cost) and compensated jointly on every remaining weight of the row,
        including kept weights of scopes already done. Rows that share a scope
        (row-coupled patterns) compete by these costs, each under its own C.

        Args:
            layer: the weight, its scopes and H.
            nnz: blocks kept per scope.
            progress_fn: optional ``callable(str)`` for progress messages.
            process_group: a torch.distributed ProcessGroup to split the rows over
                (every rank of it calls this with the same arguments on a layer
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
        with refining(layer.scope, layer.hessian, nnz, self.options.refine, self.options.damp, progress_fn, group):
            self._prune_rows(layer, nnz, progress_fn, group)

    def _prune_rows(self, layer: OBSLayer, nnz: int, progress_fn: ProgressFn, group) -> None:
        """True OBS on every row (this rank's share of them with a process group), written once at the end."""
        with AllRanks(group, "pruning its rows with True OBS") as sync:
            shard = W = None
            sync.payload = 0
            layer.check_weight_finite()
            check_callable(progress_fn, "progress_fn")
            num_prune = layer.num_prune(nnz)
            if num_prune:
                todo = torch.arange(layer.groups.num_groups, device=layer.W.device)
                if group is not None:
                    shard = RowShard.of_groups(layer.groups.rows, group)
                    todo = todo[shard.group_bounds[shard.rank] : shard.group_bounds[shard.rank + 1]]
                W = layer.working_copy()
                sync.payload = _prune_groups(layer, W, todo, num_prune, self.options, progress_fn)
        if W is None:  # nothing to prune
            return
        if shard is not None:
            shard.gather(W, W[shard.rows])
        redone = sum(sync.results)
        if redone:
            warnings.warn(
                f"prune_true_obs: {redone} of {layer.M} rows hit a non-positive-definite sub-problem and were redone "
                "with fp32 C / more damping",
                RuntimeWarning,
                stacklevel=2,
            )
        if progress_fn is not None:
            progress_fn("")
        layer.write_back(W)


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """What every retry level of one call runs: the batches of scope positions, their
    column plan, the first level's device plan (it sizes the chunks), the row groups
    per chunk, and the scoring."""

    batches: list
    plan: LazyPlan
    device_plan: DevicePlan
    groups_per_chunk: int
    nnz: int
    scoring: str  # as asked, but 'independent' for 'hybrid' where a scope has too many subsets to cost
    subsets: Optional[Tensor]  # the candidate subsets of a scope ('joint' and 'hybrid' only)
    panel_batches: int = 1
    hybrid_tau: float = DEFAULT_HYBRID_TAU


def _schedule(layer: OBSLayer, W: Tensor, num_prune: int, o: TrueOBSOptions) -> _Schedule:
    """Batches (in ``o.order``, ``ng`` scopes each), their plan, and the chunk size."""
    g = layer.groups
    pruned_per_scope = num_prune * layer.bk
    scoring = o.scoring
    if scoring == "hybrid" and count_subsets(layer.blocks_per_scope, num_prune) > MAX_SUBSETS:
        scoring = "independent"  # too many subsets to cost exactly: hybrid is independent here (documented)
    subsets = layer.subsets(num_prune) if scoring in ("joint", "hybrid") else None
    positions = (
        _prescore_order(layer, W, num_prune, o.scoring, o.damp)
        if o.order == "largest_first"
        else torch.arange(g.scopes_per_group, device=layer.W.device)
    )
    # A row group prunes exactly pruned_per_scope columns in each scope.
    ng = o.scopes_per_batch(g.rows_per_group)
    ng_eff = max(1, min(int(ng), MAX_PRUNED_PER_STEP // max(1, pruned_per_scope)))
    batches = list(positions.split(ng_eff))
    plan = lazy_plan(layer, batches, ng_eff * pruned_per_scope)
    device_plan = DevicePlan.for_device(layer.W.device, o.c_dtype)
    G = max(1, min(o.batches_per_panel(g.rows_per_group, layer.W.device), len(batches)))
    # The block panel's rows per group, twice: a run's panel and the temporaries of
    # its formation / updates (the factor gather, an update's out-of-place result).
    block_rows = 2 * G * ng_eff * layer.layout.elems_per_scope if G > 1 else 0
    rows_per_chunk = (int(o.chunk_size) if o.chunk_size is not None
                      else _auto_chunk_rows(layer, plan, device_plan, block_rows))
    groups_per_chunk = max(1, rows_per_chunk // g.rows_per_group)
    return _Schedule(batches, plan, device_plan, groups_per_chunk, layer.blocks_per_scope - num_prune, scoring,
                     subsets, G, o.hybrid_tau)


def _retry_levels(c_dtype: torch.dtype, damp: float) -> list[tuple[torch.dtype, float]]:
    """(factor storage, damping) of each attempt: as asked, then fp32 (for fp16/bf16
    storage), fp32 with 100× the damping, fp64 with 1e4× the damping."""
    levels = [(c_dtype, damp)]
    if c_dtype in (torch.float16, torch.bfloat16):
        levels.append((torch.float32, damp))
    levels += [(torch.float32, _more_damping(damp, 100.0, 0.1)), (torch.float64, _more_damping(damp, 1e4, 0.5))]
    return levels


def _prune_groups(layer: OBSLayer, W: Tensor, todo: Tensor, num_prune: int, o: TrueOBSOptions,
                  progress_fn: ProgressFn) -> int:
    """True OBS on the row groups ``todo``, in place on their rows of ``W`` (the
    working copy: other rows are read only by ``largest_first``'s pre-scoring).
    Returns the number of rows redone at a higher retry level."""
    schedule = _schedule(layer, W, num_prune, o)
    rpc = layer.groups.rows_per_group
    redone = 0
    for level, (dtype, damp) in enumerate(_retry_levels(o.c_dtype, o.damp)):
        if todo.numel() == 0:
            break
        if level == 0 and dtype != torch.float64:
            C0 = layer.inverse(damp)
        else:
            C0 = damped_inverse(layer.hessian, damp, dtype=opmath_dtype(dtype), what="H + damp*I")[0]
        if level == 1:  # the rows any retry redoes are those the first one redoes
            redone = todo.numel() * rpc
        todo = _prune_level(layer, W, todo, schedule, level, dtype, C0, progress_fn)
    if todo.numel():
        raise NumericalError(
            f"{todo.numel() * rpc} rows stayed numerically unstable even in fp64 with heavy damping; "
            "the weight was left unchanged. Raise `damp`, compute H in float64, or use prune() or SparseGPT"
        )
    return redone


def _prune_level(layer: OBSLayer, W: Tensor, todo: Tensor, s: _Schedule, level: int, dtype: torch.dtype,
                 C0: Tensor, progress_fn: ProgressFn) -> Tensor:
    """One retry level: the groups ``todo`` in chunks, with factors stored as ``dtype``
    and ``C0`` the damped inverse. Writes the rows that succeeded into ``W``; returns
    the groups that failed."""
    g = layer.groups
    rpc = g.rows_per_group
    failed_all = []
    n_chunks = math.ceil(todo.numel() / s.groups_per_chunk)
    # Every full chunk runs the same kernels: record them once (CUDA), replay per
    # chunk. score_subsets checks its subsets on the host, so 'joint' and 'hybrid' run eagerly.
    inv = ScaledInverse.of(C0, opmath_dtype(dtype), s.plan.order)
    device_plan = DevicePlan.for_device(layer.W.device, dtype)  # a retry level's precision may differ

    def sweep(w_rows):
        return ChunkSweep(layer, w_rows, s.batches, s.nnz, s.scoring, s.subsets, inv, dtype, s.plan,
                          device_plan, s.panel_batches, hybrid_tau=s.hybrid_tau).run()

    def warmup():
        mini = s.batches[:2]
        mini_plan = lazy_plan(layer, mini, s.plan.p)
        mini_inv = ScaledInverse.of(C0, opmath_dtype(dtype), mini_plan.order)
        ChunkSweep(layer, W[g.rows[todo[:1]].reshape(-1)], mini, s.nnz, s.scoring, s.subsets, mini_inv, dtype,
                   mini_plan, device_plan, hybrid_tau=s.hybrid_tau).run()

    replay = GraphReplay(sweep, warmup=warmup, enabled=s.subsets is None and len(s.batches) > 1)
    for ci, group_index in enumerate(todo.split(s.groups_per_chunk)):
        if progress_fn is not None:
            progress_fn(
                f"true OBS: rows chunk {ci + 1}/{n_chunks} ({group_index.numel() * rpc} rows"
                + (f", retry level {level}" if level else "") + ")"
            )
        rows = g.rows[group_index].reshape(-1)
        Wc, failed = replay(W[rows])
        ok_rows = g.rows[group_index[~failed]].reshape(-1)
        W[ok_rows] = Wc.view(group_index.numel(), rpc, -1)[~failed].reshape(-1, layer.num_cols).to(W.dtype)
        failed_all.append(group_index[failed])
    replay.release()
    return torch.cat(failed_all) if failed_all else todo[:0]


def _prescore_order(layer: OBSLayer, W: Tensor, num_prune: int, scoring: str, damp: float) -> Tensor:
    """Scope positions by descending OBS cost under the shared C (summed over groups); 'hybrid'
    ranks them as 'independent' does."""
    g = layer.groups
    C = layer.inverse(damp)
    positions = torch.arange(g.scopes_per_group, device=W.device)
    if scoring == "joint" and count_subsets(layer.blocks_per_scope, num_prune) <= MAX_SUBSETS:
        _, cost = select_subsets(layer, W, C, positions, layer.subsets(num_prune))
    else:
        d = torch.diagonal(C)[g.cols]  # (G, E)
        w = layer.gather_weights(W, positions)  # (R, G, E)
        block_cost = (w * w / d).view(*w.shape[:2], layer.blocks_per_scope, layer.bk).sum(-1)
        cost = block_cost.sort(dim=-1).values[..., :num_prune].sum(-1)
    return torch.argsort(cost.sum(dim=0), descending=True, stable=True)


def _auto_chunk_rows(layer: OBSLayer, plan: LazyPlan, device_plan: DevicePlan, block_rows: int = 0) -> int:
    """Rows per chunk: within half the free memory, and within the device plan's
    budget (or 32 rows). CUDA, 4 GiB: with the sweep replayed as a CUDA graph,
    smaller chunks cost little time, and the peak stays near 8 GiB on a 2560×9728
    layer. CPU, 256 MiB: the same time as all rows at once, a fraction of the memory."""
    rpc = layer.groups.rows_per_group
    group_bytes = plan.bytes_per_group(device_plan.store_dtype, rpc) + 4 * block_rows * plan.order.numel()
    per_row = -(-group_bytes // rpc)
    fits = free_memory_bytes(layer.W.device) // 2 // per_row
    useful = max(32, device_plan.factor_budget_bytes // per_row)
    return int(max(1, min(fits, useful, layer.M)))


def _more_damping(damp: float, factor: float, relative_cap: float) -> float:
    """Damping ``factor`` times larger; a relative damping (< 1) stays relative, at most ``relative_cap``."""
    if damp >= 1.0:
        return damp * factor
    return max(damp, min(max(damp * factor, 1e-6), relative_cap))
