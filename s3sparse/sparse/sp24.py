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
"""

from __future__ import annotations

import torch
from torch import Tensor

from s3sparse import ops
from s3sparse.errors import ArgumentError
from s3sparse.sparse.packed import PackedWeight

# Virtual group q of step s -> original group within an iteration: 4 (q % 4) + 2 s + q // 4.
_STEP_GROUPS = [[4 * (q % 4) + 2 * s + q // 4 for q in range(8)] for s in range(2)]


def _kept_positions(packed: PackedWeight) -> Tensor:
    """(M, K/4, 2) int64: the columns (0-3 in the group) of packed values 2 j and 2 j + 1 of each row,
    after checking that the values are each row's kept values in column order, two a group of 4."""
    M, K = packed.shape
    numel = packed.values.numel()
    if numel != M * K // 2:
        raise ArgumentError(f"packed: a 2:4 weight keeps M*K/2 = {M * K // 2} values, this one {numel}; "
                            f"prune to 2:4 and pack it with PackedWeight.from_pattern(W, '2:4')")
    # Each packed value numbered 1.. (exact in float64), unpacked: where each one lands says its column.
    rank = torch.arange(1, numel + 1, dtype=torch.float64, device=packed.device).view_as(packed.values)
    dense = ops.packed_to_dense(rank, packed.meta, packed.subsets, packed.block_off, packed.elem_off,
                                list(packed.scope_shape), list(packed.scope_stride), packed.meta_bits, M, K)
    groups = dense.view(M, K // 4, 4)
    kept = groups != 0
    if not bool((kept.sum(-1) == 2).all()):
        raise ArgumentError("packed: not 2:4 (every group of 4 columns must keep exactly 2 values); "
                            "prune to 2:4 first, or keep this layer on PackedLinear's other paths")
    order = groups[kept].view(M, K // 2)
    if not torch.equal(order, rank.reshape(M, K // 2)):
        raise ArgumentError("packed: its values are not each row's kept values in column order; repack it "
                            "with PackedWeight.from_pattern(packed.to_dense(), '2:4')")
    pos = torch.arange(4, device=dense.device).expand(M, K // 4, 4)
    return pos[kept].view(M, K // 4, 2)


def sp24_meta_words(packed: PackedWeight) -> Tensor:
    """The ``mma.sp`` metadata of a 2:4 ``packed`` weight: (M/16, K/64, 32) int32, one word a lane an
    iteration, in the order the module docstring gives. The weight must be fp16 or bf16 with contiguous
    values, M a multiple of 16 and K of 64 (the kernel's tile); raises ArgumentError (a ValueError)
    naming what does not fit."""
    M, K = packed.shape
    if packed.dtype not in (torch.float16, torch.bfloat16):
        raise ArgumentError(f"packed: the 16-bit sparse tensor cores take float16 or bfloat16 values, got "
                            f"{packed.dtype}; convert with packed.to(torch.float16)")
    if not packed.values.is_contiguous():
        raise ArgumentError("packed: its values must be contiguous (the kernel reads them as stored); "
                            "repack with PackedWeight.from_pattern(packed.to_dense(), '2:4')")
    if M % 16 or K % 64:
        raise ArgumentError(f"packed: the sparse tensor-core layout needs out_features % 16 == 0 and "
                            f"in_features % 64 == 0, got {M}x{K}; keep this layer on PackedLinear's other "
                            f"paths, or pad it to those multiples")
    pos = _kept_positions(packed)  # (M, K/4, 2)
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
