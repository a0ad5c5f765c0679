"""Pure-torch oracles of every s3sparse operator.

Each function here computes what the compiled kernel of the same name computes,
written for clarity rather than speed (float64 math, Python loops where that is
plainest). Tests compare the CPU and CUDA kernels against these on random inputs.
They take and return the same arguments as the ops in :mod:`s3sparse.ops`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .dtypes import opmath_dtype

__all__ = [
    "block_reduce",
    "block_scale_",
    "kth_largest",
    "score_subsets",
    "lowrank_sub",
    "lowrank_factor",
    "sparsegpt_block_",
    "sparsegpt_block_status",
    "interleaved_block_view",
    "packed_fields",
    "packed_to_dense",
    "packed_linear",
    "sp24_columns",
    "sp24_stored",
    "sp24_to_dense",
    "sp24_linear",
]


def _strided(x: Tensor, size: Sequence[int], stride: Sequence[int], offset: int) -> Tensor:
    return torch.as_strided(x, tuple(size), tuple(stride), x.storage_offset() + offset)


def interleaved_block_view(v: Tensor, block: Sequence[int]) -> Tensor:
    """``v`` of shape ``(G0*b0, G1*b1, ...)`` as ``(G0, b0, G1, b1, ...)`` (may copy)."""
    shape = []
    for s, b in zip(v.shape, block):
        shape += [s // b, b]
    return v.reshape(shape)


def block_reduce(
    x: Tensor,
    size: Sequence[int],
    stride: Sequence[int],
    offset: int,
    block: Sequence[int],
    reduce: str,
    p: float = 2.0,
) -> Tensor:
    v = _strided(x, size, stride, offset).to(torch.float64)
    bv = interleaved_block_view(v, block)
    dims = tuple(range(1, 2 * len(size), 2))
    grid = tuple(s // b for s, b in zip(size, block))
    if bv.numel() == 0:
        return torch.empty(grid, dtype=x.dtype, device=x.device)
    if reduce == "norm":
        if math.isinf(p):
            out = bv.abs().amax(dim=dims)
        else:
            out = bv.abs().pow(p).sum(dim=dims).pow(1.0 / p)
    elif reduce == "min":
        out = bv.amin(dim=dims)
    elif reduce == "max":
        out = bv.amax(dim=dims)
    elif reduce == "sum":
        out = bv.sum(dim=dims)
    else:
        raise ValueError(f"reduce must be 'norm', 'min', 'max' or 'sum', got {reduce!r}")
    return out.reshape(grid).to(x.dtype)


def block_scale_(
    x: Tensor,
    size: Sequence[int],
    stride: Sequence[int],
    offset: int,
    block: Sequence[int],
    scale: Tensor,
) -> None:
    v = _strided(x, size, stride, offset)
    s = scale.to(opmath_dtype(x.dtype))
    for d, b in enumerate(block):
        s = s.repeat_interleave(b, dim=d)
    out = torch.where(s == 0, torch.zeros((), dtype=s.dtype, device=s.device), v.to(s.dtype) * s)
    v.copy_(out.to(x.dtype))


def kth_largest(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    n = x.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    x64 = x.to(torch.float64)
    # NaN ranks as -inf (ties with a real -inf go to the lower index); +-inf stay
    # infinite (nan_to_num alone would also clamp them to +-max finite).
    key = torch.where(torch.isnan(x64), torch.full_like(x64, -math.inf), x64)
    # Stable sort: among equal values the lower index comes first.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    keep.scatter_(-1, order[..., :k], True)
    if k == 0:
        values = torch.full(x.shape[:-1], math.inf, dtype=x.dtype, device=x.device)
    else:
        values = key.gather(-1, order[..., k - 1 : k]).squeeze(-1).to(x.dtype)
    return values, keep


def score_subsets(
    w: Tensor, c: Tensor, c_index: Optional[Tensor], subsets: Tensor
) -> tuple[Tensor, Tensor]:
    N = w.shape[0]
    S = subsets.shape[0]
    costs = torch.empty(N, S, dtype=torch.float64)
    w64 = w.double().cpu()
    c64 = c.double().cpu()
    idx = c_index.cpu() if c_index is not None else torch.arange(N)
    sub = subsets.cpu()
    for n in range(N):
        C = c64[idx[n]]
        for s in range(S):
            P = sub[s]
            if P.numel() == 0:
                costs[n, s] = 0.0
                continue
            L, info = torch.linalg.cholesky_ex(C[P][:, P])
            if info.item() != 0:
                costs[n, s] = math.inf
                continue
            z = torch.linalg.solve_triangular(L, w64[n, P].unsqueeze(-1), upper=False)
            costs[n, s] = (z * z).sum()
    if S == 0:
        best = torch.zeros(N, dtype=torch.long)
    else:
        # The first subset of least cost; NaN never wins, and a row of only
        # inf / NaN costs gives 0 (posinf=inf keeps inf and NaN tied).
        best = torch.nan_to_num(costs, nan=math.inf, posinf=math.inf).argmin(dim=1)
    return costs.to(device=w.device, dtype=w.dtype), best.to(w.device)


def lowrank_sub(base: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``base - a @ b.mT`` in float64: base (N, P, R), a (N, P, O), b (N, R, O).

    The Schur-update op of True OBS (see :func:`s3sparse.ops.lowrank_sub`): with
    ``U`` the factors of the columns ``Q`` pruned so far (``U Uᵀ = C0[:, Q]
    C0[Q, Q]⁻¹ C0[Q, :]``), ``C0[S, R] - U[S] U[R]ᵀ`` is the Schur complement of
    ``Q`` in ``C0`` on the rows S and columns R, in factored (left-looking) form.
    """
    out = base.double() - a.double() @ b.double().transpose(1, 2)  # (N, P, R)
    return out.to(base.dtype)


