"""The compiled operators of s3sparse: one thin wrapper per op, with its fake.

Every op is registered under ``torch.ops.s3sparse`` by ``csrc/ops.cpp`` with CPU
and (when compiled) CUDA kernels; the device of the inputs picks the kernel. The
fakes below give ``torch.compile`` and ``torch.library.opcheck`` output shapes
without running anything. :mod:`s3sparse.reference` holds a pure-torch oracle of
each op with the same signature.

The rest of s3sparse calls these wrappers, never ``torch.ops`` directly.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _C  # (loading the library registers the operators)
from .errors import ArgumentError, ArgumentTypeError

__all__ = [
    "block_reduce",
    "block_scale_",
    "kth_largest",
    "score_subsets",
    "lowrank_sub",
    "lowrank_factor",
    "sparsegpt_block_",
    "packed_to_dense",
    "packed_linear",
    "sp24_linear",
]

_ops = torch.ops.s3sparse
# packed_linear's eager call (csrc/module.cpp): the same op, without torch.ops' boxing. It is bound to
# s3sparse::packed_linear: code that swaps `_ops` (the tests' host emulator) must swap this too.
# (None with a library built before it: torch.ops then.)
_packed_linear_call = getattr(_C, "_packed_linear_call", None)
_sp24_linear_call = getattr(_C, "_sp24_linear_call", None)  # (the same for s3sparse::sp24_linear)


def _ints(name: str, values: Sequence[int]) -> list[int]:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ArgumentTypeError(f"`{name}` must be a sequence of ints, got {values!r}") from exc


# ---------------------------------------------------------------- block ops
def block_reduce(
    x: Tensor,
    size: Sequence[int],
    stride: Sequence[int],
    offset: int,
    block: Sequence[int],
    reduce: str = "norm",
    p: float = 2.0,
) -> Tensor:
    """One statistic per block of a strided view, without materialising the view.

    The view is ``torch.as_strided(x, size, stride, x.storage_offset() + offset)``
    over the elements of the contiguous tensor ``x``; it is cut into blocks of
    ``block`` elements per dim (each dim of ``size`` a multiple of ``block``).

    Args:
        x: contiguous float tensor (fp16, bf16, fp32, fp64), any shape.
        size, stride, offset: the view, in elements of ``x``.
        block: block shape, one entry per view dim.
        reduce: ``'norm'`` (the ``p``-norm, ``p > 0`` or ``inf``), ``'min'``,
            ``'max'`` or ``'sum'``.
        p: norm order for ``reduce='norm'``.

    Returns:
        A tensor of the grid shape ``size[d] // block[d]``, dtype of ``x``
        (accumulated in fp32, or fp64 for fp64 inputs).
    """
    return _ops.block_reduce.default(
        x, _ints("size", size), _ints("stride", stride), int(offset), _ints("block", block), reduce, float(p)
    )


def block_scale_(
    x: Tensor,
    size: Sequence[int],
    stride: Sequence[int],
    offset: int,
    block: Sequence[int],
    scale: Tensor,
) -> None:
    """Multiply every block of a strided view of ``x`` by its factor, in place.

    ``scale`` has the grid shape (float, or bool: True keeps, False zeroes). A
    zero factor writes an exact zero, even over inf/NaN. The view must not have
    overlapping elements (``s3sparse.View`` guarantees it).
    """
    _ops.block_scale_.default(x, _ints("size", size), _ints("stride", stride), int(offset), _ints("block", block), scale)


def kth_largest(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Along the last dim: the ``k``-th largest value and a mask of the ``k`` largest.

    Exactly ``k`` entries per row are kept, ties going to the lower index; NaN
    ranks as ``-inf``. ``k = 0`` gives ``+inf`` and an all-False mask.

    Returns:
        ``(values, keep)``: ``values`` of shape ``x.shape[:-1]`` (dtype of ``x``),
        ``keep`` a bool tensor of the shape of ``x``.
    """
    return _ops.kth_largest.default(x, int(k))


