"""ScopeSpec and ScopeCoupling: layouts, budgets, thresholds, masks, the SPEC §2 patterns by hand."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s3sparse import BlockCoupling, BlockSpec, ScopeCoupling, ScopeSpec, View
from s3sparse.errors import ArgumentError, ArgumentTypeError, CouplingError, ShapeMismatchError, SpecError

from spec_utils import DEVICES, blocked, divisors, spread, strided_cases

SETTINGS = settings(max_examples=50, deadline=None)


def param_mask(spec: BlockSpec, element_mask: torch.Tensor) -> torch.Tensor:
    """An element mask of ``spec``'s view placed in a parameter-shaped mask."""
    out = torch.zeros(spec.view.param.shape, dtype=torch.bool, device=element_mask.device)
    torch.as_strided(out, spec.view.shape, spec.view.stride, spec.view.offset).copy_(element_mask)
    return out


def scopes_of(grid, scope):
    """Every scope of a block grid as a list of block-grid indices, blocks in row-major order."""
    ranges = [range(g // s) for g, s in zip(grid, scope)]
    for S in itertools.product(*ranges):
        yield S, [tuple(S[d] * scope[d] + i[d] for d in range(len(grid))) for i in itertools.product(*map(range, scope))]


# ---------------------------------------------------------------- structure and layout
def test_scope_shape_normalization_and_structure():
    b = BlockSpec(torch.randn(8, 12), (1, 2))  # grid (8, 6)
    s = ScopeSpec(b, (2,), name="s")
    assert s.shape == (2, 6) and s.grid_shape == (4, 1) and s.numblk_per_scope() == 12
    assert s.numscopes() == 4 and s.numblk() == 48
    assert ScopeSpec(b, (-1, 3)).shape == (8, 3)
    assert ScopeSpec(b).shape == (8, 6)
    assert s.block is b and s.members == (s,) and s.block_specs() == (b,) and s.parameters() == [b.view]
    assert "'s'" in repr(s) and str(s) == repr(s)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3,), r"`shape`\[0\] = 3 does not divide dim 0 of the block grid \(8, 6\) \(size 8\); sizes that divide it: 1, 2, 4, 8"),
        ((1, 4), r"`shape`\[1\] = 4 does not divide dim 1 .*size 6"),
        ((1, 1, 1), "has 3 dims"),
        ((0,), "positive int or -1"),
    ],
)
def test_bad_scope_shapes(shape, match):
    with pytest.raises(ArgumentError, match=match):
        ScopeSpec(BlockSpec(torch.randn(8, 12), (1, 2)), shape)


def test_scope_needs_a_block():
    with pytest.raises(ArgumentTypeError, match="`block`"):
        ScopeSpec(torch.randn(4, 4), (1, 4))


def test_block_to_scope_orders_blocks_row_major_and_round_trips():
    b = BlockSpec(torch.randn(4, 6), ())
    s = ScopeSpec(b, (2, 3))
    values = torch.arange(24).reshape(4, 6)
    merged = s.block_to_scope(values)
    assert merged.shape == (2, 2, 6)
    for S, members in scopes_of((4, 6), (2, 3)):
        assert merged[S].tolist() == [values[i].item() for i in members]
    assert s.block_to_scope(values, merge=False).shape == (2, 2, 2, 3)
    assert s.block_to_scope(values, reorder=False, merge=False).shape == (2, 2, 2, 3)
    assert torch.equal(s.block_to_scope(values, reorder=False, merge=False)[1, :, 0, :], values[2:4, 0:3])
    assert torch.equal(s.scope_to_block(merged), values)
    extra = torch.randn(4, 6, 5)  # per-block data with trailing dims
    assert torch.equal(s.scope_to_block(s.block_to_scope(extra)), extra)
    assert s.block_to_scope(extra).shape == (2, 2, 6, 5)
    with pytest.raises(ShapeMismatchError, match="`b`"):
        s.block_to_scope(torch.zeros(6, 4))
    with pytest.raises(ShapeMismatchError, match="`v`"):
        s.scope_to_block(torch.zeros(2, 2, 5))