def lowrank_factor(panel: Tensor, linv: Tensor, split_dtype: torch.dtype) -> Tensor:
    """``panel.mT @ linv.mT`` in float64: panel (N, P, R), linv (N, P, P) → (N, R, P).

    A True OBS batch's new factor ``U_j = C[R, S_j] L_j⁻ᵀ`` (see
    :func:`s3sparse.ops.lowrank_factor`; ``split_dtype`` only says how a kernel may
    reach fp32 accuracy, not what it computes).
    """
    out = panel.double().transpose(1, 2) @ linv.double().transpose(1, 2)  # (N, R, P)
    return out.to(panel.dtype)


def sparsegpt_block_status(M: int, b: int, scope_ptr: Tensor, scope_cols: Tensor, scope_rows: Tensor, group_rows: Tensor) -> int:
    """The status bits of :func:`sparsegpt_block_` for these tables (0: valid)."""
    ptr = scope_ptr.cpu().tolist()
    cols, lrows, grows = scope_cols.cpu(), scope_rows.cpu(), group_rows.cpu()
    S, rpg = cols.shape[0], grows.shape[1]
    bad = 0
    if grows.numel() and bool(((grows < 0) | (grows >= M)).any()):
        bad |= 1
    if ptr[0] != 0 or ptr[b] != S:
        bad |= 2
    for i in range(b):
        p0, p1 = ptr[i], ptr[i + 1]
        if not 0 <= p0 <= p1 <= S:
            bad |= 2
            continue
        c, r = cols[p0:p1], lrows[p0:p1]
        if bool(((c < 0) | (c >= b)).any()):
            bad |= 4
        if bool(((c >= 0) & (c < i)).any()):
            bad |= 8
        if bool(((r < 0) | (r >= rpg)).any()):
            bad |= 16
    return bad


def sparsegpt_block_(
    w: Tensor,
    pruned: Tensor,
    u: Tensor,
    scope_ptr: Tensor,
    scope_cols: Tensor,
    scope_rows: Tensor,
    group_rows: Tensor,
    nnz: int,
    block_numel: int,
) -> tuple[Tensor, Tensor]:
    """SparseGPT over one lazy block, every row group at once (float32, the kernels' operation order)."""
    M, b = w.shape
    err = torch.zeros(M, b, dtype=torch.float32, device=w.device)
    status = sparsegpt_block_status(M, b, scope_ptr, scope_cols, scope_rows, group_rows)
    if status:
        return err, torch.tensor(status, dtype=torch.int32, device=w.device)
    ok = torch.zeros((), dtype=torch.int32, device=w.device)
    R, rpg = group_rows.shape
    if R == 0 or rpg == 0 or b == 0:
        return err, ok
    ptr = scope_ptr.cpu().tolist()
    cols, lrows = scope_cols.cpu().tolist(), scope_rows.cpu().tolist()
    E = scope_cols.shape[1]
    nb = E // block_numel
    grows = group_rows.to(w.device)
    W = w[grows].to(torch.float32)  # (R, rpg, b) copies
    P = pruned[grows].clone()
    Er = torch.zeros_like(W)
    d = torch.diagonal(u).to(torch.float32)
    d2 = d * d
    for i in range(b):
        for s in range(ptr[i], ptr[i + 1]):
            c, lr = cols[s], lrows[s]
            keys = []
            for k in range(nb):
                acc = torch.zeros(R, dtype=torch.float32, device=w.device)
                for e in range(k * block_numel, (k + 1) * block_numel):
                    v = W[:, lr[e], c[e]]
                    acc = acc + v * v / d2[c[e]]
                keys.append(acc)
            if nb:
                _, keep = kth_largest(torch.stack(keys, dim=-1), nnz)
                for k in range(nb):
                    for e in range(k * block_numel, (k + 1) * block_numel):
                        P[:, lr[e], c[e]] = ~keep[:, k]
        wi = W[:, :, i].clone()
        q = wi.masked_fill(P[:, :, i], 0.0)
        e = (wi - q) / u[i, i]
        Er[:, :, i] = e
        W[:, :, i + 1 :] -= e.unsqueeze(-1) * u[i, i + 1 :]
        W[:, :, i] = q
    w[grows] = W.to(w.dtype)
    pruned[grows] = P
    err[grows] = Er
    return err, ok