# ---------------------------------------------------------------- OBS ops
def score_subsets(
    w: Tensor, c: Tensor, subsets: Tensor, c_index: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """OBS cost of pruning each candidate subset, for many items at once.

    For item ``n`` with weights ``w[n]`` (E,) and inverse-Hessian block
    ``C = c[c_index[n]]`` (E, E) (``c[n]`` without ``c_index``), the cost of
    subset ``P = subsets[s]`` is ``w_P^T (C_PP)^-1 w_P``, by a Cholesky factor of
    ``C_PP`` in the precision of ``w``. A ``C_PP`` that is not positive definite
    costs ``+inf``.

    Args:
        w: (N, E) fp32 or fp64 weights.
        c: (U, E, E) symmetric blocks, fp16/bf16/fp32/fp64 (shared blocks: U < N
            with ``c_index``; per-item blocks: U = N).
        subsets: (S, P) int64 element indices in ``[0, E)``.
        c_index: optional (N,) int64 block of each item.

    Returns:
        ``(costs, best)``: ``costs`` (N, S) in the dtype of ``w``; ``best`` (N,)
        int64, the first subset of least cost.
    """
    return _ops.score_subsets.default(w, c, c_index, subsets)


def lowrank_sub(base: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``base - a @ b.mT``, batched, accumulated in the precision of ``base``: the
    Schur-update op of True OBS.

    True OBS never stores a per-row inverse Hessian C. After a row has pruned the
    columns Q, its C is the Schur complement ``C0 - C0[:, Q] C0[Q, Q]⁻¹ C0[Q, :]``
    of Q in ``C0 = (H + λI)⁻¹``, kept in factored (left-looking) form ``C0 - U Uᵀ``:
    each batch j of pruned columns S_j appends ``U_j = C[:, S_j] L_j⁻ᵀ`` (``L_j`` the
    Cholesky factor of ``C[S_j, S_j]``). The panel a batch reads,
    ``C[S, R] = C0[S, R] - U[S] U[R]ᵀ``, is this op; so are the scope blocks that
    scoring reads and the new factor ``U_j = 0 - C[S_j, R]ᵀ (-L_j⁻ᵀ)``
    (:mod:`s3sparse.pruners.true_obs_sweep`). The factors ``U`` may be stored in
    fp16/bf16 and are read by tensor cores on CUDA.

    Args:
        base: (N, P, R) float32 (float64 when ``a`` is float64).
        a: (N, P, O) float16/bfloat16/float32/float64.
        b: (N, R, O), ``a``'s dtype; may be a strided view (last dim contiguous).

    Returns:
        (N, P, R) tensor of ``base``'s dtype.
    """
    return _ops.lowrank_sub.default(base, a, b)


def lowrank_factor(panel: Tensor, linv: Tensor, split_dtype: torch.dtype) -> Tensor:
    """``panel.mT @ linv.mT`` at fp32 accuracy: a True OBS batch's new factor.

    After a batch j prunes the columns S_j, the factors gain ``U_j = C[R, S_j] L_j⁻ᵀ``
    (``L_j`` the Cholesky factor of ``C[S_j, S_j]``), from the panel ``C[S_j, R]`` that
    :func:`lowrank_sub` formed and ``L_j⁻¹``. On CUDA with ``split_dtype`` float16 /
    bfloat16 the product runs on tensor cores from hi + lo parts of both operands
    (the panel read once, its parts written once; three products in one GEMM, only
    lo·lo dropped: 2⁻²² relative for float16, 2⁻¹⁶ for bfloat16, whose hi + lo keeps
    16 bits; with float16, panel entries below about 2⁻³ lose relative accuracy in
    lo's subnormal range, an absolute 2⁻²⁵ per entry, and ``linv`` entries past
    65504 overflow, giving inf/NaN: True OBS's panels are Jacobi-scaled, |C| ≤ 1, and
    it redoes in fp32 a group whose result is not finite); otherwise it is one GEMM
    in the operands' dtype (an fp32 GEMM follows torch's TF32 setting, as every
    fp32 matmul does).

    Args:
        panel: (N, P, R) float32 (or float64).
        linv: (N, P, P), ``panel``'s dtype.
        split_dtype: the factors' storage dtype (``c_dtype``).

    Returns:
        (N, R, P) tensor of ``panel``'s dtype.
    """
    return _ops.lowrank_factor.default(panel, linv, split_dtype)


# ---------------------------------------------------------------- SparseGPT
# Status bits of sparsegpt_block_ (csrc/sparsegpt.h) and what they mean.
SPARSEGPT_STATUS = {
    1: "a `group_rows` entry is not a row of `w` (outside [0, M))",
    2: "`scope_ptr` is not an offset table 0 = scope_ptr[0] <= ... <= scope_ptr[b] = S (the rows of `scope_cols`)",
    4: "a `scope_cols` entry is not a column of the block (outside [0, b))",
    8: "a scope listed at column i (scope_ptr[i] <= s < scope_ptr[i+1]) has an element in a column < i",
    16: "a `scope_rows` entry is not a row of its group (outside [0, group_rows.shape[1]))",
}


def sparsegpt_status_message(status: int) -> str:
    """The problems named by a nonzero ``status`` of :func:`sparsegpt_block_`."""
    parts = [text for bit, text in SPARSEGPT_STATUS.items() if status & bit]
    return "s3sparse.sparsegpt_block_: invalid index tables (status " + str(status) + "): " + "; ".join(parts)


def sparsegpt_block_(
    w: Tensor,
    pruned: Tensor,
    u: Tensor,
    scope_ptr: Tensor,
    scope_cols: Tensor,
    scope_rows: Tensor,
    group_rows: Tensor,
    nnz: int,
    block_numel: int = 1,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """One lazy block of SparseGPT's column sweep, every row group at once, in place.

    The rows of ``w`` are partitioned into row groups ``group_rows`` (R, G) (a
    group is one row for row-local patterns, rows {p, p+8} for the row-coupled
    16-column pattern) that are swept independently over the b columns of the
    block, left to right. At column ``i`` every scope ``s`` with
    ``scope_ptr[i] <= s < scope_ptr[i+1]`` is decided, in every group: its element
    ``e`` is at column ``scope_cols[s, e]`` (relative to the block, ``>= i``) and
    group row ``scope_rows[s, e]``; its blocks are runs of ``block_numel``
    elements; the ``nnz`` blocks of largest ``Σ w² / u_cc²`` (current ``w``,
    summed in element order) are kept — ties to the lower block, NaN ranking as
    -inf, as :func:`kth_largest` — and the others marked in ``pruned``. Then, for
    every row: ``q = 0 if pruned[:, i] else w[:, i]``, ``err[:, i] = (w[:, i] - q) /
    u[i, i]``, ``w[:, j] -= err[:, i] * u[i, j]`` for ``j > i``, ``w[:, i] = q``.
    Each product and difference is rounded on its own (no FMA): the result is bit
    for bit that of :func:`s3sparse.reference.sparsegpt_block_` and of the Python
    loop in :func:`s3sparse.pruners.prune_sparsegpt`.

    Args:
        w: (M, b) float32, any non-overlapping strides (e.g. ``W[:, i1:i2]``);
            left holding the pruned block.
        pruned: (M, b) bool mask, read (masks decided earlier) and completed.
        u: (b, b) float32 block ``U[i1:i2, i1:i2]`` of the upper Cholesky factor
            of ``(H + λI)⁻¹``, any strides.
        scope_ptr: (b + 1,) int64 offsets into the scope tables by start column.
        scope_cols, scope_rows: (S, E) int64, the same for every group.
        group_rows: (R, G) int64, distinct rows of ``w`` (rows in no group are
            left alone, with zero error).
        nnz: blocks kept per scope, in ``[0, E // block_numel]``.
        block_numel: elements per block (divides E).
        check: raise ``ValueError`` when the tables are invalid (one host sync).
            With ``check=False`` nothing is synchronised: look at ``status``.

    Returns:
        ``(err, status)``: ``err`` (M, b) float32, the errors for the update of the
        later columns ``W[:, i2:] -= err @ U[i1:i2, i2:]``; ``status`` () int32, 0
        or the bits of :data:`SPARSEGPT_STATUS` (then nothing was written and
        ``err`` is zero). On CUDA the tables are validated on the device.
    """
    err, status = _ops.sparsegpt_block_.default(
        w, pruned, u, scope_ptr, scope_cols, scope_rows, group_rows, int(nnz), int(block_numel)
    )
    if check:
        code = int(status)
        if code:
            raise ValueError(sparsegpt_status_message(code))
    return err, status


# ---------------------------------------------------------------- fakes
def _fake_grid(op: str, size, stride, block) -> list[int]:
    if not (len(size) == len(stride) == len(block)):
        raise ArgumentError(f"{op}: size, stride and block must have one entry per dim, got {size}, {stride}, {block}")
    grid = []
    for d, (s, b) in enumerate(zip(size, block)):
        if b < 1 or s % b != 0:
            raise ArgumentError(f"{op}: block {tuple(block)} does not tile view {tuple(size)} at dim {d}")
        grid.append(s // b)
    return grid


@torch.library.register_fake("s3sparse::block_reduce")
def _block_reduce_fake(x, size, stride, offset, block, reduce, p=2.0):
    return x.new_empty(_fake_grid("s3sparse.block_reduce", size, stride, block))


@torch.library.register_fake("s3sparse::block_scale_")
def _block_scale_fake(x, size, stride, offset, block, scale):
    grid = _fake_grid("s3sparse.block_scale_", size, stride, block)
    if list(scale.shape) != grid:
        raise ArgumentError(f"s3sparse.block_scale_: `scale` must have the block-grid shape {tuple(grid)}, got {tuple(scale.shape)}")


@torch.library.register_fake("s3sparse::kth_largest")
def _kth_largest_fake(x, k):
    return x.new_empty(x.shape[:-1]), x.new_empty(x.shape, dtype=torch.bool)


@torch.library.register_fake("s3sparse::score_subsets")
def _score_subsets_fake(w, c, c_index, subsets):
    n = w.shape[0]
    return w.new_empty((n, subsets.shape[0])), w.new_empty((n,), dtype=torch.long)


@torch.library.register_fake("s3sparse::lowrank_sub")
def _lowrank_sub_fake(base, a, b):
    torch._check(base.dim() == 3 and a.dim() == 3 and b.dim() == 3, lambda: "s3sparse.lowrank_sub: 3-D inputs")
    torch._check(a.shape[0] == base.shape[0] and b.shape[0] == base.shape[0])
    torch._check(a.shape[1] == base.shape[1] and b.shape[1] == base.shape[2] and a.shape[2] == b.shape[2])
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.register_fake("s3sparse::lowrank_factor")
def _lowrank_factor_fake(panel, linv, split_dtype):
    torch._check(panel.dim() == 3 and linv.dim() == 3, lambda: "s3sparse.lowrank_factor: 3-D inputs")
    torch._check(linv.shape[0] == panel.shape[0] and linv.shape[1] == panel.shape[1] and linv.shape[2] == panel.shape[1])
    return panel.new_empty((panel.shape[0], panel.shape[2], panel.shape[1]))


@torch.library.register_fake("s3sparse::sparsegpt_block_")
def _sparsegpt_block_fake(w, pruned, u, scope_ptr, scope_cols, scope_rows, group_rows, nnz, block_numel):
    op = "s3sparse.sparsegpt_block_"
    torch._check(w.dtype == torch.float32, lambda: f"{op}: `w` must be float32, got {w.dtype}")
    torch._check(pruned.dtype == torch.bool, lambda: f"{op}: `pruned` must be bool, got {pruned.dtype}")
    torch._check(u.dtype == torch.float32, lambda: f"{op}: `u` must be float32, got {u.dtype}")
    for name, t in (("scope_ptr", scope_ptr), ("scope_cols", scope_cols), ("scope_rows", scope_rows), ("group_rows", group_rows)):
        torch._check(t.dtype == torch.int64, lambda: f"{op}: `{name}` must be int64, got {t.dtype}")
    torch._check(w.dim() == 2, lambda: f"{op}: `w` must be 2-D (M, b), got shape {tuple(w.shape)}")
    M, b = w.shape
    torch._check(pruned.shape == w.shape, lambda: f"{op}: `pruned` must have the shape of `w` {tuple(w.shape)}")
    torch._check(u.dim() == 2 and u.shape[0] == b and u.shape[1] == b, lambda: f"{op}: `u` must be (b, b) = ({b}, {b})")
    torch._check(scope_ptr.dim() == 1 and scope_ptr.shape[0] == b + 1, lambda: f"{op}: `scope_ptr` must be (b + 1,)")
    torch._check(scope_cols.dim() == 2, lambda: f"{op}: `scope_cols` must be 2-D (S, E)")
    torch._check(scope_rows.shape == scope_cols.shape, lambda: f"{op}: `scope_rows` must have the shape of `scope_cols`")
    torch._check(group_rows.dim() == 2, lambda: f"{op}: `group_rows` must be 2-D (R, G)")
    torch._check(block_numel >= 1, lambda: f"{op}: `block_numel` must be >= 1, got {block_numel}")
    E = scope_cols.shape[1]
    torch._check(E % block_numel == 0, lambda: f"{op}: E={E} elements do not split into blocks of {block_numel}")
    torch._check(0 <= nnz <= E // block_numel, lambda: f"{op}: `nnz` must be in [0, {E // block_numel}], got {nnz}")
    return w.new_empty((M, b)), w.new_empty((), dtype=torch.int32)


# ---------------------------------------------------------------- packed weights
# The format (csrc/ops.cpp, csrc/packed.h, s3sparse.reference.packed_*): W (M, K)
# row-major covered exactly once by S scopes that each keep nnz blocks of B
# elements out of G. s3sparse.sparse.PackedWeight builds these arguments.
_PACKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def packed_to_dense(
    values: Tensor,
    meta: Tensor,
    subsets: Optional[Tensor],
    block_off: Tensor,
    elem_off: Tensor,
    scope_shape: Sequence[int],
    scope_stride: Sequence[int],
    meta_bits: int,
    out_features: int,
    in_features: int,
) -> Tensor:
    """The dense ``(out_features, in_features)`` weight of a packed one.

    Element ``e`` of in-scope block ``g`` of scope ``s`` is W's flat element
    ``sum_d idx_d(s) * scope_stride[d] + block_off[g] + elem_off[e]`` (row
    ``f // K``, column ``f % K``), ``idx(s)`` being ``s`` unravelled row-major over
    ``scope_shape``; every element no kept block reaches is zero.

    Args:
        values: (S, nnz, B) fp16/bf16/fp32/fp64, contiguous: the kept blocks,
            scopes in row-major order, a scope's blocks by increasing in-scope
            index, a block's elements row-major.
        meta: (W,) int32 words of unsigned ``meta_bits``-bit fields, ``32 //
            meta_bits`` per word, field ``i`` in word ``i // per_word`` at bit
            ``(i % per_word) * meta_bits``.
        subsets: optional (n_codes, nnz) int32: with it, one field per scope,
            the code of its kept set ``subsets[code]``; without, ``nnz`` fields
            per scope, the in-scope indices of its kept blocks.
        block_off: (G,) int64 flat offset of every in-scope block of scope 0.
        elem_off: (B,) int64 flat offset of every element within a block.
        scope_shape, scope_stride: the scope grid and its flat strides.
        meta_bits: bits per field, in [1, 32].
        out_features, in_features: M and K.

    Returns:
        (M, K) tensor of the dtype of ``values``. Invalid data (an index, code
        or offset out of range) raises ``ValueError``.
    """
    return _ops.packed_to_dense.default(
        values, meta, subsets, block_off, elem_off, _ints("scope_shape", scope_shape),
        _ints("scope_stride", scope_stride), int(meta_bits), int(out_features), int(in_features),
    )


def packed_linear(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    subsets: Optional[Tensor],
    block_off: Tensor,
    elem_off: Tensor,
    scope_shape: Sequence[int],
    scope_stride: Sequence[int],
    meta_bits: int,
    out_features: int,
    row_group: int = 0,
    bias: Optional[Tensor] = None,
    checked: bool = False,
) -> Tensor:
    """``F.linear(x, W, bias)`` for the packed ``W`` of :func:`packed_to_dense`, W never materialised on the GPU.

    Args:
        x: (..., K) of the dtype of ``values`` (any leading shape, possibly empty).
        values, meta, subsets, block_off, elem_off, scope_shape, scope_stride,
            meta_bits, out_features: the packed weight (see :func:`packed_to_dense`;
            ``in_features`` is ``x.shape[-1]``).
        row_group: ``R > 0`` promises that the scopes come in ``M / R`` groups of
            ``S R / M`` consecutive scopes, group ``q`` touching only rows
            ``[q R, (q + 1) R)`` (kernels then work a group's rows at a time; the
            CPU kernel checks the promise while decoding); 0 promises nothing.
        bias: optional (M,) of the dtype of ``x``.
        checked: the caller has had exactly these tables (``meta``, ``subsets``,
            ``block_off``, ``elem_off`` and the geometry) accepted by an earlier
            call on this device. The CUDA kernel then skips the host sync that
            turns bad data into a ``ValueError`` (it still never reads out of
            bounds: outputs computed from bad data come back NaN). A call inside
            CUDA-graph capture never syncs either. The CPU kernel always checks.

    Returns:
        (..., M) of the dtype of ``x``, accumulated in fp32 (fp64 for fp64).
        Invalid data raises ``ValueError`` (see ``checked``).

    On CUDA (fp16, bf16, fp32), with a ``row_group`` promise, on every reference
    pattern: up to 8 tokens (``x.shape[:-1]`` holding at most 8 elements; 2 for
    row groups of several rows) run the stream decode kernel, which streams the
    packed values once and never builds W; for fp16 / bf16 2:4, 4:8 and coupled
    2:4, 5 to 16 tokens run a tensor-core kernel instead (it too never builds
    W); the row-coupled block patterns (block16-rows, block8-rows4) run 1 to 8
    tokens through the row-block kernel instead; more tokens expand W into a temporary
    workspace with the expansion kernel and call cuBLAS (the crossover measured on
    an H200, docs/performance.md). Other layouts: 1 to 16 tokens a general decode
    kernel, more tokens the general scatter into a workspace and cuBLAS; fp64 or
    no promise always the latter (docs/packed.md). For large 2:4 batches,
    ``PackedLinear.use_semi_structured`` uses torch's sparse tensor cores instead, and
    ``PackedLinear.use_dense_cache`` a cached dense W (any pattern).
    """
    if type(x) is Tensor and _packed_linear_call is not None and not torch.compiler.is_compiling():
        # Eager: the typed C++ call, about 2 µs less host time than torch.ops (csrc/module.cpp);
        # NotImplemented for arguments it leaves to torch.ops (subclasses, numpy ints, modes).
        y = _packed_linear_call(x, values, meta, subsets, block_off, elem_off, scope_shape, scope_stride,
                                meta_bits, out_features, row_group, bias, checked)
        if y is not NotImplemented:
            return y
    return _ops.packed_linear.default(
        x, values, meta, subsets, block_off, elem_off, _ints("scope_shape", scope_shape),
        _ints("scope_stride", scope_stride), int(meta_bits), int(out_features), int(row_group), bias, bool(checked),
    )


def _check_packed_fake(op, values, meta, subsets, block_off, elem_off, scope_shape, scope_stride, meta_bits, out_features):
    torch._check(values.dtype in _PACKED_FLOATS, lambda: f"{op}: `values` must be float16, bfloat16, float32 or float64, got {values.dtype}")
    torch._check(values.dim() == 3, lambda: f"{op}: `values` must be 3-D (S, nnz, B), got shape {tuple(values.shape)}")
    for name, t, dtype in (("meta", meta, torch.int32), ("block_off", block_off, torch.int64), ("elem_off", elem_off, torch.int64)):
        torch._check(t.dtype == dtype, lambda: f"{op}: `{name}` must be {dtype}, got {t.dtype}")
        torch._check(t.dim() == 1, lambda: f"{op}: `{name}` must be 1-D, got shape {tuple(t.shape)}")
    S, nnz, B = values.shape
    torch._check(elem_off.shape[0] == B, lambda: f"{op}: `elem_off` must have B={B} entries, got {elem_off.shape[0]}")
    torch._check(nnz <= block_off.shape[0], lambda: f"{op}: nnz={nnz} exceeds G={block_off.shape[0]} in-scope blocks")
    torch._check(len(scope_shape) == len(scope_stride), lambda: f"{op}: `scope_stride` must have one entry per dim of `scope_shape`")
    torch._check(len(scope_shape) <= 8, lambda: f"{op}: `scope_shape` may have at most 8 dims")
    torch._check(math.prod(scope_shape) == S, lambda: f"{op}: `values` holds S={S} scopes but `scope_shape` {list(scope_shape)} has {math.prod(scope_shape)}")
    torch._check(1 <= meta_bits <= 32, lambda: f"{op}: `meta_bits` must be in [1, 32], got {meta_bits}")
    torch._check(out_features >= 0, lambda: f"{op}: `out_features` must be >= 0, got {out_features}")
    per_word = 32 // meta_bits
    if subsets is not None:
        torch._check(subsets.dtype == torch.int32, lambda: f"{op}: `subsets` must be int32, got {subsets.dtype}")
        torch._check(subsets.dim() == 2 and subsets.shape[1] == nnz and subsets.shape[0] >= 1,
                     lambda: f"{op}: `subsets` must be (n_codes >= 1, nnz={nnz}), got shape {tuple(subsets.shape)}")
        fields = S
    else:
        fields = S * nnz
    words = (fields + per_word - 1) // per_word
    torch._check(meta.shape[0] >= words, lambda: f"{op}: `meta` must hold at least {words} words, got {meta.shape[0]}")


@torch.library.register_fake("s3sparse::packed_to_dense")
def _packed_to_dense_fake(values, meta, subsets, block_off, elem_off, scope_shape, scope_stride, meta_bits, out_features, in_features):
    op = "s3sparse.packed_to_dense"
    _check_packed_fake(op, values, meta, subsets, block_off, elem_off, scope_shape, scope_stride, meta_bits, out_features)
    torch._check(in_features >= 0, lambda: f"{op}: `in_features` must be >= 0, got {in_features}")
    return values.new_empty((out_features, in_features))


@torch.library.register_fake("s3sparse::packed_linear")
def _packed_linear_fake(x, values, meta, subsets, block_off, elem_off, scope_shape, scope_stride, meta_bits, out_features, row_group, bias, checked=False):
    op = "s3sparse.packed_linear"
    _check_packed_fake(op, values, meta, subsets, block_off, elem_off, scope_shape, scope_stride, meta_bits, out_features)
    torch._check(x.dtype == values.dtype, lambda: f"{op}: `x` must have the dtype of `values` ({values.dtype}), got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"{op}: `x` must be (..., in_features), got a scalar")
    torch._check(row_group >= 0, lambda: f"{op}: `row_group` must be >= 0, got {row_group}")
    if bias is not None:
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: `bias` must have the dtype of `x` ({x.dtype}), got {bias.dtype}")
        torch._check(bias.dim() == 1 and bias.shape[0] == out_features,
                     lambda: f"{op}: `bias` must be (out_features,) = ({out_features},), got shape {tuple(bias.shape)}")
    return x.new_empty((*x.shape[:-1], out_features))


# ---------------------------------------------------------------- 2:4 on the sparse tensor cores
def sp24_linear(
    x: Tensor, values: Tensor, sp_meta: Tensor, out_features: int, bias: Optional[Tensor] = None, checked: bool = False,
    column_order: int = 0,
) -> Tensor:
    """``F.linear(x, W, bias)`` for a 2:4 ``W`` on the GPU's sparse tensor cores (``mma.sp``), W never built.

    Args:
        x: (..., K) float16 or bfloat16, K a positive multiple of 64.
        values: W's kept values, two a group of 4 columns, each row's in column order: the
            ``values`` of a 2:4 :class:`~s3sparse.sparse.PackedWeight` as stored (M K / 2 elements,
            contiguous, the dtype of ``x``).
        sp_meta: (M/16, K/64, 32) int32, the kept columns in the order the instruction reads them:
            built once a weight by :func:`s3sparse.sparse.sp24.sp24_meta_words`.
        out_features: M, a positive multiple of 16.
        bias: optional (M,) of the dtype of ``x``.
        checked: the caller vouches for ``sp_meta`` (built by ``sp24_meta_words`` and unchanged since):
            the CUDA kernel then skips its check of every metadata word and keeps more loads in flight.
        column_order: 0 for 2:4; 1 for 4:8 (pairs) and 2 for coupled 2:4, whose weights are 2:4 in a fixed
            column permutation (the even / odd columns of each 8; the 4-column groups 0, 2, 1, 3 of each
            16) with their values stored a kept pair at a time (``sp24_meta_words(packed, order)``).

    Returns:
        (..., M) of the dtype of ``x``: products summed in fp32, the bias added, rounded once.

    The CUDA kernel streams the values once (1.3-1.9x dense ``F.linear`` at 1-16 tokens on an H100,
    docs/performance.md); from 17 tokens a block-tiled kernel stages x in shared memory for 8 row tiles
    (``csrc/cuda/sp24_tiled.cuh``), one launch for all tokens. :class:`~s3sparse.sparse.PackedLinear` takes
    the op for its layers at decode (:meth:`~s3sparse.sparse.PackedLinear.use_sp24` sets how many tokens). Unless ``checked``, it checks ``sp_meta`` on the device without a host sync: a
    word that is not valid metadata makes its 16-row tile's outputs NaN. It never reads out of bounds
    (the metadata only picks columns inside a group). The CPU kernel decodes W, always checks
    ``sp_meta`` (``ValueError``) and multiplies.
    """
    if type(x) is Tensor and _sp24_linear_call is not None and not torch.compiler.is_compiling():
        y = _sp24_linear_call(x, values, sp_meta, out_features, bias, checked, column_order)  # (eager: typed C++)
        if y is not NotImplemented:
            return y
    return _ops.sp24_linear.default(x, values, sp_meta, int(out_features), bias, bool(checked), int(column_order))


@torch.library.register_fake("s3sparse::sp24_linear")
def _sp24_linear_fake(x, values, sp_meta, out_features, bias, checked=False, column_order=0):
    op = "s3sparse.sp24_linear"
    torch._check(column_order in (0, 1, 2), lambda: f"{op}: `column_order` must be 0, 1 or 2, got {column_order}")
    torch._check(x.dtype in (torch.float16, torch.bfloat16), lambda: f"{op}: `x` must be float16 or bfloat16, got {x.dtype}")
    torch._check(values.dtype == x.dtype, lambda: f"{op}: `values` must have the dtype of `x` ({x.dtype}), got {values.dtype}")
    torch._check(x.dim() >= 1, lambda: f"{op}: `x` must be (..., in_features), got a scalar")
    K = x.shape[-1]
    torch._check(out_features > 0 and out_features % 16 == 0,
                 lambda: f"{op}: `out_features` must be a positive multiple of 16, got {out_features}")
    torch._check(K % 64 == 0, lambda: f"{op}: in_features must be a positive multiple of 64, got {K}")
    torch._check(sp_meta.dtype == torch.int32, lambda: f"{op}: `sp_meta` must be int32, got {sp_meta.dtype}")
    torch._check(sp_meta.dim() == 3 and sp_meta.shape[0] == out_features // 16 and sp_meta.shape[1] == K // 64
                 and sp_meta.shape[2] == 32,
                 lambda: f"{op}: `sp_meta` must be ({out_features // 16}, {K // 64}, 32), got {tuple(sp_meta.shape)}")
    torch._check(values.numel() == out_features * K // 2,
                 lambda: f"{op}: `values` must hold {out_features * K // 2} elements, got {values.numel()}")
    if bias is not None:
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: `bias` must have the dtype of `x` ({x.dtype}), got {bias.dtype}")
        torch._check(bias.dim() == 1 and bias.shape[0] == out_features,
                     lambda: f"{op}: `bias` must be (out_features,) = ({out_features},), got shape {tuple(bias.shape)}")
    return x.new_empty((*x.shape[:-1], out_features))

