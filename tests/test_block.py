"""BlockSpec and BlockCoupling: grids, statistics, masks, multipliers, thresholds and their errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s3sparse import ops
from s3sparse.block import BlockCoupling, BlockSpec, SparseBlock
from s3sparse.errors import ArgumentError, ArgumentTypeError, CouplingError, ShapeMismatchError, SpecError
from s3sparse.view import View

from spec_utils import DEVICES, blocked, plain_block_stat, spread, strided_cases

SETTINGS = settings(max_examples=50, deadline=None)


def spec_of(case, device="cpu") -> BlockSpec:
    param = case.param if device == "cpu" else torch.nn.Parameter(case.param.detach().to(device))
    return BlockSpec(View(param, case.shape, case.stride, case.offset), case.block)


def up_down(F=6, D=4, dtype=torch.float64, device="cpu", seed=0):
    """W_up (F, D) rows coupled with W_down (D, F) columns."""
    g = torch.Generator().manual_seed(seed)
    up = torch.nn.Parameter(torch.randn(F, D, generator=g, dtype=dtype).to(device))
    down = torch.nn.Parameter(torch.randn(D, F, generator=g, dtype=dtype).to(device))
    rows, cols = BlockSpec(up, (1, -1), name="up"), BlockSpec(down, (-1, 1), name="down")
    return up, down, rows, cols, BlockCoupling([rows, cols], [(0, 1), (1, 0)], name="neurons")


# ---------------------------------------------------------------- BlockSpec structure
def test_block_shape_normalization():
    W = torch.randn(8, 12)
    assert BlockSpec(W, (-1, 3)).shape == (8, 3)
    assert BlockSpec(W, ()).shape == (1, 1)
    b = BlockSpec(W, (2, 4), name="b")
    assert isinstance(b.view, View) and b.view.param is W
    assert b.grid_shape == (4, 3) and b.grid_ndim == 2 and b.ndim == 2
    assert b.numblk() == 12 and b.numel_per_block() == 8 and b.numel() == 96
    assert b.parameters() == [b.view] and b.block_specs() == (b,) and b.blocks() == [b]
    assert b.param is W and b.name == "b"
    assert repr(b) == str(b) and "grid_shape=(4, 3)" in repr(b) and "'b'" in repr(b)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 4), r"`shape`\[0\] = 3 does not divide dim 0 of the view \(8, 12\) \(size 8\); sizes that divide it: 1, 2, 4, 8"),
        ((2, 5), r"`shape`\[1\] = 5 does not divide dim 1 .*size 12.*1, 2, 3, 4, 6, 12"),
        ((2,), r"`shape` \(2,\) has 1 dims but the view \(8, 12\) has 2"),
        ((2, 2, 2), "has 3 dims"),
        ((0, 2), r"`shape`\[0\] must be a positive int or -1"),
        ((-2, 2), r"`shape`\[0\] must be a positive int or -1"),
    ],
)
def test_bad_block_shapes(shape, match):
    with pytest.raises(ArgumentError, match=match):
        BlockSpec(torch.randn(8, 12), shape)


def test_equality_and_hashing_by_parameter_identity():
    W = torch.randn(4, 8)
    assert BlockSpec(W, (1, 2)) == BlockSpec(W, (1, 2), name="other name")
    assert hash(BlockSpec(W, (1, 2))) == hash(BlockSpec(W, (1, 2)))
    assert BlockSpec(W, (1, 2)) != BlockSpec(W, (1, 4))
    assert BlockSpec(W, (1, 2)) != BlockSpec(W.clone(), (1, 2))
    assert {BlockSpec(W, (1, 2)): 1}[BlockSpec(W, (1, 2))] == 1


def test_data_set_data_nnz():
    W = torch.nn.Parameter(torch.randn(4, 16))
    b = BlockSpec(View(W, (4, 8), (16, 2), 1), (1, 4))
    assert torch.equal(b.data, W.detach()[:, 1::2])
    b.set_data(torch.zeros(4, 8))
    assert torch.all(W[:, 1::2] == 0) and torch.all(W[:, ::2] != 0)
    assert b.nnz() == 0
    b.set_data({b: torch.ones(4, 16)})  # parameter-shaped, through the mapping
    assert b.nnz() == 32 and torch.all(W[:, 1::2] == 1)
    assert b.nnz(eps=1.0) == 0
    with pytest.raises(ShapeMismatchError, match="`data`"):
        b.set_data(torch.ones(3, 3))


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=strided_cases(), p=st.sampled_from([1, 2, 3, float("inf")]))
def test_statistics_equal_plain_torch_on_the_materialised_view(device, case, p):
    b = spec_of(case, device)
    data = case.materialised()
    torch.testing.assert_close(b.norms(p=p).cpu(), plain_block_stat(data, case.block, "norm", p))
    torch.testing.assert_close(b.min().cpu(), plain_block_stat(data, case.block, "min"))
    torch.testing.assert_close(b.max().cpu(), plain_block_stat(data, case.block, "max"))
    torch.testing.assert_close(b.sum().cpu(), plain_block_stat(data, case.block, "sum"))
    # Other values: view-shaped, parameter-shaped, or through a mapping.
    other = torch.randn(case.param.shape, dtype=torch.float64)
    other_view = torch.as_strided(other, case.shape, case.stride, case.offset)
    expected = plain_block_stat(other_view, case.block, "norm")
    torch.testing.assert_close(b.norms(other.to(device)).cpu(), expected)
    torch.testing.assert_close(b.norms(other_view.contiguous().to(device)).cpu(), expected)
    torch.testing.assert_close(b.norms({b: other.to(device)}).cpu(), expected)


def test_statistics_do_not_copy_the_view(monkeypatch):
    W = torch.nn.Parameter(torch.randn(16, 32))
    b = BlockSpec(View(W, (16, 2, 8, 2), (32, 16, 1, 8)), (1, 1, 1, 2))
    pointers = []
    real = ops.block_reduce
    monkeypatch.setattr(ops, "block_reduce", lambda x, *a, **k: pointers.append(x.data_ptr()) or real(x, *a, **k))
    b.norms()
    b.max()
    assert pointers == [W.data_ptr(), W.data_ptr()]


def test_reduce_with_a_callable_and_block_view():
    W = torch.arange(48.0).reshape(6, 8)
    b = BlockSpec(W, (2, 4))
    medians = b.reduce(None, lambda t: t.median(dim=-1).values)
    assert torch.equal(medians, blocked(W, (2, 4)).median(-1).values)
    assert b.reduce(W * 2, lambda t: t.amax(-1, keepdim=True)).shape == (3, 2)
    with pytest.raises(ShapeMismatchError, match="the result of `fn`"):
        b.reduce(None, lambda t: t)
    assert torch.equal(b.block_view(merge=True), blocked(W, (2, 4)))
    assert b.block_view(reorder=False).shape == (3, 2, 2, 4)
    assert b.block_view().shape == (3, 2, 2, 4)
    b.block_view()[0, 1].fill_(-1)  # the live data's reordered block view writes through
    assert torch.all(W[0:2, 4:8] == -1)


def test_expand_and_broadcast_block_tensors():
    b = BlockSpec(torch.randn(4, 6), (2, 3))
    values = torch.arange(4.0)
    assert b.expand_block_tensor(values).shape == (2, 2)
    with pytest.raises(ShapeMismatchError, match="`block_values`"):
        b.expand_block_tensor(torch.arange(5.0))
    grid = values.reshape(2, 2)
    assert torch.equal(b.broadcast_block_to_element(grid), spread(grid, (2, 3)))
    assert b.broadcast_block_to_element(grid, fake=True).shape == (2, 1, 2, 1)
    with pytest.raises(ShapeMismatchError, match="`block_values`"):
        b.broadcast_block_to_element(values)


# ---------------------------------------------------------------- mutations
@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=strided_cases(), seed=st.integers(0, 10_000))
def test_masks_and_multipliers_write_through_to_the_parameter(device, case, seed):
    b = spec_of(case, device)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b.grid_shape, generator=g) < 0.5
    before = b.view.param.detach().clone()
    b.apply_mask(mask.to(device))
    elements = b.get_masks(mask.to(device))[b]
    assert torch.equal(elements.cpu(), spread(mask, b.shape))
    assert torch.all(b.data[elements] == 0)
    assert torch.equal(b.data[~elements], torch.as_strided(before, case.shape, case.stride, case.offset)[~elements])
    # Elements outside the view are untouched.
    outside = torch.ones_like(before, dtype=torch.bool)
    torch.as_strided(outside, case.shape, case.stride, case.offset).fill_(False)
    assert torch.equal(b.view.param.detach()[outside], before[outside])
    multiplier = torch.rand(b.grid_shape, generator=g, dtype=torch.float64)
    expected = b.data * spread(multiplier.to(device), b.shape)
    b.apply_multiplier(multiplier.to(device))
    torch.testing.assert_close(b.data, expected)
    b.apply_multiplier(0.5)
    torch.testing.assert_close(b.data, expected * 0.5)


@SETTINGS
@given(case=strided_cases(), seed=st.integers(0, 10_000))
def test_hard_threshold_zeroes_blocks_below_threshold(case, seed):
    b = spec_of(case)
    norms = b.norms()
    thresholds = norms * torch.rand(b.grid_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    pruned = b.hard_threshold(thresholds)
    assert torch.equal(pruned, norms < thresholds)
    assert torch.all(b.norms()[pruned] == 0)
    assert torch.equal(b.norms()[~pruned], norms[~pruned])


@SETTINGS
@given(case=strided_cases(), seed=st.integers(0, 10_000))
def test_euclidean_soft_threshold(case, seed):
    b = spec_of(case)
    norms = b.norms()
    t = norms * torch.rand(b.grid_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    direction = blocked(b.data, b.shape) / norms[..., None].clamp_min(1e-300)
    b.soft_threshold(t)
    after = b.norms()
    zeroed = norms <= t
    assert torch.all(after[zeroed] == 0)
    torch.testing.assert_close(after[~zeroed], norms[~zeroed] - t[~zeroed])
    # Shrinking keeps each block's direction.
    torch.testing.assert_close(blocked(b.data, b.shape)[~zeroed], (direction * after[..., None])[~zeroed])


def check_conditioned_step(before: torch.Tensor, after: torch.Tensor, h: torch.Tensor, t: torch.Tensor, atol: float):
    """``before``/``after``/``h`` as ``(*grid, E)``: every survivor is ``h/(h+mu) w`` with ``mu ||hw/(h+mu)|| = t``."""
    hw_norm = torch.linalg.vector_norm(h * before, dim=-1)
    zeroed = hw_norm <= t
    assert torch.all(after[zeroed] == 0)
    survivors = (~zeroed).nonzero()
    for idx in survivors.tolist():
        w, w_new, hh, tt = before[tuple(idx)], after[tuple(idx)], h[tuple(idx)], t[tuple(idx)]
        k = int((w.abs() * hh).argmax())  # recover mu from the element moved the most reliably
        mu = hh[k] * (w[k] / w_new[k] - 1)
        torch.testing.assert_close(w_new, hh / (hh + mu) * w, rtol=1e-9, atol=1e-12)
        phi = mu * torch.linalg.vector_norm(hh * w / (hh + mu))
        assert abs(float(phi - tt)) <= atol


@SETTINGS
@given(case=strided_cases(), seed=st.integers(0, 10_000))
def test_conditioned_soft_threshold_solves_the_secular_equation(case, seed):
    b = spec_of(case)
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(case.param.shape, generator=g, dtype=torch.float64) + 0.05
    before = blocked(b.data, b.shape)
    h_blocks = blocked(b.view.resolve(h), b.shape)
    hw_norm = torch.linalg.vector_norm(h_blocks * before, dim=-1)
    t = hw_norm * torch.rand(b.grid_shape, generator=g, dtype=torch.float64) * 1.5
    b.soft_threshold(t, conditioners=h, max_iter=200, atol=1e-10)
    check_conditioned_step(before, blocked(b.data, b.shape), h_blocks, t, atol=1e-9)


def test_conditioned_soft_threshold_with_a_constant_conditioner_is_euclidean():
    W = torch.randn(6, 8, dtype=torch.float64)
    b = BlockSpec(W.clone(), (1, 4))
    reference = BlockSpec(W.clone(), (1, 4))
    b.soft_threshold(0.7, conditioners=torch.full((6, 8), 2.0, dtype=torch.float64))
    reference.soft_threshold(0.7 / 2.0)
    torch.testing.assert_close(b.data, reference.data)


def test_zero_threshold_changes_nothing():
    W = torch.randn(6, 8, dtype=torch.float64)
    b = BlockSpec(W.clone(), (2, 2))
    b.soft_threshold(0.0)
    assert torch.equal(b.data, W)
    h = torch.rand(6, 8, dtype=torch.float64)
    h[0] = 0
    b.soft_threshold(0.0, conditioners=h)
    assert torch.equal(b.data, W)


# ---------------------------------------------------------------- argument errors leave the parameter unchanged
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda b: b.apply_mask(torch.zeros(4, 2, dtype=torch.bool)), ShapeMismatchError, r"`mask`: expected shape \(4, 4\)"),
        (lambda b: b.apply_mask(torch.zeros(4, 4)), ArgumentTypeError, "`mask` must be a bool tensor"),
        (lambda b: b.apply_multiplier(torch.ones(3, 4)), ShapeMismatchError, "`multiplier`"),
        (lambda b: b.apply_multiplier("2"), ArgumentTypeError, "`multiplier`"),
        (lambda b: b.hard_threshold(torch.ones(2, 2)), ShapeMismatchError, "`thresholds`"),
        (lambda b: b.hard_threshold(1.0, values=torch.ones(5, 5)), ShapeMismatchError, "`values`"),
        (lambda b: b.soft_threshold(-1.0), SpecError, "`thresholds` must be >= 0"),
        (lambda b: b.soft_threshold(1.0, conditioners=-torch.ones(4, 8)), SpecError, "`conditioners` must be >= 0"),
        (lambda b: b.soft_threshold(1.0, conditioners=torch.ones(2, 2)), ShapeMismatchError, "`conditioners`"),
        (lambda b: b.soft_threshold(1.0, max_iter=-1), SpecError, "`max_iter`"),
        (lambda b: b.get_masks(torch.ones(4, 4)), ArgumentTypeError, "`block_mask`"),
        (lambda b: b.norms({}), SpecError, "`values` has no entry"),
    ],
)
def test_bad_arguments_raise_and_leave_the_parameter_unchanged(call, error, match):
    W = torch.nn.Parameter(torch.randn(4, 8))
    before = W.detach().clone()
    b = BlockSpec(W, (1, 2))
    with pytest.raises(error, match=match):
        call(b)
    assert torch.equal(W.detach(), before)


# ---------------------------------------------------------------- BlockCoupling
def test_coupling_structure():
    up, down, rows, cols, c = up_down()
    assert c.grid_shape == (6, 1) and c.specs == (rows, cols) and c.block_specs() == (rows, cols)
    assert c.orders == [(0, 1), (1, 0)]
    assert c.numel_per_block() == 8 and c.numblk() == 6 and c.numel() == 48
    assert c.parameters() == [rows.view, cols.view]
    assert set(c.data) == {rows, cols} and torch.equal(c.data[cols], down.detach())
    assert list(c) == [rows, cols] and len(c) == 2
    assert "neurons" in repr(c) and "grid_shape=(6, 1)" in repr(c)
    assert c == BlockCoupling([rows, cols], [(0, 1), (1, 0)])
    assert hash(c) == hash(BlockCoupling([rows, cols], [(0, 1), (1, 0)]))
    assert BlockCoupling([rows]).grid_shape == (6, 1)
    assert BlockCoupling([rows, cols], [None, (-1, 0)]).orders == [(0, 1), (1, 0)]


def test_coupling_errors_name_the_specs_and_grids():
    up, down, rows, cols, _ = up_down()
    with pytest.raises(CouplingError, match=r"'up'.*'down'.*\(6, 1\) and \(1, 6\)"):
        BlockCoupling([rows, cols])
    with pytest.raises(CouplingError, match="repeats"):
        BlockCoupling([rows, BlockSpec(up, (1, -1))], [(0, 1), (0, 1)])
    with pytest.raises(SpecError, match=r"`orders\[1\]` must be a permutation"):
        BlockCoupling([rows, cols], [(0, 1), (1, 1)])
    with pytest.raises(SpecError, match="one entry per spec"):
        BlockCoupling([rows, cols], [(0, 1)])
    with pytest.raises(ArgumentTypeError, match=r"`specs`\[0\]"):
        BlockCoupling([up])
    with pytest.raises(SpecError, match="at least one"):
        BlockCoupling([])


@pytest.mark.parametrize("device", DEVICES)
def test_coupled_statistics_are_over_the_union(device):
    up, down, rows, cols, c = up_down(device=device)
    union = torch.cat([up.detach(), down.detach().t()], dim=1)  # row f: W_up[f, :] and W_down[:, f]
    torch.testing.assert_close(c.norms().flatten(), union.norm(dim=1))
    torch.testing.assert_close(c.norms(p=1).flatten(), union.norm(p=1, dim=1))
    torch.testing.assert_close(c.norms(p=float("inf")).flatten(), union.abs().amax(1))
    torch.testing.assert_close(c.min().flatten(), union.amin(1))
    torch.testing.assert_close(c.max().flatten(), union.amax(1))
    torch.testing.assert_close(c.sum().flatten(), union.sum(1))
    torch.testing.assert_close(c.block_view().reshape(6, 8), union)
    torch.testing.assert_close(c.reduce(None, lambda t: t.abs().sum(-1)).flatten(), union.abs().sum(1))
    values = {rows: torch.ones_like(up), cols: torch.ones_like(down)}
    torch.testing.assert_close(c.norms(values).flatten().cpu(), torch.full((6,), 8**0.5, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_coupled_blocks_are_masked_and_scaled_together(device):
    up, down, rows, cols, c = up_down(device=device)
    mask = torch.tensor([True, False, True, False, False, True], device=device).reshape(6, 1)
    masks = c.get_masks(mask)
    assert torch.equal(masks[rows], mask.expand(6, 4)) and torch.equal(masks[cols], mask.t().expand(4, 6))
    c.apply_mask(mask)
    assert torch.equal(up.detach() == 0, masks[rows]) and torch.equal(down.detach() == 0, masks[cols])
    before_up, before_down = up.detach().clone(), down.detach().clone()
    m = torch.arange(6.0, device=device, dtype=torch.float64).reshape(6, 1)
    c.apply_multiplier(m)
    torch.testing.assert_close(up.detach(), before_up * m)
    torch.testing.assert_close(down.detach(), before_down * m.t())
    element = c.broadcast_block_to_element(m)
    assert element[rows].shape == (6, 4) and element[cols].shape == (4, 6)


def test_coupled_thresholds_prune_and_shrink_the_union():
    up, down, rows, cols, c = up_down(F=8, D=5)
    norms = c.norms()
    t = norms.median()
    pruned = c.hard_threshold(t)
    assert torch.equal(pruned, norms < t)
    assert torch.all((up.detach() == 0).all(1) == pruned.flatten())
    assert torch.all((down.detach() == 0).all(0) == pruned.flatten())
    up, down, rows, cols, c = up_down(F=8, D=5, seed=1)
    norms = c.norms()
    t = norms.flatten().sort().values[3]
    c.soft_threshold(t)
    after = c.norms()
    assert torch.all(after[norms <= t] == 0)
    torch.testing.assert_close(after[norms > t], norms[norms > t] - t)


def test_coupled_conditioned_soft_threshold():
    up, down, rows, cols, c = up_down(F=8, D=5, seed=2)
    g = torch.Generator().manual_seed(3)
    h = {rows: torch.rand(8, 5, generator=g, dtype=torch.float64) + 0.1,
         cols: torch.rand(5, 8, generator=g, dtype=torch.float64) + 0.1}
    before = c.block_view()
    h_blocks = c.block_view(h)
    t = torch.linalg.vector_norm(h_blocks * before, dim=-1) * torch.linspace(0.1, 1.4, 8, dtype=torch.float64)[:, None]
    c.soft_threshold(t, conditioners=h, max_iter=200, atol=1e-10)
    check_conditioned_step(before, c.block_view(), h_blocks, t, atol=1e-9)


def test_coupling_values_and_errors_leave_parameters_unchanged():
    up, down, rows, cols, c = up_down()
    before = (up.detach().clone(), down.detach().clone())
    with pytest.raises(ArgumentTypeError, match="mapping"):
        c.norms(torch.ones(6, 4))
    with pytest.raises(SpecError, match="no entry for the member"):
        c.norms({rows: torch.ones(6, 4)})
    with pytest.raises(ShapeMismatchError, match="`mask`"):
        c.apply_mask(torch.zeros(1, 6, dtype=torch.bool))
    with pytest.raises(ShapeMismatchError, match="`data`"):
        c.set_data({rows: torch.zeros(6, 4), cols: torch.zeros(3, 3)})
    bad_h = {rows: torch.ones(6, 4), cols: -torch.ones(4, 6)}  # the second member is bad
    with pytest.raises(SpecError, match="`conditioners` must be >= 0"):
        c.soft_threshold(0.1, conditioners=bad_h)
    assert torch.equal(up.detach(), before[0]) and torch.equal(down.detach(), before[1])
    c.set_data({rows: torch.zeros(6, 4), cols: None})
    assert c.nnz() == rows.nnz() + cols.nnz() == 24


def test_same_parameter_coupling_with_strided_views():
    """Columns j and j+8 of every 16-column tile as two specs of one parameter, coupled."""
    W = torch.nn.Parameter(torch.randn(4, 32, dtype=torch.float64))
    low = BlockSpec(View(W, (4, 2, 8), (32, 16, 1)), (1, 1, 1))
    high = BlockSpec(View(W, (4, 2, 8), (32, 16, 1), offset=8), (1, 1, 1))
    c = BlockCoupling([low, high])
    pairs = W.detach().reshape(4, 2, 2, 8)  # (row, tile, half, j)
    torch.testing.assert_close(c.norms(), pairs.norm(dim=2))
    mask = c.norms() < c.norms().median()
    c.apply_mask(mask)
    assert torch.equal((W.detach().reshape(4, 2, 2, 8) == 0).all(2), mask)


def test_is_a_sparse_block():
    assert issubclass(BlockSpec, SparseBlock) and issubclass(BlockCoupling, SparseBlock)
    with pytest.raises(TypeError):
        SparseBlock()  # abstract
    assert math.prod(BlockSpec(torch.randn(2, 3), ()).grid_shape) == 6
