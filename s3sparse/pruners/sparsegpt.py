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

Each lazy block runs in one call of the ``sparsegpt_block_`` kernel (every row
group swept in parallel, the block's factor on-chip) when the pattern is
regular across row groups and every scope starting in the block ends inside it
— all four reference patterns at the default block of 128. Other blocks (scopes
reaching past the block, irregular patterns) run the per-column Python loop,
which scores a scope's later columns with the updates they are still owed. Both
round every operation alike: the result does not depend on which path ran.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

from .. import ops
from ..checks import check_callable, check_damp, check_int
from ..errors import NumericalError
from .hessian import check_hessian, damped_inverse
from .layout import ScopeLayout, normalize_nnz, restrict_rows, row_components, row_groups, scope_layout
from .method import MethodOptions, ProgressFn, PruningMethod
from .refine import refining
from .sharding import AllRanks, RowShard, check_process_group

__all__ = ["SparseGPT", "SparseGPTOptions", "prune_sparsegpt"]

# Tests and benchmarks set this False to run every lazy block through the Python loop.
_USE_BLOCK_KERNEL = True
# Largest (rows per group) x (lazy-block width) handed to the kernel: its CUDA
# version keeps a group's rows of the block in shared memory.
_MAX_GROUP_ELEMS = 8192


def _kernel_plan(layout: ScopeLayout, K: int, blocksize: int, device) -> tuple[Optional[Tensor], list]:
    """``(group_rows, tables)``: per lazy block the ``sparsegpt_block_`` tables
    ``(scope_ptr, scope_cols, scope_rows)`` on ``device``, or None where the block
    needs the Python loop. Built once on the host; blocks of a periodic pattern
    share one set of device tensors."""
    num_blocks = (K + blocksize - 1) // blocksize
    python_only = (None, [None] * num_blocks)
    if not _USE_BLOCK_KERNEL or layout.num_scopes == 0:
        return python_only
    try:
        groups = row_groups(layout)
    except ValueError:  # not regular across row groups: the Python loop handles any pattern
        return python_only
    if groups.rows_per_group * min(blocksize, K) > _MAX_GROUP_ELEMS:
        return python_only
    cols = groups.cols.cpu()  # (G, E): the g-th scope of every group
    local = groups.local_rows.cpu()
    first, last = cols.amin(dim=1), cols.amax(dim=1)
    order = torch.argsort(first, stable=True)
    cols, local, first, last = cols[order], local[order], first[order], last[order]
    shared: dict = {}
    tables: list = []
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        s0 = int(torch.searchsorted(first, i1))
        s1 = int(torch.searchsorted(first, i2))
        if s1 > s0 and int(last[s0:s1].max()) >= i2:
            tables.append(None)  # a scope reaches past the block
            continue
        c = cols[s0:s1] - i1
        r = local[s0:s1]
        ptr = torch.zeros(i2 - i1 + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(torch.bincount(first[s0:s1] - i1, minlength=i2 - i1), 0)
        key = (i2 - i1, c.numpy().tobytes(), r.numpy().tobytes())
        if key not in shared:
            shared[key] = (ptr.to(device), c.contiguous().to(device), r.contiguous().to(device))
        tables.append(shared[key])
    return groups.rows.contiguous(), tables


class _PythonSweep:
    """The per-column loop over one lazy block, for any pattern (host-side schedule built once)."""

    def __init__(self, layout: ScopeLayout, K: int):
        rows, cols = layout.rows, layout.cols  # (S, blocks, elems)
        first_col = cols.reshape(cols.shape[0], -1).amin(dim=1)
        last_col = cols.reshape(cols.shape[0], -1).amax(dim=1)
        order = torch.argsort(first_col, stable=True)
        self.rows, self.cols = rows[order], cols[order]
        first_col, last_col = first_col[order], last_col[order]
        # Which scopes start at each column, and how far right the farthest of them reaches.
        starts = torch.zeros(K + 1, dtype=torch.long)
        starts[1:] = torch.cumsum(torch.bincount(first_col.cpu(), minlength=K), 0)
        self.starts = starts.tolist()
        self.reach = torch.full((K,), -1, dtype=torch.long).scatter_reduce(
            0, first_col.cpu(), last_col.cpu(), reduce="amax"
        ).tolist()

    def block(self, W: Tensor, U: Tensor, d2: Tensor, pruned: Tensor, i1: int, i2: int, nnz: int) -> Tensor:
        """Sweep columns [i1, i2): W[:, i1:i2] becomes the pruned block; returns its errors."""
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            s0, s1 = self.starts[col], self.starts[col + 1]
            if s1 > s0:
                r, c = self.rows[s0:s1], self.cols[s0:s1]
                vals = W1[r, (c - i1).clamp(max=i2 - i1 - 1)]
                if self.reach[col] >= i2:
                    # Scope reaches past this lazy block: score its later columns
                    # with the updates they are still owed from this block.
                    outside = c >= i2
                    ro, co = r[outside], c[outside]
                    owed = (Err1[ro, :i] * U[i1:col, co].T).sum(dim=1) if i else 0.0
                    vals[outside] = W[ro, co] - owed
                terms = vals * vals / d2[c]
                scores = terms[..., 0]  # summed in element order, as the kernel does
                for e in range(1, terms.shape[-1]):
                    scores = scores + terms[..., e]
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
        return Err1


@torch.no_grad()
def _sweep(layout: ScopeLayout, W: Tensor, U: Tensor, nnz: int, blocksize: int,
           progress_fn: Optional[Callable[[str], None]]) -> None:
    """SparseGPT over the rows of ``layout`` (its param's shape), in place on ``W`` (fp32, M × K)."""
    M, K = W.shape
    if M == 0:  # a rank with no rows to prune (more ranks than row sets)
        return
    device = W.device
    d2 = torch.diagonal(U) ** 2
    group_rows, tables = _kernel_plan(layout, K, blocksize, device)
    python_sweep = None  # built on first use
    statuses = []
    pruned = torch.zeros(M, K, dtype=torch.bool, device=device)
    num_blocks = len(tables)
    for bi, i1 in enumerate(range(0, K, blocksize)):
        i2 = min(i1 + blocksize, K)
        if progress_fn is not None:
            progress_fn(f"SparseGPT: columns {i1}-{i2 - 1} of {K} (block {bi + 1}/{num_blocks})")
        if tables[bi] is not None:
            scope_ptr, scope_cols, scope_rows = tables[bi]
            Err1, status = ops.sparsegpt_block_(
                W[:, i1:i2], pruned[:, i1:i2], U[i1:i2, i1:i2], scope_ptr, scope_cols, scope_rows,
                group_rows, nnz, layout.block_numel, check=False,
            )
            statuses.append(status)
        else:
            if python_sweep is None:
                python_sweep = _PythonSweep(layout, K)
            Err1 = python_sweep.block(W, U, d2, pruned, i1, i2, nnz)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if statuses:
        codes = torch.stack(statuses).cpu()
        if bool(codes.any()):  # the tables are built above: a bug, not a user error
            bad = 0
            for code in codes.tolist():
                bad |= code
            raise RuntimeError("prune_sparsegpt: internal error, " + ops.sparsegpt_status_message(bad))
    if not torch.isfinite(W).all():
        raise NumericalError(
            "SparseGPT produced non-finite weights (an overflow: weights or H too large for float32, or H too "
            "ill-conditioned); the weight was left unchanged. Raise `damp`, or prune this layer with prune_obd"
        )


@dataclasses.dataclass(frozen=True)
class SparseGPTOptions(MethodOptions):
    """Options of SparseGPT, checked when built.

    Attributes:
        blocksize: lazy-batch width in columns (128 in the paper).
        damp: damping, relative to mean(diag H) when < 1 (0.01 in the paper).
        refine: sweeps of exact swap refinement of the mask after pruning
            (:func:`~s3sparse.pruners.refine_mask`, with its own damping, 1e-4: its
            costs are the exact output error's); 0: off. From SparseGPT, 2 sweeps
            reach True OBS + 2 sweeps within 0.6 % on the MiniLM layers (docs/refine.md).
    """

    shards_rows: ClassVar[bool] = True

    blocksize: int = 128
    damp: float = 0.01
    refine: int = 0

    def __post_init__(self):
        self._set("blocksize", check_int(self.blocksize, "blocksize", minimum=1, what="columns per lazy block"))
        self._set("damp", check_damp(self.damp))
        self._set("refine", check_int(self.refine, "refine", minimum=0, what="sweeps of mask refinement (0: off)"))


class SparseGPT(PruningMethod):
    """SparseGPT over any ScopeSpec (see the module docstring); rows can be split over ranks."""

    Options = SparseGPTOptions

    @torch.no_grad()
    def prune(self, scope, hessian: Tensor, nnz: int, progress_fn: ProgressFn = None, process_group=None) -> None:
        """Prune the weight behind ``scope`` to ``nnz`` blocks per scope, in place.

        Args:
            scope: a ScopeSpec whose blocks lie on one 2-D weight (M, K).
            hessian: (K, K) layer Hessian ``XᵀX/N``, on the weight's device.
            nnz: blocks kept per scope.
            progress_fn: optional ``callable(str)`` told about each lazy block.
            process_group: a torch.distributed ProcessGroup to split the rows over
                (every rank of it calls this with the same arguments and the same H,
                e.g. all-reduced); each rank sweeps a contiguous run of whole row
                sets (rows sharing a scope stay together) and the pruned rows are
                gathered, so every rank ends with the whole pruned weight — the one
                a single process computes, up to round-off. ``None``: this process
                prunes every row.

        The weight is written once, at the end; on any error it is left unchanged
        (on every rank: with a process group, an error on one rank is raised on all).
        """
        group = check_process_group(process_group)
        with refining(scope, hessian, nnz, self.options.refine, progress_fn=progress_fn, process_group=group):  # own damp
            self._prune_rows(scope, hessian, nnz, progress_fn, group)

    def _prune_rows(self, scope, hessian: Tensor, nnz: int, progress_fn: ProgressFn, group) -> None:
        """SparseGPT on every row (this rank's share of them with a process group), written once at the end."""
        blocksize, damp = self.options.blocksize, self.options.damp
        with AllRanks(group, "pruning its rows with SparseGPT"):
            layout = scope_layout(scope)
            param = layout.param
            M, K = param.shape
            check_hessian(hessian, K, like=param)
            nnz = normalize_nnz(nnz, layout.blocks_per_scope)
            check_callable(progress_fn, "progress_fn")

            W = param.detach().to(torch.float32, copy=True)
            U, _ = damped_inverse(hessian, damp, upper_factor=True, what="SparseGPT's H + damp*I")
            if group is None:
                shard = None
                _sweep(layout, W, U, nnz, blocksize, progress_fn)
            else:
                shard = RowShard.of_groups(row_components(layout), group)
                mine = W[shard.rows]
                _sweep(restrict_rows(layout, shard.rows, mine), mine, U, nnz, blocksize, progress_fn)
        if shard is not None:
            shard.gather(W, mine)
        param.data.copy_(W.to(param.dtype))


def prune_sparsegpt(
    scope,
    hessian: Tensor,
    nnz: int,
    blocksize: int = SparseGPTOptions.blocksize,
    damp: float = SparseGPTOptions.damp,
    progress_fn: Optional[Callable[[str], None]] = None,
    process_group=None,
    refine: int = SparseGPTOptions.refine,
) -> None:
    """Prune the weight behind ``scope`` to ``nnz`` blocks per scope with SparseGPT, in place.

    ``SparseGPT(blocksize=blocksize, damp=damp, refine=refine).prune(scope, hessian, nnz,
    progress_fn, process_group)``: see :class:`SparseGPTOptions` for the options and
    :meth:`SparseGPT.prune` for the rest.
    """
    SparseGPT(blocksize=blocksize, damp=damp, refine=refine).prune(scope, hessian, nnz, progress_fn, process_group)
