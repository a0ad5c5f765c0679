"""The metadata of the sparse tensor cores (``mma.sp`` m16n8k32, 16-bit inputs) for a 2:4 weight.

A 2:4 decode kernel on the sparse tensor cores (measured in ``benchmarks/lab/sp24_lab.cu``: 1.29-1.65×
dense ``F.linear`` at 1-8 tokens on an H100; docs/performance.md) reads the packed values as they are
(fp16 or bf16, contiguous) and needs, beside them, the 2-bit position of every kept value in the order
the instruction reads it. Built in the kernel from the 3-bit codes it costs 50-70 % more time, so it is
derived once a weight, here. The order, for the kernel's permuted k (see the lab kernel's header):

* iteration ``i`` covers columns ``64 i`` to ``64 i + 63``, in two m16n8k32 steps; in step ``s``,
  virtual group ``q`` (4 columns) is original group ``16 i + 4 (q % 4) + 2 s + q // 4``;
* one 32-bit word a lane an iteration; for lane ``4 g + t`` of 16-row tile ``T``, the word gives step
  ``t // 2`` (sparsity selector ``t // 2``), virtual groups ``4 (t % 2) .. 4 (t % 2) + 3``: bits
  ``4 j .. 4 j + 3`` for row ``16 T + g`` and bits ``16 + 4 j ..`` for row ``16 T + g + 8``, each
  group's first kept position in its low 2 bits (the layout measured correct on an H100; the other
  reading, a whole row a lane, gave errors of order 1).

4:8 and coupled 2:4 weights are 2:4 in a fixed permutation of the columns (``column_order`` 1 and 2,
``_CHUNK_COLUMNS``), and the kernel reads their values, stored a kept pair at a time, in that order by
byte permutes: the same metadata, built here on the permuted columns, serves them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from s3sparse import ops
from s3sparse.errors import ArgumentError
from s3sparse.sparse.packed import PackedWeight

# Virtual group q of step s -> original group within an iteration: 4 (q % 4) + 2 s + q // 4.
_STEP_GROUPS = [[4 * (q % 4) + 2 * s + q // 4 for q in range(8)] for s in range(2)]

# Column orders (csrc/sp24.h): in each 16-column chunk, the original column of each virtual column, and
# in each 4 stored values, the one at each virtual place. 0: 2:4; 1: 4:8 (pairs kept: the even then the
# odd columns of each 8); 2: coupled 2:4 (columns c and c + 8 kept together: 4-column groups 0, 2, 1, 3).
COLUMN_ORDERS = {"2:4": 0, "4:8": 1, "coupled-2:4": 2}
_CHUNK_COLUMNS = {
    0: list(range(16)),
    1: [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15],
    2: [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15],
}
_QUAD_STORED = {0: [0, 1, 2, 3], 1: [0, 2, 1, 3], 2: [0, 2, 1, 3]}


def _numbered_dense(packed: PackedWeight) -> Tensor:
    """W's shape with each packed value's number (1..) where it lands, 0 elsewhere: float32 where every
    number is exact in it (below 2^24 values), else float64 (the transient is 4 or 8 bytes a weight)."""
    M, K = packed.shape
    numel = packed.values.numel()
    if numel != M * K // 2:
        raise ArgumentError(f"packed: a 2:4-type weight keeps M*K/2 = {M * K // 2} values, this one {numel}; "
                            f"prune to 2:4 (4:8, coupled 2:4) and pack it with PackedWeight.from_pattern")
    dtype = torch.float32 if numel < 2**24 else torch.float64
    rank = torch.arange(1, numel + 1, dtype=dtype, device=packed.device).view_as(packed.values)
    return ops.packed_to_dense(rank, packed.meta, packed.subsets, packed.block_off, packed.elem_off,
                               list(packed.scope_shape), list(packed.scope_stride), packed.meta_bits, M, K)


def _kept_positions(dense: Tensor, column_order: int) -> Tensor:
    """(M, K/4, 2) int64: in each virtual group of 4 columns (``column_order``), the positions (0-3) of
    its two kept values, after checking that every group keeps exactly 2 and that the values, stored
    in the order the kernel reads them, are the kept values in virtual column order."""
    M, K = dense.shape
    dev = dense.device
    chunk = torch.tensor(_CHUNK_COLUMNS[column_order], device=dev)
    columns = (torch.arange(0, K, 16, device=dev)[:, None] + chunk).reshape(-1)
    groups = dense[:, columns].view(M, K // 4, 4)
    kept = groups != 0
    if not bool((kept.sum(-1) == 2).all()):
        raise ArgumentError("packed: not 2:4 in this column order (every group of 4 must keep exactly 2 "
                            "values); prune to 2:4, 4:8 or coupled 2:4, or keep this layer on PackedLinear's "
                            "other paths")
    quad = torch.tensor(_QUAD_STORED[column_order], device=dev)
    stored = (torch.arange(0, K // 2, 4, device=dev)[:, None] + quad).reshape(-1)
    want = torch.arange(1, M * K // 2 + 1, dtype=dense.dtype, device=dev).view(M, K // 2)[:, stored]
    if not torch.equal(groups[kept].view(M, K // 2), want):
        raise ArgumentError("packed: its values are not stored in the order this column order reads them; "
                            "repack it with PackedWeight.from_pattern(packed.to_dense(), pattern)")
    pos = torch.arange(4, device=dev).expand(M, K // 4, 4)
    return pos[kept].view(M, K // 4, 2)


def sp24_column_order(packed: PackedWeight) -> int:
    """The column order (0: 2:4, 1: 4:8, 2: coupled 2:4) in which ``packed`` is 2:4 with its values stored
    as the kernel reads them; raises ArgumentError (a ValueError) when there is none."""
    return sp24_form(packed)[0]


def sp24_form(packed: PackedWeight, column_order: Optional[int] = None) -> tuple[int, Tensor]:
    """``(column_order, sp24_meta_words(packed, column_order))`` from one unpacking of the weight; with
    ``column_order`` None, the first order (0, 1, 2) in which ``packed`` is 2:4 as the kernel reads it."""
    if column_order is not None and column_order not in _CHUNK_COLUMNS:
        raise ArgumentError(f"`column_order` must be 0 (2:4), 1 (4:8) or 2 (coupled 2:4), got {column_order!r}")
    _check_fits(packed)
    dense = _numbered_dense(packed)
    if column_order is not None:
        return column_order, _meta_words(_kept_positions(dense, column_order))
    for order in (0, 1, 2):
        try:
            return order, _meta_words(_kept_positions(dense, order))
        except ArgumentError:
            continue
    raise ArgumentError("packed: not 2:4, 4:8 or coupled 2:4 with its values in the packed order; keep this "
                        "layer on PackedLinear's other paths")


def _check_fits(packed: PackedWeight) -> None:
    M, K = packed.shape
    if packed.dtype not in (torch.float16, torch.bfloat16):
        raise ArgumentError(f"packed: the 16-bit sparse tensor cores take float16 or bfloat16 values, got "
                            f"{packed.dtype}; convert with packed.to(torch.float16)")
    if not packed.values.is_contiguous():
        raise ArgumentError("packed: its values must be contiguous (the kernel reads them as stored); "
                            "repack with PackedWeight.from_pattern(packed.to_dense(), pattern)")
    if M % 16 or K % 64:
        raise ArgumentError(f"packed: the sparse tensor-core layout needs out_features % 16 == 0 and "
                            f"in_features % 64 == 0, got {M}x{K}; keep this layer on PackedLinear's other "
                            f"paths, or pad it to those multiples")


def sp24_meta_words(packed: PackedWeight, column_order: int = 0) -> Tensor:
    """The ``mma.sp`` metadata of a ``packed`` weight that is 2:4 in ``column_order`` (0: 2:4, 1: 4:8,
    2: coupled 2:4; :func:`sp24_column_order` finds it): (M/16, K/64, 32) int32, one word a lane an
    iteration, in the order the module docstring gives. The weight must be fp16 or bf16 with contiguous
    values, M a multiple of 16 and K of 64 (the kernel's tile); raises ArgumentError (a ValueError)
    naming what does not fit."""
    return sp24_form(packed, column_order)[1]


def _meta_words(pos: Tensor) -> Tensor:
    """The metadata words of the kept positions ``pos`` (M, K/4, 2) of the virtual groups."""
    M, K = pos.shape[0], 4 * pos.shape[1]
    tiles, iters = M // 16, K // 64
    groups = torch.tensor(_STEP_GROUPS, device=pos.device)  # (2 steps, 8)
    # (tiles, 16 rows, iters, 2 steps, 8 virtual groups, 2) -> nibble p0 | p1 << 2 a group.
    per_step = pos.view(tiles, 16, iters, 16, 2)[:, :, :, groups, :]
    nib = per_step[..., 0] | (per_step[..., 1] << 2)  # (tiles, 16, iters, 2, 8)
    shifts = 4 * torch.arange(4, device=pos.device)
    half = (nib.view(tiles, 16, iters, 2, 2, 4) << shifts).sum(-1)  # (.., step, which half, ) 16-bit
    low, high = half[:, :8], half[:, 8:]  # rows g and g + 8: (tiles, 8, iters, 2, 2)
    word = low | (high << 16)  # (tiles, g, iters, step, half)
    word = word.permute(0, 2, 1, 3, 4).reshape(tiles, iters, 32)  # lane 4 g + 2 step + half
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