def test_block_norms_kth_and_sparsity():
    W = torch.randn(6, 8, dtype=torch.float64)
    s = ScopeSpec(BlockSpec(W, (1, 2)), (1, 4))  # 4 pairs per row
    norms = s.block_norms()
    expected = W.reshape(6, 4, 2).norm(dim=-1).reshape(6, 1, 4)
    torch.testing.assert_close(norms, expected)
    ordered = expected.sort(dim=-1, descending=True).values
    torch.testing.assert_close(s.kth_largest(None, 2), ordered[..., 1])
    torch.testing.assert_close(s.kth_mid(None, 2), (ordered[..., 1] + ordered[..., 2]) / 2)
    torch.testing.assert_close(s.kth_mid(None, 1, k_weight=0.25), 0.25 * ordered[..., 0] + 0.75 * ordered[..., 1])
    assert torch.all(s.kth_largest(None, 0) == float("inf"))
    torch.testing.assert_close(s.kth_mid(None, 4), ordered[..., 3])
    scores = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(
        s.kth_largest(None, 1, block_scores=scores), scores.amax(-1).reshape(6, 1)
    )
    assert s.sparsity_to_nnz(0.5) == 2 and s.sparsity_to_nnz(0.0) == 4 and s.sparsity_to_nnz(1.0) == 0
    assert s.sparsity_to_nnz(0.75) == 1 and s.sparsity_to_nnz(0.6) == 2
    with pytest.raises(SpecError, match="`sparsity`"):
        s.sparsity_to_nnz(1.5)


# ---------------------------------------------------------------- budgets (property tests)
@st.composite
def scoped_cases(draw):
    case = draw(strided_cases())
    grid = tuple(s // b for s, b in zip(case.shape, case.block))
    scope = tuple(draw(st.sampled_from(divisors(g))) for g in grid)
    n = 1
    for v in scope:
        n *= v
    nnz = draw(st.integers(0, n))
    return case, scope, nnz


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(args=scoped_cases())
def test_hard_threshold_keeps_exactly_nnz_largest_blocks_per_scope(device, args):
    case, scope_shape, nnz = args
    param = torch.nn.Parameter(case.param.detach().to(device))
    spec = BlockSpec(View(param, case.shape, case.stride, case.offset), case.block)
    scope = ScopeSpec(spec, scope_shape)
    norms = spec.norms().cpu()
    masks = scope.get_masks(nnz)
    pruned = scope.hard_threshold(nnz=nnz).cpu()
    after = spec.norms().cpu()
    for _, members in scopes_of(spec.grid_shape, scope.shape):
        kept = [i for i in members if after[i] != 0]
        assert len(kept) == nnz
        largest = sorted(members, key=lambda i: -norms[i].item())[:nnz]
        assert sorted(kept) == sorted(largest)
        assert all(pruned[i] == (i not in kept) for i in members)
    # get_masks (taken before) marks exactly the zeroed elements; the rest is untouched.
    assert torch.equal(masks[spec].cpu(), spread(pruned, spec.block_view().shape[spec.grid_ndim:]))
    assert torch.all(spec.data[masks[spec]] == 0)
    original = torch.as_strided(case.param.detach(), case.shape, case.stride, case.offset)
    assert torch.equal(spec.data.cpu()[~masks[spec].cpu()], original[~masks[spec].cpu()])


def test_ties_never_keep_more_than_nnz():
    W = torch.ones(4, 16)
    s = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    s.hard_threshold(nnz=2)
    assert torch.equal((W != 0).reshape(4, 4, 4).sum(-1), torch.full((4, 4), 2))
    assert torch.equal(W.reshape(4, 4, 4)[..., :2], torch.ones(4, 4, 2))  # ties go to the earlier block


def test_hard_threshold_by_thresholds_and_values():
    W = torch.randn(4, 8, dtype=torch.float64)
    original = W.clone()
    s = ScopeSpec(BlockSpec(W, (1, 2)), (1, -1))  # one scope per row
    t = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64).reshape(4, 1)
    pruned = s.hard_threshold(thresholds=t)
    norms = original.reshape(4, 4, 2).norm(dim=-1)
    assert torch.equal(pruned, norms < t)
    assert torch.equal(W.reshape(4, 4, 2) == 0, (norms < t)[..., None].expand(4, 4, 2))
    # Ranking by other values: keep the blocks where `values` is largest.
    W2 = torch.randn(4, 8, dtype=torch.float64)
    s2 = ScopeSpec(BlockSpec(W2, (1, 2)), (1, -1))
    scores = torch.arange(32.0, dtype=torch.float64).reshape(4, 8)
    s2.hard_threshold(nnz=1, values=scores)
    assert torch.all(W2[:, :6] == 0) and torch.all(W2[:, 6:] != 0)


