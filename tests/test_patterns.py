"""Tests of s3sparse.patterns: each named pattern prunes exactly to the mask its name promises.

Every expected mask is built by hand with plain indexing on the original
weights, independently of the View/BlockSpec/ScopeSpec machinery, and compared
with what ``scope.hard_threshold(nnz=nnz)`` leaves in the parameter.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s3sparse import patterns
from s3sparse.errors import ArgumentError, S3Error, UnknownNameError
from s3sparse.patterns import (
    PATTERNS,
    by_name,
    channels,
    col_blocks,
    columns,
    coupled_nm,
    nm,
    nm_blocks,
    row_coupled_blocks,
    sparsity_to_keep,
)


def _weight(M: int, K: int, seed: int = 0) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(M, K, generator=g, dtype=torch.float64))


def _prune(pattern: tuple, weight: nn.Parameter) -> torch.Tensor:
    """Prune in place with magnitude top-k per scope; the kept-mask (True = kept)."""
    scope, nnz = pattern
    with torch.no_grad():
        scope.hard_threshold(nnz=nnz)
    return weight.detach() != 0


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` largest entries of the last dim."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return keep


# ------------------------------------------------------------------ the four SPEC §2 patterns
def test_2_4_by_hand() -> None:
    M, K = 8, 32
    w = _weight(M, K, 1)
    orig = w.detach().clone()
    kept = _prune(by_name("24", w), w)
    expected = torch.zeros(M, K, dtype=torch.bool)
    for r in range(M):
        for g0 in range(0, K, 4):
            cols = list(range(g0, g0 + 4))
            best = sorted(cols, key=lambda c: -abs(orig[r, c].item()))[:2]
            for c in best:
                expected[r, c] = True
    assert torch.equal(kept, expected)
    assert torch.equal(w.detach()[kept], orig[kept])  # kept weights untouched


def test_4_8_by_hand() -> None:
    M, K = 8, 32
    w = _weight(M, K, 2)
    orig = w.detach().clone()
    kept = _prune(by_name("48", w), w)
    expected = torch.zeros(M, K, dtype=torch.bool)
    for r in range(M):
        for g0 in range(0, K, 8):
            pairs = [(g0 + 2 * i, g0 + 2 * i + 1) for i in range(4)]
            norms = [orig[r, a].item() ** 2 + orig[r, b].item() ** 2 for a, b in pairs]
            for i in sorted(range(4), key=lambda i: -norms[i])[:2]:
                expected[r, pairs[i][0]] = expected[r, pairs[i][1]] = True
    assert torch.equal(kept, expected)
    # every 8 columns of every row: exactly 4 kept, as adjacent pairs
    assert bool((kept.view(M, K // 8, 8).sum(-1) == 4).all())
    assert bool((kept.view(M, K // 2, 2).sum(-1) != 1).all())


def test_coupled_2_4_by_hand() -> None:
    M, K = 6, 48
    w = _weight(M, K, 3)
    orig = w.detach().clone()
    kept = _prune(by_name("coupled24", w), w)
    expected = torch.zeros(M, K, dtype=torch.bool)
    for r in range(M):
        for t0 in range(0, K, 16):
            for group in (range(0, 4), range(4, 8)):
                norm = {j: orig[r, t0 + j].item() ** 2 + orig[r, t0 + j + 8].item() ** 2 for j in group}
                for j in sorted(group, key=lambda j: -norm[j])[:2]:
                    expected[r, t0 + j] = expected[r, t0 + j + 8] = True
    assert torch.equal(kept, expected)
    tiles = kept.view(M, K // 16, 2, 8)  # [..., 0, j] is column j, [..., 1, j] column j+8
    assert torch.equal(tiles[:, :, 0], tiles[:, :, 1])  # both columns of a pair together
    assert bool((tiles[:, :, 0].reshape(M, K // 16, 2, 4).sum(-1) == 2).all())  # 2 of 4 pairs per group
    assert torch.equal(w.detach()[kept], orig[kept])


def test_block16_row_coupled_by_hand() -> None:
    M, K = 32, 48
    w = _weight(M, K, 4)
    orig = w.detach().clone()
    kept = _prune(by_name("block16", w), w)
    expected = torch.zeros(M, K, dtype=torch.bool)
    for g0 in range(0, M, 16):
        for p in range(8):
            top, bottom = g0 + p, g0 + p + 8
            for c0 in range(0, K, 16):
                a = orig[top, c0 : c0 + 16].norm().item()
                b = orig[bottom, c0 : c0 + 16].norm().item()
                expected[top if a > b else bottom, c0 : c0 + 16] = True
    assert torch.equal(kept, expected)
    blocks = kept.view(M // 16, 2, 8, K // 16, 16)
    assert bool((blocks.all(-1) | ~blocks.any(-1)).all())  # whole 16-column blocks
    assert bool((blocks.all(-1).sum(1) == 1).all())  # exactly one of rows p, p+8


def test_spec_geometry_of_the_four_patterns() -> None:
    """The views/blocks/scopes are those of SPEC §2 (and the default keeps)."""
    M, K = 32, 64
    w = _weight(M, K)
    expect = {
        "24": ((M, K), (K, 1), (M, K // 4), 2),
        "48": ((M, K), (K, 1), (M, K // 8), 2),
        "coupled24": ((M, K // 16, 8, 2), (K, 16, 1, 8), (M, K // 16, 2, 1), 2),
        "block16": ((M // 16, 2, 8 * K), (16 * K, 8 * K, 1), (M // 16, 1, 8 * K // 16), 1),
    }
    for name, (vshape, vstride, sgrid, keep) in expect.items():
        scope, nnz = by_name(name, w)
        view = scope.block.view
        assert tuple(view.shape) == vshape and tuple(view.stride) == vstride, name
        assert view.param is w
        assert tuple(scope.grid_shape) == sgrid, name
        assert nnz == keep
        assert scope.numblk_per_scope() == {"24": 4, "48": 4, "coupled24": 4, "block16": 2}[name]


# ------------------------------------------------------------------ general N:M and friends
@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (5, 8), (4, 16), (4, 4)])
def test_nm_keeps_the_n_largest_of_every_m(n: int, m: int) -> None:
    M, K = 6, 48
    w = _weight(M, K, n * 31 + m)
    orig = w.detach().clone()
    scope, nnz = nm(w, n, m)
    assert nnz == n
    kept = _prune((scope, nnz), w)
    expected = _topk_mask(orig.abs().view(M, K // m, m), n).view(M, K)
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("n,m,b", [(2, 4, 2), (1, 4, 4), (3, 4, 2), (1, 2, 8)])
def test_nm_blocks_keeps_the_n_largest_blocks(n: int, m: int, b: int) -> None:
    M, K = 4, 64
    w = _weight(M, K, n + 7 * m + 13 * b)
    orig = w.detach().clone()
    kept = _prune(nm_blocks(w, n, m, b), w)
    norms = orig.view(M, K // (m * b), m, b).norm(dim=-1)
    expected = _topk_mask(norms, n).unsqueeze(-1).expand(M, K // (m * b), m, b).reshape(M, K)
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("n,m,stride", [(1, 4, 4), (2, 4, 8), (1, 2, 8), (3, 8, 8)])
def test_coupled_nm_general(n: int, m: int, stride: int) -> None:
    M, K = 4, 2 * stride * 3
    w = _weight(M, K, n + m + stride)
    orig = w.detach().clone()
    kept = _prune(coupled_nm(w, n, m, stride), w)
    pairs = orig.view(M, K // (2 * stride), 2, stride)  # [.., 0, j] col j, [.., 1, j] col j+stride
    pair_norm = pairs.norm(dim=2).view(M, K // (2 * stride), stride // m, m)
    keep_pairs = _topk_mask(pair_norm, n).view(M, K // (2 * stride), 1, stride)
    expected = keep_pairs.expand(M, K // (2 * stride), 2, stride).reshape(M, K)
    assert torch.equal(kept, expected)


def test_row_coupled_blocks_general() -> None:
    M, K, ra, bc = 12, 24, 3, 8
    w = _weight(M, K, 9)
    orig = w.detach().clone()
    kept = _prune(row_coupled_blocks(w, block_cols=bc, rows_apart=ra, keep=1), w)
    norms = orig.view(M // (2 * ra), 2, ra, K // bc, bc).norm(dim=-1)  # [g, half, p, c]
    winner = norms.argmax(dim=1, keepdim=True)
    keep = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, winner, True)
    expected = keep.unsqueeze(-1).expand(M // (2 * ra), 2, ra, K // bc, bc).reshape(M, K)
    assert torch.equal(kept, expected)


def test_channels_columns_col_blocks() -> None:
    M, K = 10, 32
    w = _weight(M, K, 11)
    orig = w.detach().clone()
    scope, nnz = channels(w, sparsity=0.3)
    assert nnz == 7
    kept = _prune((scope, nnz), w)
    rows = _topk_mask(orig.norm(dim=1), 7)
    assert torch.equal(kept, rows.unsqueeze(1).expand(M, K))

    w = _weight(M, K, 12)
    orig = w.detach().clone()
    scope, nnz = columns(w, sparsity=0.75)
    assert nnz == 8
    kept = _prune((scope, nnz), w)
    cols = _topk_mask(orig.norm(dim=0), 8)
    assert torch.equal(kept, cols.unsqueeze(0).expand(M, K))

    w = _weight(M, K, 13)
    orig = w.detach().clone()
    scope, nnz = col_blocks(w, width=4, sparsity=0.25)
    assert nnz == 6 and scope.numblk_per_scope() == 8
    kept = _prune((scope, nnz), w)
    blocks = _topk_mask(orig.view(M, 8, 4).norm(dim=(0, 2)), 6)
    assert torch.equal(kept, blocks.view(1, 8, 1).expand(M, 8, 4).reshape(M, K))


def test_sparsity_to_keep_rounding() -> None:
    assert sparsity_to_keep(0.5, 5) == 3  # halves round towards keeping
    assert sparsity_to_keep(0.9, 10) == 1  # no float truncation to 0
    assert sparsity_to_keep(0.7, 10) == 3
    assert sparsity_to_keep(0.0, 7) == 7 and sparsity_to_keep(1.0, 7) == 0
    with pytest.raises(ArgumentError, match="sparsity"):
        sparsity_to_keep(1.5, 4)


def test_registry_and_module_input() -> None:
    assert set(PATTERNS) == {"24", "48", "coupled24", "block16"}
    layer = nn.Linear(32, 16, bias=False)
    for name in PATTERNS:
        scope, nnz = by_name(name, layer)  # a module with .weight is accepted
        assert scope.block.view.param is layer.weight
        assert PATTERNS[name].description
    scope, nnz = by_name("2:4", layer.weight)
    assert nnz == 2 and scope.numblk_per_scope() == 4
    scope, nnz = by_name("coupled24", layer.weight, stride=4)
    assert tuple(scope.block.view.shape) == (16, 4, 4, 2)
    with pytest.raises(UnknownNameError, match="known patterns"):
        by_name("3:7", layer.weight)


@pytest.mark.parametrize(
    "short,canonical,spellings",
    [
        ("24", "2:4", ["2:4", "24"]),
        ("48", "4:8", ["4:8", "48"]),
        ("coupled24", "coupled-2:4", ["coupled-2:4", "coupled2:4", "coupled_2:4", "coupled_24", "COUPLED-24"]),
        ("block16", "block16-rows", ["block16-rows", "block16_row_coupled", "block16"]),
    ],
)
def test_by_name_and_parse_pattern_build_the_same_pattern(short: str, canonical: str, spellings: list) -> None:
    """The paper's four by their reference names and by every spelling of the pattern names agree:
    the same view, block, scope and budget, so pruning by either leaves the same weights."""
    w1, w2 = _weight(32, 64, 3), _weight(32, 64, 3)
    mask = _prune(by_name(short, w1), w1)
    for name in spellings:
        scope, nnz = by_name(name, w2)
        choice = patterns.parse_pattern(name)
        other, other_nnz = choice.build(w2)
        assert nnz == other_nnz and tuple(scope.shape) == tuple(other.shape), name
        assert scope.block.view == other.block.view and tuple(scope.block.shape) == tuple(other.block.shape), name
        assert choice.name == canonical and choice.description, name
    assert torch.equal(_prune(patterns.parse_pattern(canonical).build(w2), w2), mask)


def test_view_is_live_on_the_parameter() -> None:
    w = _weight(16, 32)
    scope, nnz = coupled_nm(w)
    scope.block.view.data[0, 0, 0, 1] = 123.0  # element (row 0, col 8)
    assert w[0, 8].item() == 123.0


# ------------------------------------------------------------------ helpful refusals
@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: nm(_weight(4, 10)), r"K=10 is not a multiple of 4"),
        (lambda: nm(_weight(4, 8), 5, 4), r"n <= m"),
        (lambda: nm_blocks(_weight(4, 20)), r"K=20 is not a multiple of 8"),
        (lambda: coupled_nm(_weight(4, 100)), r"K=100 is not a multiple of 16 \(coupled 2:4 tiles 16 columns\); use K a multiple of 16 or nm\("),
        (lambda: coupled_nm(_weight(4, 48), 2, 3, 8), r"stride=8 is not a multiple of m=3"),
        (lambda: row_coupled_blocks(_weight(24, 32)), r"M=24 is not a multiple of 16"),
        (lambda: row_coupled_blocks(_weight(16, 40)), r"K=40 is not a multiple of 16"),
        (lambda: row_coupled_blocks(_weight(32, 16).t()), r"contiguous"),
        (lambda: row_coupled_blocks(_weight(16, 32), keep=3), r"keep"),
        (lambda: col_blocks(_weight(4, 32), width=5), r"K=32 is not a multiple of 5"),
        (lambda: channels(_weight(4, 32), sparsity=-0.1), r"sparsity"),
        (lambda: nm(torch.randn(2, 4, 8)), r"2-D"),
        (lambda: nm(_weight(4, 8), 0, 4), r"positive"),
    ],
)
def test_bad_shapes_are_refused_with_a_helpful_message(build, match: str) -> None:
    with pytest.raises(ArgumentError, match=match) as info:
        build()
    assert isinstance(info.value, S3Error)


CONSTRUCTOR_CALLS = {
    "nm": lambda w: nm(w, 2, 4),
    "nm_blocks": lambda w: nm_blocks(w),
    "coupled_nm": lambda w: coupled_nm(w),
    "row_coupled_blocks": lambda w: row_coupled_blocks(w),
    "channels": lambda w: channels(w, sparsity=0.25),
    "columns": lambda w: columns(w, sparsity=0.5),
    "col_blocks": lambda w: col_blocks(w, width=8, sparsity=0.75),
}


def test_every_public_constructor_prunes_its_weight_to_its_budget() -> None:
    """Each constructor in ``patterns.__all__`` returns ``(scope, nnz)`` on the weight it was
    given, and pruning keeps exactly the fraction ``nnz / blocks per scope`` of the weights
    (a Gaussian weight has no zeros of its own)."""
    from s3sparse import ScopeSpec

    constructors = {n for n in patterns.__all__ if callable(getattr(patterns, n)) and n[0].islower()}
    constructors -= {"by_name", "sparsity_to_keep", "parse_pattern", "pattern_names_help", "pattern_names_table"}
    assert constructors == set(CONSTRUCTOR_CALLS), "a public constructor is missing from this test"
    for name, build in CONSTRUCTOR_CALLS.items():
        w = _weight(32, 64, 5)
        scope, nnz = build(w)
        assert isinstance(scope, ScopeSpec) and isinstance(nnz, int), name
        assert scope.block.view.param is w, name
        per_scope = scope.numblk_per_scope()
        assert 0 < nnz < per_scope, (name, nnz, per_scope)
        kept = _prune((scope, nnz), w)
        assert kept.sum().item() * per_scope == w.numel() * nnz, (name, kept.sum().item(), nnz, per_scope)
