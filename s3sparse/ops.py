"""The compiled operators of s3sparse: one thin wrapper per op, with its fake.

Every op is registered under ``torch.ops.s3sparse`` by ``csrc/ops.cpp`` with CPU
and (when compiled) CUDA kernels; the device of the inputs picks the kernel. The
fakes below give ``torch.compile`` and ``torch.library.opcheck`` output shapes
without running anything. :mod:`s3sparse.reference` holds a pure-torch oracle of
each op with the same signature.

The rest of s3sparse calls these wrappers, never ``torch.ops`` directly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers the operators)
from .errors import ArgumentError, ArgumentTypeError

__all__ = ["block_reduce", "block_scale_", "kth_largest", "score_subsets", "schur_update_", "lowrank_sub"]

_ops = torch.ops.s3sparse


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


def schur_update_(w: Tensor, c: Tensor, pruned: Tensor) -> Tensor:
    """Prune columns of many rows, each with its own inverse Hessian, in place.

    For row ``b`` and ``S`` = the entries of ``pruned[b]`` that are not -1:
    ``w[b] -= C[:, S] C_SS^-1 w[b, S]``, ``C -= C[:, S] C_SS^-1 C[S, :]`` (the
    Schur complement), then ``w[b, S]``, ``C[S, :]`` and ``C[:, S]`` are zero.
    ``C = c[b]`` may be stored in fp16/bf16 (math in fp32) or fp32/fp64.

    Args:
        w: (B, K) contiguous fp32/fp64 weight rows.
        c: (B, K, K) contiguous symmetric positive-definite matrices.
        pruned: (B, P) int64 column indices, -1 for padding; distinct per row.

    Returns:
        ``status`` (B,) int32: 0 done, 1 when ``C_SS`` was not positive definite
        (that row of ``w`` and ``c`` is left untouched).
    """
    return _ops.schur_update_.default(w, c, pruned)


def lowrank_sub(base: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``base - a @ b.mT``, batched, accumulated in the precision of ``base``.

    The panel product of left-looking True OBS, ``C[S, R] = C0[S, R] - U[S] U[R]ᵀ``,
    with the factors ``U`` stored in fp16/bf16 and read by tensor cores on CUDA.

    Args:
        base: (N, P, R) float32 (float64 when ``a`` is float64).
        a: (N, P, O) float16/bfloat16/float32/float64.
        b: (N, R, O), ``a``'s dtype; may be a strided view (last dim contiguous).

    Returns:
        (N, P, R) tensor of ``base``'s dtype.
    """
    return _ops.lowrank_sub.default(base, a, b)


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


@torch.library.register_fake("s3sparse::schur_update_")
def _schur_update_fake(w, c, pruned):
    return w.new_empty((w.shape[0],), dtype=torch.int32)


@torch.library.register_fake("s3sparse::lowrank_sub")
def _lowrank_sub_fake(base, a, b):
    torch._check(base.dim() == 3 and a.dim() == 3 and b.dim() == 3, lambda: "s3sparse.lowrank_sub: 3-D inputs")
    torch._check(a.shape[0] == base.shape[0] and b.shape[0] == base.shape[0])
    torch._check(a.shape[1] == base.shape[1] and b.shape[1] == base.shape[2] and a.shape[2] == b.shape[2])
    return torch.empty_like(base, memory_format=torch.contiguous_format)