def test_get_masks_sources():
    W = torch.randn(4, 8, dtype=torch.float64)
    s = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    spec = s.block
    by_norm = s.get_masks(2)[spec]
    assert torch.equal(by_norm, s.pruned_block_mask(2))
    scores = -W.abs()  # keep the smallest
    by_scores = s.get_masks(2, block_scores=scores)[spec]
    assert torch.equal(by_scores, ~by_norm)
    joint_scores = s.block_to_scope(scores)
    assert torch.equal(s.get_masks(2, block_scores=joint_scores)[spec], by_scores)
    assert torch.equal(s.get_masks(block_mask=by_norm)[spec], by_norm)
    assert torch.equal(s.get_masks(2, block_mask=s.block_to_scope(by_norm))[spec], by_norm)
    with pytest.raises(SpecError, match="keeps between 2 and 2 blocks per scope, not `nnz` = 1"):
        s.get_masks(1, block_mask=by_norm)
    with pytest.raises(SpecError, match="`nnz` is required"):
        s.get_masks()
    with pytest.raises(SpecError, match="not both"):
        s.get_masks(2, values=W, block_scores=scores)
    with pytest.raises(SpecError, match="not both"):
        s.get_masks(2, values=W, block_mask=by_norm)
    with pytest.raises(ArgumentTypeError, match="`block_mask` must have dtype torch.bool"):
        s.get_masks(block_mask=by_norm.float())
    with pytest.raises(ShapeMismatchError, match="`block_scores`"):
        s.get_masks(2, block_scores=torch.zeros(3, 3))


def test_soft_threshold_with_per_scope_thresholds_and_scale():
    W = torch.randn(4, 8, dtype=torch.float64)
    s = ScopeSpec(BlockSpec(W, (1, 2)), (1, -1))
    norms = s.block.norms().clone()
    t = torch.tensor([0.1, 0.5, 1.0, 4.0], dtype=torch.float64).reshape(4, 1)
    s.soft_threshold(t, scale=0.5)
    limit = (t * 0.5).expand(4, 4)
    after = s.block.norms()
    assert torch.all(after[norms <= limit] == 0)
    torch.testing.assert_close(after[norms > limit], (norms - limit)[norms > limit])
    h = torch.rand(4, 8, dtype=torch.float64) + 0.5
    s.soft_threshold(0.1, conditioners=h, max_iter=60)
    with pytest.raises(SpecError, match=r"`thresholds` \* `scale` must be >= 0"):
        s.soft_threshold(0.1, scale=-1.0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s: s.hard_threshold(nnz=5), SpecError, r"`nnz` must be in \[0, 4\] \(the blocks per scope\), got 5"),
        (lambda s: s.hard_threshold(nnz=-1), SpecError, r"`nnz` must be in \[0, 4\]"),
        (lambda s: s.hard_threshold(nnz=1.5), ArgumentTypeError, "`nnz` must be an int"),
        (lambda s: s.hard_threshold(nnz=True), ArgumentTypeError, "`nnz` must be an int"),
        (lambda s: s.hard_threshold(), SpecError, "exactly one of `thresholds` and `nnz`"),
        (lambda s: s.hard_threshold(thresholds=1.0, nnz=2), SpecError, "exactly one"),
        (lambda s: s.hard_threshold(thresholds=torch.ones(3)), ShapeMismatchError, "`thresholds`"),
        (lambda s: s.hard_threshold(nnz=2, values=torch.ones(3, 3)), ShapeMismatchError, "`values`"),
        (lambda s: s.soft_threshold(1.0, conditioners=torch.ones(3, 3)), ShapeMismatchError, "`conditioners`"),
        (lambda s: s.kth_largest(None, 7), SpecError, "`nnz`"),
        (lambda s: s.kth_mid(None, 2, k_weight=2.0), SpecError, "`k_weight`"),
    ],
)
def test_bad_scope_arguments_leave_the_parameter_unchanged(call, error, match):
    W = torch.nn.Parameter(torch.randn(4, 16))
    before = W.detach().clone()
    s = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    with pytest.raises(error, match=match):
        call(s)
    assert torch.equal(W.detach(), before)