# ---------------------------------------------------------------- packed weights
# The packed format (s3sparse.sparse.PackedWeight; csrc/ops.cpp documents it too).
# A 2-D weight W (out_features M x in_features K, row-major) is covered exactly
# once by the elements of S scopes; scope s keeps nnz blocks of B elements.
#   values (S, nnz, B): the kept blocks, scopes in row-major order of the scope
#       grid, a scope's kept blocks by increasing in-scope index, a block's
#       elements in row-major order of the block shape.
#   meta (W,) int32: unsigned fields of meta_bits bits, 32 // meta_bits per word,
#       field i in word i // per_word at bit (i % per_word) * meta_bits.
#       With subsets (n_codes, nnz) int32: one field per scope, the code c of
#       its kept set: kept blocks subsets[c] (increasing). Without: nnz fields
#       per scope, field s*nnz + j = the in-scope index of kept block j.
#   Flat offset of element e of in-scope block g of scope s (row f // K, col f % K):
#       f = sum_d idx_d(s) * scope_stride[d] + block_off[g] + elem_off[e]
#       idx(s) = s unravelled (row-major) over scope_shape (the scope grid).
def packed_fields(meta: Tensor, meta_bits: int, count: int) -> Tensor:
    """The first ``count`` ``meta_bits``-bit fields of ``meta`` as int64 (count,)."""
    per_word = 32 // meta_bits
    i = torch.arange(count, device=meta.device)
    words = meta.to(torch.int64)[i // per_word] & 0xFFFFFFFF
    return (words >> ((i % per_word) * meta_bits)) & ((1 << meta_bits) - 1)


def _packed_flat_offsets(
    S: int, nnz: int, meta: Tensor, subsets: Optional[Tensor], block_off: Tensor, elem_off: Tensor,
    scope_shape: Sequence[int], scope_stride: Sequence[int], meta_bits: int,
) -> Tensor:
    """(S, nnz, B) int64 flat offsets into W of every packed value."""
    if subsets is not None:
        kept = subsets.to(torch.int64)[packed_fields(meta, meta_bits, S)]  # (S, nnz)
    else:
        kept = packed_fields(meta, meta_bits, S * nnz).view(S, nnz)
    base = torch.zeros(S, dtype=torch.int64, device=meta.device)
    rest = torch.arange(S, dtype=torch.int64, device=meta.device)
    for size, stride in zip(reversed(list(scope_shape)), reversed(list(scope_stride))):
        base += (rest % size) * stride
        rest = rest // size
    return base[:, None, None] + block_off.to(torch.int64)[kept][:, :, None] + elem_off.to(torch.int64)[None, None, :]


def packed_to_dense(
    values: Tensor, meta: Tensor, subsets: Optional[Tensor], block_off: Tensor, elem_off: Tensor,
    scope_shape: Sequence[int], scope_stride: Sequence[int], meta_bits: int, out_features: int, in_features: int,
) -> Tensor:
    """The dense ``(out_features, in_features)`` weight of a packed one (dtype of ``values``)."""
    S, nnz, _ = values.shape
    flat = _packed_flat_offsets(S, nnz, meta, subsets, block_off, elem_off, scope_shape, scope_stride, meta_bits)
    dense = torch.zeros(out_features * in_features, dtype=values.dtype, device=values.device)
    dense[flat.reshape(-1)] = values.reshape(-1)
    return dense.view(out_features, in_features)


def packed_linear(
    x: Tensor, values: Tensor, meta: Tensor, subsets: Optional[Tensor], block_off: Tensor, elem_off: Tensor,
    scope_shape: Sequence[int], scope_stride: Sequence[int], meta_bits: int, out_features: int,
    row_group: int, bias: Optional[Tensor], checked: bool = False,
) -> Tensor:
    """``F.linear(x, W, bias)`` for the packed ``W`` (fp32 math, fp64 for fp64), dtype of ``x``.

    ``row_group`` is a routing promise and ``checked`` a licence to skip a host
    sync, both for the kernels (ignored here): see csrc/ops.cpp.
    """
    W = packed_to_dense(values, meta, subsets, block_off, elem_off, scope_shape, scope_stride, meta_bits,
                        out_features, x.shape[-1])
    acc = opmath_dtype(x.dtype)
    b = None if bias is None else bias.to(acc)
    return torch.nn.functional.linear(x.to(acc), W.to(acc), b).to(x.dtype)


def sp24_columns(in_features: int, column_order: int, device=None) -> Tensor:
    """(K,) int64: the original column of each virtual column (csrc/sp24.h): identity for 2:4 (order 0);
    in each 16-column chunk, slot k (4 virtual columns) is, for 4:8 (1), the even (k % 2 = 0) or odd
    columns of half k // 2, and for coupled 2:4 (2), the 4-column group [0, 2, 1, 3][k]."""
    v = torch.arange(in_features, device=device)
    chunk, k, p = v - v % 16, (v % 16) // 4, v % 4
    if column_order == 1:
        return chunk + 8 * (k // 2) + 2 * p + k % 2
    if column_order == 2:
        return chunk + 4 * ((k % 2) * 2 + k // 2) + p
    return v


def sp24_stored(half_features: int, column_order: int, device=None) -> Tensor:
    """(K/2,) int64: where a row's j-th value in virtual order is stored (orders 1, 2: a kept pair at a
    time, a0 a1 b0 b1, taken as a0 b0 a1 b1)."""
    j = torch.arange(half_features, device=device)
    if column_order == 0:
        return j
    r = j % 4
    return j - r + (r % 2) * 2 + r // 2


def sp24_to_dense(values: Tensor, sp_meta: Tensor, out_features: int, in_features: int, column_order: int = 0) -> Tensor:
    """W (M, K) from a 2:4 weight as the sparse tensor cores read it (the layout of csrc/sp24.h).

    values: M K / 2 kept values, each row's in column order (two a group of 4 columns; orders 1 and 2:
    see :func:`sp24_columns`, :func:`sp24_stored`); sp_meta (M/16, K/64, 32) int32: the word of tile T,
    iteration i, lane 4 g + 2 s + h holds in nibble j (row 16 T + g) and nibble 4 + j (row
    16 T + g + 8) the columns p0 | p1 << 2 (p0 < p1) of the two kept values of virtual column group
    16 i + 4 (q % 4) + 2 s + q // 4, q = 4 h + j.
    """
    M, K = out_features, in_features
    tiles, iters = M // 16, K // 64
    dev = values.device
    word = sp_meta.to(torch.int64).view(tiles, iters, 8, 2, 2) & 0xFFFFFFFF  # (T, i, g, s, h)
    shift = 16 * torch.arange(2, device=dev)[:, None] + 4 * torch.arange(4, device=dev)  # (half, j)
    nib = (word[..., None, None] >> shift) & 0xF  # (T, i, g, s, h, half, j)
    nib = nib.permute(0, 5, 2, 1, 3, 4, 6).reshape(M, iters, 2, 2, 4)  # row 16 T + 8 half + g: (M, i, s, h, j)
    p0, p1 = nib & 3, nib >> 2
    if bool((p0 >= p1).any()):
        raise ValueError("sp24_to_dense: `sp_meta` holds a group whose two kept columns are not p0 < p1")
    i = torch.arange(iters, device=dev)[:, None, None, None]
    s = torch.arange(2, device=dev)[:, None, None]
    q = 4 * torch.arange(2, device=dev)[:, None] + torch.arange(4, device=dev)  # (h, j)
    group = (16 * i + 4 * (q % 4) + 2 * s + q // 4).expand(M, iters, 2, 2, 4)  # (M, i, s, h, j)
    rows = torch.arange(M, device=dev)[:, None, None, None, None].expand_as(group)
    kept = values.reshape(M, K // 2)[:, sp24_stored(K // 2, column_order, dev)].reshape(M, K // 4, 2)
    virtual = torch.zeros(M, K, dtype=values.dtype, device=dev)
    virtual[rows, 4 * group + p0] = kept[rows, group, 0]
    virtual[rows, 4 * group + p1] = kept[rows, group, 1]
    W = torch.zeros_like(virtual)
    W[:, sp24_columns(K, column_order, dev)] = virtual
    return W


def sp24_linear(x: Tensor, values: Tensor, sp_meta: Tensor, out_features: int, bias: Optional[Tensor],
                checked: bool = False, column_order: int = 0) -> Tensor:
    """``F.linear(x, W, bias)`` for the W of :func:`sp24_to_dense` (fp32 math, one rounding), dtype of ``x``.
    (``checked`` lets the CUDA kernel skip its metadata check; ignored here.)"""
    W = sp24_to_dense(values, sp_meta, out_features, x.shape[-1], column_order)
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), W.float(), b).to(x.dtype)
