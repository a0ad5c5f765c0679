"""Shared helpers of the specification tests (View, blocks, scopes, builder).

Reference computations here use plain torch on materialised tensors (no s3sparse
code), so they state independently what the specification classes must compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st
from torch import Tensor

#: Devices for the op-backed paths; the CUDA case needs a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class StridedCase:
    """A parameter, a non-overlapping strided view of it (as torch builds it) and a block shape."""

    param: torch.nn.Parameter
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    block: tuple[int, ...]

    def materialised(self) -> Tensor:
        """The viewed elements, copied out with plain torch."""
        return torch.as_strided(self.param.detach(), self.shape, self.stride, self.offset).clone()


@st.composite
def strided_cases(draw, max_factors: int = 4, dtype: torch.dtype = torch.float64, device: str = "cpu") -> StridedCase:
    """A random view made by torch itself: reshape, permute, narrow and step-slice a 2-D parameter."""
    factors = draw(st.lists(st.integers(1, 4), min_size=2, max_size=max_factors))
    cut = draw(st.integers(1, len(factors) - 1))
    param_shape = (math.prod(factors[:cut]), math.prod(factors[cut:]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(param_shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device))
    t = param.detach().view(factors)
    t = t.permute(draw(st.permutations(range(len(factors)))))
    for d in range(t.dim()):
        size = t.shape[d]
        start = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, size - start))
        step = draw(st.sampled_from([1, 2]))
        index = [slice(None)] * t.dim()
        index[d] = slice(start, start + length, step)
        t = t[tuple(index)]
    block = tuple(draw(st.sampled_from(divisors(s))) for s in t.shape)
    offset = t.storage_offset() - param.storage_offset()
    return StridedCase(param, tuple(t.shape), tuple(t.stride()), offset, block)


def blocked(t: Tensor, block: tuple[int, ...]) -> Tensor:
    """A copy of ``t`` as ``(*grid, numel_per_block)``, made with plain reshapes."""
    grid = [s // b for s, b in zip(t.shape, block)]
    inter = t.contiguous().reshape([x for pair in zip(grid, block) for x in pair])
    nd = t.dim()
    perm = list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2))
    return inter.permute(perm).reshape(*grid, math.prod(block)).clone()


def plain_block_stat(t: Tensor, block: tuple[int, ...], reduce: str, p: float = 2.0) -> Tensor:
    """One statistic per block of ``t``, computed in float64 with plain torch."""
    b = blocked(t.double(), block)
    if reduce == "norm":
        return torch.linalg.vector_norm(b, ord=p, dim=-1)
    if reduce == "min":
        return b.amin(-1)
    if reduce == "max":
        return b.amax(-1)
    return b.sum(-1)


def spread(block_values: Tensor, block: tuple[int, ...]) -> Tensor:
    """Grid-shaped values repeated over each block (plain repeat_interleave)."""
    out = block_values
    for d, b in enumerate(block):
        out = out.repeat_interleave(b, dim=d)
    return out


# ---------------------------------------------------------------- covering specs (packed weights)
def random_covering_scope(rng, dtype: torch.dtype = torch.float32, device: str = "cpu", transposed: bool = False):
    """A random ScopeSpec whose view covers a whole 2-D parameter exactly once, and a budget.

    The parameter (M × K) is viewed as its factored dims ``(m1, .., k1, ..)``
    permuted at random (a strided view reaching every element once), cut into
    random blocks and scopes (divisors). ``transposed`` makes the parameter a
    transposed (column-major) tensor, whose storage order is not its row-major
    order. Returns ``(param, scope, nnz)`` with ``nnz`` in ``[0, blocks per scope]``.
    ``rng`` is a ``random.Random``; the values come from torch's seeded generator.
    """
    from s3sparse import BlockSpec, ScopeSpec, View

    fm = [rng.choice([1, 2, 3, 4]) for _ in range(rng.randint(1, 2))]
    fk = [rng.choice([1, 2, 4, 5]) for _ in range(rng.randint(1, 3))]
    M, K = math.prod(fm), math.prod(fk)
    data = torch.randn(M, K, dtype=torch.float64).to(dtype=dtype, device=device)
    if transposed:
        data = data.t().contiguous().t()
    param = torch.nn.Parameter(data)
    # Factored view of the parameter's own layout: the dims of (M, K) split, then permuted.
    t = param.detach().unflatten(0, fm).unflatten(len(fm), fk)
    perm = list(range(t.dim()))
    rng.shuffle(perm)
    t = t.permute(perm)
    view = View(param, tuple(t.shape), tuple(t.stride()), t.storage_offset() - param.storage_offset())
    block = tuple(rng.choice(divisors(s)) for s in t.shape)
    grid = [s // b for s, b in zip(t.shape, block)]
    scope_shape = tuple(rng.choice(divisors(g)) for g in grid)
    scope = ScopeSpec(BlockSpec(view, block), scope_shape, name="random")
    nnz = rng.randint(0, scope.numblk_per_scope())
    return param, scope, nnz


def prune_randomly(scope, nnz: int, extra_zero: float = 0.0) -> None:
    """Keep ``nnz`` random blocks of every scope (in place); then zero a fraction ``extra_zero`` of all blocks."""
    grid = scope.block.grid_shape
    pruned = scope.pruned_block_mask(nnz, block_scores=torch.rand(grid, dtype=torch.float64))
    if extra_zero:
        pruned = pruned | (torch.rand(grid) < extra_zero).to(pruned.device)
    scope.block.apply_mask(pruned)