# ---------------------------------------------------------------- the SPEC §2 patterns, by hand
M, K = 32, 64


def expected_nm(W: torch.Tensor, block_cols: int, per_scope: int, keep: int) -> torch.Tensor:
    """Pruned mask of ``keep`` of ``per_scope`` blocks of ``block_cols`` adjacent columns, by hand."""
    pruned = torch.ones(W.shape, dtype=torch.bool)
    width = block_cols * per_scope
    for r in range(W.shape[0]):
        for start in range(0, W.shape[1], width):
            cols = [list(range(start + j * block_cols, start + (j + 1) * block_cols)) for j in range(per_scope)]
            norms = [W[r, c].norm().item() for c in cols]
            for j in sorted(range(per_scope), key=lambda j: -norms[j])[:keep]:
                pruned[r, cols[j]] = False
    return pruned


def expected_coupled_24(W: torch.Tensor) -> torch.Tensor:
    pruned = torch.ones(W.shape, dtype=torch.bool)
    for r in range(W.shape[0]):
        for tile in range(0, W.shape[1], 16):
            for half in (0, 4):
                pairs = [(tile + j, tile + j + 8) for j in range(half, half + 4)]
                norms = [W[r, list(p)].norm().item() for p in pairs]
                for j in sorted(range(4), key=lambda j: -norms[j])[:2]:
                    pruned[r, list(pairs[j])] = False
    return pruned


def expected_block16(W: torch.Tensor) -> torch.Tensor:
    pruned = torch.ones(W.shape, dtype=torch.bool)
    for group in range(0, W.shape[0], 16):
        for p in range(8):
            for c in range(0, W.shape[1], 16):
                a, b = group + p, group + p + 8
                winner = a if W[a, c : c + 16].norm() >= W[b, c : c + 16].norm() else b
                pruned[winner, c : c + 16] = False
    return pruned


