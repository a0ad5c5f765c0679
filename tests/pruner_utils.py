"""Shared helpers of the pruner tests: synthetic layers and hand-written pattern checks.

The pattern checks use plain reshapes and indexing only (no s3sparse code), so
they are an independent statement of what each SPEC §2 pattern promises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from s3sparse import patterns

PATTERN_NAMES = ("24", "48", "coupled24", "block16")


def make_layer(M: int, K: int, N: int, seed: int, device="cpu") -> tuple[Tensor, Tensor, Tensor]:
    """(W, X, H): random weights and correlated, unevenly scaled calibration inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K) + 0.5 * torch.randn(K, K, generator=g) / K**0.5
    scales = torch.rand(K, generator=g) * 2 + 0.2
    X = (torch.randn(N, K, generator=g) @ mix) * scales
    W = torch.randn(M, K, generator=g)
    H = X.T @ X / N
    return W.to(device), X.to(device), H.to(device)


def make_ill_conditioned_layer(M: int, K: int, N: int, seed: int, device="cpu") -> tuple[Tensor, Tensor]:
    """(W, H) with H of condition >= 1e6 (usually >= 1e7): N close to K, log-normal channel scales, 0.5%
    outlier channels x10, a shared low-rank component and two nearly collinear channels."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(K, generator=g))
    scale[torch.randperm(K, generator=g)[: max(1, K // 200)]] *= 10.0
    X = torch.randn(N, K, generator=g)
    X += 0.5 * (torch.randn(N, 64, generator=g) @ torch.randn(64, K, generator=g)) / 8.0
    X *= scale
    # Two nearly collinear channels (as duplicated features are): cond(H) >= 1e6 for any seed (seed 669958498: 5e6).
    X[:, -1] = X[:, -2] + 1e-4 * scale[-2] * torch.randn(N, generator=g)
    W = 0.02 * torch.randn(M, K, generator=g)
    return W.to(device), (X.T @ X / N).to(device)


def pattern(name: str, W: Tensor):
    """(scope, nnz) of a SPEC §2 pattern on W."""
    return patterns.by_name(name, W)


def _all_or_nothing(nonzero: Tensor, dim: int) -> Tensor:
    """Per block: kept (all nonzero) or pruned (all zero); raises if a block is mixed."""
    kept = nonzero.all(dim=dim)
    pruned = (~nonzero).all(dim=dim)
    assert bool((kept | pruned).all()), "a block is partly pruned"
    return kept


def kept_blocks_per_scope(name: str, W: Tensor) -> Tensor:
    """Number of kept blocks in every scope of pattern ``name``, by plain indexing."""
    M, K = W.shape
    nz = W != 0
    if name == "24":
        return nz.view(M, K // 4, 4).sum(-1)
    if name == "48":
        return _all_or_nothing(nz.view(M, K // 8, 4, 2), -1).sum(-1)
    if name == "coupled24":
        # col = 16 t + 8 h + i: the block of (t, i) is columns {16t+i, 16t+8+i}; pairs i in 0..3 and 4..7 compete.
        pairs = _all_or_nothing(nz.view(M, K // 16, 2, 8), 2)  # (M, K/16, 8)
        return pairs.view(M, K // 16, 2, 4).sum(-1)
    if name == "block16":
        # row = 16 a + 8 h + r: rows r and r+8 of each 16-row group compete for each 16-column block.
        blocks = _all_or_nothing(nz.view(M // 16, 2, 8, K // 16, 16), -1)  # (M/16, 2, 8, K/16)
        return blocks.sum(1)
    raise KeyError(name)


def assert_pattern_holds(name: str, W: Tensor, nnz: int) -> None:
    kept = kept_blocks_per_scope(name, W)
    assert bool((kept == nnz).all()), f"pattern {name}: kept blocks per scope {kept.unique().tolist()}, want {nnz}"