def pattern_scopes(W):
    return {
        "2:4": (ScopeSpec(BlockSpec(W, (1, 1)), (1, 4)), 2, expected_nm(W.detach(), 1, 4, 2)),
        "4:8": (ScopeSpec(BlockSpec(W, (1, 2)), (1, 4)), 2, expected_nm(W.detach(), 2, 4, 2)),
        "coupled 2:4": (
            ScopeSpec(BlockSpec(View(W, (M, K // 16, 8, 2), (K, 16, 1, 8)), (1, 1, 1, 2)), (1, 1, 4, 1)),
            2,
            expected_coupled_24(W.detach()),
        ),
        "16-col row-coupled": (
            ScopeSpec(BlockSpec(View(W, (M // 16, 2, 8 * K), (16 * K, 8 * K, 1)), (1, 1, 16)), (1, 2, 1)),
            1,
            expected_block16(W.detach()),
        ),
    }


@pytest.mark.parametrize("name", ["2:4", "4:8", "coupled 2:4", "16-col row-coupled"])
@pytest.mark.parametrize("device", DEVICES)
def test_spec_patterns_match_hand_built_masks(name, device):
    W = torch.nn.Parameter(torch.randn(M, K, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device))
    original = W.detach().clone()
    scope, nnz, expected = pattern_scopes(W)[name]
    masks = scope.get_masks(nnz)
    (spec,) = masks
    assert torch.equal(param_mask(spec, masks[spec]).cpu(), expected)
    scope.hard_threshold(nnz=nnz)
    assert torch.equal((W.detach() == 0).cpu(), expected)
    assert torch.equal(W.detach()[~expected.to(device)], original[~expected.to(device)])
    kept = (~expected).sum().item()
    assert kept == {"2:4": M * K // 2, "4:8": M * K // 2, "coupled 2:4": M * K // 2, "16-col row-coupled": M * K // 2}[name]


def test_readme_quick_example():
    W = torch.nn.Parameter(torch.randn(16, 32))
    block = BlockSpec(W, shape=(1, 1))
    scope = ScopeSpec(block, shape=(1, 4))
    scope.hard_threshold(nnz=2)
    assert torch.equal((W != 0).reshape(16, 8, 4).sum(-1), torch.full((16, 8), 2))


# ---------------------------------------------------------------- ScopeCoupling
def coupled_pair(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    A = torch.nn.Parameter(torch.randn(4, 8, generator=g, dtype=torch.float64).to(device))
    B = torch.nn.Parameter(torch.randn(2, 16, generator=g, dtype=torch.float64).to(device))
    sa = ScopeSpec(BlockSpec(A, (1, 1), name="a"), (1, 4), name="sa")  # scope grid (4, 2), 4 blocks each
    sb = ScopeSpec(BlockSpec(B, (1, 2), name="b"), (1, 2), name="sb")  # scope grid (2, 4), 2 blocks each
    return A, B, sa, sb, ScopeCoupling([sa, sb], [(0, 1), (1, 0)], name="joint")


def hand_joint_blocks(A, B, r, g):
    """The 6 blocks of coupled scope (r, g): A's scope (r, g), then B's scope (g, r), as index lists."""
    a = [("A", (r, 4 * g + k)) for k in range(4)]
    b = [("B", (g, [4 * r + 2 * k, 4 * r + 2 * k + 1])) for k in range(2)]
    return a + b


def block_norm(A, B, block):
    tensor = A if block[0] == "A" else B
    row, cols = block[1]
    return tensor.detach()[row, cols].norm().item()


def test_scope_coupling_structure_and_layout():
    A, B, sa, sb, c = coupled_pair()
    assert c.grid_shape == (4, 2) and c.numblk_per_scope() == 6 and c.numscopes() == 8
    assert c.scopes == (sa, sb) and c.members == (sa, sb) and c.orders == [(0, 1), (1, 0)]
    assert [s.name for s in c.block_specs()] == ["a", "b"] and len(c.parameters()) == 2
    assert list(c) == [sa, sb] and len(c) == 2 and "'joint'" in repr(c)
    norms = c.block_norms()
    assert norms.shape == (4, 2, 6)
    for r, g in itertools.product(range(4), range(2)):
        expected = [block_norm(A, B, blk) for blk in hand_joint_blocks(A, B, r, g)]
        torch.testing.assert_close(norms[r, g], torch.tensor(expected, dtype=torch.float64))
    per_member = c.scope_to_block(norms)
    torch.testing.assert_close(per_member[sa], sa.block.norms())
    torch.testing.assert_close(per_member[sb], sb.block.norms())
    torch.testing.assert_close(c.block_to_scope(per_member), norms)
    torch.testing.assert_close(c.block_to_scope({sa.block: per_member[sa], sb: per_member[sb]}), norms)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nnz", [0, 1, 3, 6])
def test_scope_coupling_joint_budget(device, nnz):
    A, B, sa, sb, c = coupled_pair(seed=nnz, device=device)
    A0, B0 = A.detach().cpu().clone(), B.detach().cpu().clone()
    masks = c.get_masks(nnz)
    pruned = c.hard_threshold(nnz=nnz)
    assert set(pruned) == {sa, sb}
    assert set(masks) == {sa.block, sb.block}
    assert torch.equal(masks[sa.block], A.detach() == 0) and torch.equal(masks[sb.block], B.detach() == 0)
    for r, g in itertools.product(range(4), range(2)):
        blocks = hand_joint_blocks(A0, B0, r, g)
        ranked = sorted(range(6), key=lambda k: -block_norm(A0, B0, blocks[k]))
        for k, blk in enumerate(blocks):
            tensor = (A if blk[0] == "A" else B).detach().cpu()
            zero = bool((tensor[blk[1][0], blk[1][1]] == 0).all())
            assert zero == (k not in ranked[:nnz])
    assert torch.equal(c.nnz_per_scope().cpu(), torch.full((4, 2), nnz))


def test_scope_coupling_ties_and_thresholds():
    A = torch.ones(4, 8)
    B = torch.ones(2, 16)
    sa = ScopeSpec(BlockSpec(A, (1, 1)), (1, 4))
    sb = ScopeSpec(BlockSpec(B, (1, 1)), (1, 4))  # norm 1 blocks too: all six... eight tie
    c = ScopeCoupling([sa, sb], [None, (1, 0)])
    c.hard_threshold(nnz=3)
    assert (A != 0).sum() + (B != 0).sum() == 8 * 3
    assert torch.all(A.reshape(4, 2, 4)[..., :3] == 1)  # ties go to the first member's earlier blocks
    A2, B2, sa2, sb2, c2 = coupled_pair(seed=5)
    norms = c2.block_norms()
    t = norms.median(dim=-1).values
    c2.hard_threshold(thresholds=t)
    assert torch.equal(c2.block_norms() == 0, norms < t[..., None])


def test_scope_coupling_soft_threshold_and_masks_from_scores():
    A, B, sa, sb, c = coupled_pair(seed=3)
    norms = c.block_norms()
    c.soft_threshold(0.4)
    after = c.block_norms()
    assert torch.all(after[norms <= 0.4] == 0)
    torch.testing.assert_close(after[norms > 0.4], norms[norms > 0.4] - 0.4)
    h = {sa.block: torch.rand(4, 8, dtype=torch.float64) + 0.5, sb.block: torch.rand(2, 16, dtype=torch.float64) + 0.5}
    c.soft_threshold(0.1, conditioners=h)
    scores = torch.arange(48.0).reshape(4, 2, 6)  # the last block of every joint scope wins
    masks = c.get_masks(1, block_scores=scores)
    assert masks[sa.block].sum() == 32 and masks[sb.block].sum() == 16
    assert masks[sb.block].reshape(2, 8, 2)[:, 1::2].logical_not().all()
    block_masks = c.pruned_block_mask(1, block_scores={sa: torch.zeros(4, 8), sb: torch.ones(2, 8)})
    assert block_masks[sa].all() and block_masks[sb].sum() == 8
    joint_mask = torch.zeros(4, 2, 6, dtype=torch.bool)
    assert not any(m.any() for m in c.get_masks(block_mask=joint_mask).values())


def test_scope_coupling_errors():
    A, B, sa, sb, _ = coupled_pair()
    with pytest.raises(CouplingError, match=r"'sa'.*'sb'.*\(4, 2\) and \(2, 4\)"):
        ScopeCoupling([sa, sb])
    with pytest.raises(CouplingError, match="decided by two members"):
        ScopeCoupling([sa, ScopeSpec(sa.block, (1, 4))])
    with pytest.raises(ArgumentTypeError, match=r"`scopes`\[1\]"):
        ScopeCoupling([sa, sb.block])
    with pytest.raises(SpecError, match="one entry per scope"):
        ScopeCoupling([sa, sb], [(0, 1)])
    with pytest.raises(SpecError, match="at least one"):
        ScopeCoupling([])
    c = ScopeCoupling([sa, sb], [(0, 1), (1, 0)])
    before = (A.detach().clone(), B.detach().clone())
    with pytest.raises(SpecError, match=r"`nnz` must be in \[0, 6\]"):
        c.hard_threshold(nnz=7)
    with pytest.raises(ShapeMismatchError, match="joint scope layout"):
        c.get_masks(2, block_scores=torch.zeros(4, 2, 5))
    with pytest.raises(SpecError, match="no entry"):
        c.get_masks(2, values={sa.block: torch.ones(4, 8)})
    bad_h = {sa.block: torch.ones(4, 8), sb.block: -torch.ones(2, 16)}
    with pytest.raises(SpecError, match="`conditioners` must be >= 0"):
        c.soft_threshold(0.1, conditioners=bad_h)
    with pytest.raises(ArgumentTypeError, match="mapping"):
        c.block_to_scope(torch.zeros(4, 2, 6))
    assert torch.equal(A.detach(), before[0]) and torch.equal(B.detach(), before[1])


def test_scope_over_a_block_coupling():
    """W_up rows coupled with W_down columns; half of the neurons kept."""
    F, D = 8, 4
    up = torch.nn.Parameter(torch.randn(F, D, dtype=torch.float64))
    down = torch.nn.Parameter(torch.randn(D, F, dtype=torch.float64))
    rows, cols = BlockSpec(up, (1, -1)), BlockSpec(down, (-1, 1))
    neurons = BlockCoupling([rows, cols], [(0, 1), (1, 0)])
    scope = ScopeSpec(neurons, (-1,))
    union = torch.cat([up.detach(), down.detach().t()], 1).norm(dim=1)
    keep = union.topk(4).indices
    masks = scope.get_masks(4)
    scope.hard_threshold(nnz=4)
    alive = (up.detach() != 0).all(1)
    assert torch.equal(alive, (down.detach() != 0).all(0))
    assert sorted(alive.nonzero().flatten().tolist()) == sorted(keep.tolist())
    assert torch.equal(masks[rows], up.detach() == 0) and torch.equal(masks[cols], down.detach() == 0)
    assert blocked(up.detach(), (1, D)).shape == (F, 1, D)
