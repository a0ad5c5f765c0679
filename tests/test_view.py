"""View: construction, validation, live data, index maps, layout helpers and the strided block primitives."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s3sparse import ops
from s3sparse.errors import ArgumentIndexError, ArgumentTypeError, S3Error, ShapeMismatchError, SpecError
from s3sparse.view import View, reduce_blocks, scale_blocks_

from spec_utils import DEVICES, plain_block_stat, spread, strided_cases

SETTINGS = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------- construction
def test_attributes_and_geometry():
    W = torch.nn.Parameter(torch.randn(4, 32))
    v = View(W, [4, 2, 8, 2], [32, 16, 1, 8])
    assert v.param is W
    assert v.shape == (4, 2, 8, 2) and isinstance(v.shape, tuple)
    assert v.stride == (32, 16, 1, 8) and isinstance(v.stride, tuple)
    assert v.offset == 0 and v.ndim == 4 and v.numel() == 128
    assert v.cosize == 3 * 32 + 16 + 7 + 8 + 1 == 128
    assert v.dtype == W.dtype and v.device == W.device
    assert not v.is_identity() and View.from_existing(W).is_identity()
    assert View(W, (2, 3), (32, 1), offset=5).cosize == 5 + 32 + 2 + 1
    assert View(W, (0, 3), (32, 1)).cosize == 0
    assert "shape=(4, 2, 8, 2)" in repr(v)


def test_data_is_live_and_detached_tensor_is_tracked():
    W = torch.nn.Parameter(torch.arange(1.0, 65.0).reshape(4, 16))
    v = View(W, (4, 8), (16, 2), offset=1)  # the odd columns
    assert torch.equal(v.data, W.detach()[:, 1::2])
    assert not v.data.requires_grad
    v.data.mul_(0)  # outside no_grad: the live data is detached, so this is allowed
    assert torch.all(W[:, 1::2] == 0) and torch.all(W[:, ::2] != 0)
    loss = v.tensor().pow(2).sum() + (W[:, ::2] * 0).sum()
    loss.backward()
    assert W.grad is not None and torch.all(W.grad[:, 1::2] == 0)


def test_from_existing():
    W = torch.nn.Parameter(torch.randn(3, 5))
    v = View.from_existing(W)
    assert v.param is W and v.shape == (3, 5) and v.stride == (5, 1) and v.offset == 0
    assert View.from_existing(v) is v
    Wt = torch.randn(5, 3).t()  # non-contiguous
    vt = View.from_existing(Wt)
    assert vt.stride == (1, 3) and torch.equal(vt.data, Wt)
    with pytest.raises(ArgumentTypeError, match="View, Tensor or Parameter"):
        View.from_existing([1, 2])


def test_equality_and_hash_by_parameter_identity_and_geometry():
    W = torch.randn(4, 4)
    assert View(W, (4, 4), (4, 1)) == View(W, (4, 4), (4, 1))
    assert len({View(W, (4, 4), (4, 1)), View(W, (4, 4), (4, 1))}) == 1
    assert View(W, (4, 4), (4, 1)) != View(W, (4, 4), (1, 4))
    assert View(W, (4, 4), (4, 1)) != View(W.clone(), (4, 4), (4, 1))


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "shape, stride, offset, match",
    [
        ((2, 2), (1, 1), 0, r"overlaps itself: indices \(0, 1\) and \(1, 0\).*`stride`"),
        ((4, 3), (0, 1), 0, "overlaps itself"),
        ((3, 5), (4, 1), 0, "overlaps itself"),
        ((4, 9), (8, 1), 0, "reaches element offset 32, past the parameter"),
        ((4, 8), (8, 1), 1, "past the parameter"),
        ((2, 2), (-1, 1), 0, "`stride` must be non-negative"),
        ((2, -2), (2, 1), 0, "`shape` must be non-negative"),
        ((2, 2), (2, 1), -1, "`offset` must be >= 0"),
        ((2, 2), (2,), 0, "`stride` must have one entry per dim of `shape`"),
    ],
)
def test_bad_views_are_refused_with_the_argument_named(shape, stride, offset, match):
    W = torch.randn(4, 8)
    before = W.clone()
    with pytest.raises(SpecError, match=match) as info:
        View(W, shape, stride, offset)
    assert isinstance(info.value, S3Error) and isinstance(info.value, ValueError)
    assert torch.equal(W, before)


def test_bad_argument_types():
    W = torch.randn(4, 8)
    with pytest.raises(ArgumentTypeError, match="`param`"):
        View(W.tolist(), (4, 8), (8, 1))
    with pytest.raises(ArgumentTypeError, match="`offset`"):
        View(W, (4, 8), (8, 1), offset=1.5)
    with pytest.raises(ArgumentTypeError, match="`shape`"):
        View(W, 4, (8, 1))


def test_non_overlapping_views_failing_the_fast_test_are_accepted():
    W = torch.randn(16)
    v = View(W, (3, 2), (2, 3))  # offsets 0 3 2 5 4 7: distinct, yet stride 3 < span 4 of the stride-2 dim
    assert sorted(v.all_offsets().tolist()) == [0, 2, 3, 4, 5, 7]


def test_parameter_with_gaps_is_checked_element_by_element():
    base = torch.randn(4, 16)
    sliced = base[:, ::2]  # strides (16, 2): a parameter with gaps
    View(sliced, (4, 4), (16, 4))  # every other column of the slice: inside
    with pytest.raises(SpecError, match="not an element of the parameter"):
        View(sliced, (4, 8), (16, 1))  # would read the columns between


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    stride=st.lists(st.integers(0, 6), min_size=3, max_size=3),
    offset=st.integers(0, 4),
)
def test_validation_agrees_with_brute_force(shape, stride, offset):
    W = torch.randn(20)
    stride = stride[: len(shape)]
    offsets = [offset + sum(i * s for i, s in zip(idx, stride)) for idx in itertools.product(*map(range, shape))]
    valid = len(set(offsets)) == len(offsets) and all(o < 20 for o in offsets)
    if valid:
        v = View(W, shape, stride, offset)
        assert sorted(v.all_offsets().tolist()) == sorted(offsets)
    else:
        with pytest.raises(SpecError):
            View(W, shape, stride, offset)


@SETTINGS
@given(case=strided_cases())
def test_views_built_by_torch_are_accepted_and_live(case):
    v = View(case.param, case.shape, case.stride, case.offset)
    assert torch.equal(v.data, case.materialised())
    with torch.no_grad():
        v.data.add_(1000.0)
    assert torch.equal(case.materialised(), v.data)
    assert int((case.param.detach() >= 500).sum()) == v.numel()


# ---------------------------------------------------------------- index maps
@SETTINGS
@given(case=strided_cases(), seed=st.integers(0, 1000))
def test_linear_offset_and_param_indices(case, seed):
    v = View(case.param, case.shape, case.stride, case.offset)
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randint(0, s, (5,), generator=g) for s in v.shape], dim=-1)
    offsets = v.linear_offset(idx)
    flat = case.param.detach().reshape(-1)
    rows, cols = v.to_param_rc(idx)
    for i in range(5):
        expected = v.data[tuple(idx[i].tolist())]
        assert flat[offsets[i]] == expected
        assert case.param[rows[i], cols[i]] == expected
    assert torch.equal(v.to_param_index(idx), torch.stack([rows, cols], -1))


def test_to_param_rc_on_non_contiguous_parameters():
    Wt = torch.arange(32.0).reshape(8, 4).t()  # (4, 8), strides (1, 4)
    v = View(Wt, (4, 2, 4), (1, 16, 4))  # split the columns of the transposed weight
    idx = torch.tensor([[3, 1, 2], [0, 0, 1]])
    rows, cols = v.to_param_rc(idx)
    for i in range(2):
        assert Wt[rows[i], cols[i]] == v.data[tuple(idx[i].tolist())]


def test_index_errors():
    v = View(torch.randn(4, 8), (4, 8), (8, 1))
    with pytest.raises(ShapeMismatchError, match=r"`idx`: expected shape \(\.\.\., 2\)"):
        v.linear_offset(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ArgumentIndexError, match="`idx`"):
        v.linear_offset(torch.tensor([[4, 0]]))
    with pytest.raises(ArgumentTypeError, match="integer tensor"):
        v.linear_offset(torch.zeros(1, 2))
    with pytest.raises(SpecError, match="2-D parameter"):
        View(torch.randn(8), (8,), (1,)).to_param_rc(torch.tensor([[1]]))


# ---------------------------------------------------------------- values through the view
def test_resolve_values():
    W = torch.randn(4, 16)
    v = View(W, (4, 8), (16, 2), offset=1)
    assert v.resolve(None).data_ptr() == W[:, 1:].data_ptr()
    view_shaped = torch.randn(4, 8)
    assert v.resolve(view_shaped) is view_shaped
    param_shaped = torch.randn(4, 16)
    assert torch.equal(v.resolve(param_shaped), param_shaped[:, 1::2])
    transposed_layout = torch.randn(16, 4).t()  # param-shaped, other layout: copied once
    assert torch.equal(v.resolve(transposed_layout), transposed_layout[:, 1::2])
    with pytest.raises(ShapeMismatchError, match=r"`scores`: expected shape \(4, 8\) \(the view's\) or \(4, 16\)"):
        v.resolve(torch.randn(3, 3), "scores")


# ---------------------------------------------------------------- layout helpers
def test_block_view_of_forms():
    t = torch.arange(6 * 8.0).reshape(6, 8)
    inter = View.block_view_of(t, (2, 4), reorder=False)
    assert inter.shape == (3, 2, 2, 4)
    reordered = View.block_view_of(t, (2, 4))
    assert reordered.shape == (3, 2, 2, 4)
    merged = View.block_view_of(t, (2, 4), merge=True)
    assert merged.shape == (3, 2, 8)
    for B0, B1 in itertools.product(range(3), range(2)):
        block = t[2 * B0 : 2 * B0 + 2, 4 * B1 : 4 * B1 + 4]
        assert torch.equal(inter[B0, :, B1, :], block)
        assert torch.equal(reordered[B0, B1], block)
        assert torch.equal(merged[B0, B1], block.reshape(-1))
    assert View.block_view_of(t, (-1, 1), merge=True).shape == (1, 8, 6)
    assert View.block_view_of(t, (), merge=True).shape == (6, 8, 1)
    View.block_view_of(t, (2, 4))[1, 1].zero_()  # the reordered form is a view
    assert torch.all(t[2:4, 4:8] == 0)
    with pytest.raises(SpecError, match=r"`block_shape`\[1\] = 3 does not divide dim 1 .*size 8.*1, 2, 4, 8"):
        View.block_view_of(t, (2, 3))


def test_broadcast_block_to_element():
    values = torch.arange(6.0).reshape(2, 3)
    full = View.broadcast_block_to_element(values, (2, 4))
    assert torch.equal(full, spread(values, (2, 4)))
    fake = View.broadcast_block_to_element(values, (2, 4), fake=True)
    assert fake.shape == (2, 1, 3, 1)
    with pytest.raises(SpecError, match="`block_shape`"):
        View.broadcast_block_to_element(values, (2,))


# ---------------------------------------------------------------- strided block primitives
@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=strided_cases(), reduce=st.sampled_from(["norm", "min", "max", "sum"]), p=st.sampled_from([1.0, 2.0, 3.0, float("inf")]))
def test_op_backed_statistics_equal_plain_torch(device, case, reduce, p):
    param = case.param.detach().to(device)
    v = View(param, case.shape, case.stride, case.offset)
    got = v.reduce_blocks(case.block, reduce, p)
    expected = plain_block_stat(case.materialised(), case.block, reduce, p)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=strided_cases(), seed=st.integers(0, 1000))
def test_op_backed_scaling_writes_only_the_view(device, case, seed):
    param = case.param.detach().to(device)
    before = param.clone()
    v = View(param, case.shape, case.stride, case.offset)
    grid = tuple(s // b for s, b in zip(case.shape, case.block))
    factors = torch.rand(grid, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    factors[factors < 0.3] = 0
    v.scale_blocks_(case.block, factors.to(device))
    expected = before.clone()
    window = torch.as_strided(expected, case.shape, case.stride, case.offset)
    window.copy_(window * spread(factors.to(device), case.block))
    assert torch.equal(param, expected)


def test_primitives_run_the_ops_on_the_parameter_storage(monkeypatch):
    W = torch.nn.Parameter(torch.randn(8, 32))
    v = View(W, (8, 2, 8, 2), (32, 16, 1, 8))
    seen = []
    real_reduce, real_scale = ops.block_reduce, ops.block_scale_

    def spy_reduce(x, *args, **kw):
        seen.append(("reduce", x.data_ptr(), x.is_contiguous()))
        return real_reduce(x, *args, **kw)

    def spy_scale(x, *args, **kw):
        seen.append(("scale", x.data_ptr(), x.is_contiguous()))
        return real_scale(x, *args, **kw)

    monkeypatch.setattr(ops, "block_reduce", spy_reduce)
    monkeypatch.setattr(ops, "block_scale_", spy_scale)
    v.reduce_blocks((1, 1, 1, 2))
    v.scale_blocks_((1, 1, 1, 2), torch.ones(8, 2, 8, 1))
    assert seen == [("reduce", W.data_ptr(), True), ("scale", W.data_ptr(), True)]


def test_non_contiguous_parameter_without_copy():
    base = torch.randn(32, 8)
    Wt = base.t()  # (8, 32), not contiguous
    v = View(Wt, (8, 2, 8, 2), (1, 128, 8, 64))  # the coupled 2:4 layout of Wt
    assert torch.equal(v.data, Wt.reshape(8, 2, 2, 8).permute(0, 1, 3, 2))
    torch.testing.assert_close(v.reduce_blocks((1, 1, 1, 2)), plain_block_stat(v.data, (1, 1, 1, 2), "norm").float())
    mask = torch.rand(8, 2, 8, 1) > 0.5
    expected = v.data * spread(~mask, (1, 1, 1, 2))
    v.scale_blocks_((1, 1, 1, 2), ~mask)
    assert torch.equal(v.data, expected)


def test_fallbacks_match_the_op_path():
    # More than 8 dims: plain torch.
    x = torch.randn([2] * 9, dtype=torch.float64)
    block = (1, 2) * 4 + (2,)
    torch.testing.assert_close(reduce_blocks(x, block, "norm"), plain_block_stat(x, block, "norm"))
    y = x.clone()
    factors = (torch.rand([2, 1] * 4 + [1], dtype=torch.float64) > 0.5).double()
    scale_blocks_(y, block, factors)
    assert torch.equal(y, x * spread(factors, block))
    # Integer values are reduced as floats.
    ints = torch.arange(8).reshape(2, 4)
    torch.testing.assert_close(reduce_blocks(ints, (1, 4), "sum"), torch.tensor([[6.0], [22.0]]))
    # Zero-dim tensors are one block.
    assert reduce_blocks(torch.tensor(-3.0), (), "norm") == 3.0


def test_differentiable_fallback_when_grad_is_needed():
    W = torch.nn.Parameter(torch.randn(4, 8, dtype=torch.float64))
    v = View(W, (4, 4), (8, 2))
    norms = reduce_blocks(v.tensor(), (1, 4), "norm")
    norms.sum().backward()
    expected = W.detach() / plain_block_stat(W.detach()[:, ::2], (1, 4), "norm").repeat_interleave(8, 1)
    expected[:, 1::2] = 0
    torch.testing.assert_close(W.grad, expected)


def test_scale_zero_overwrites_non_finite_values():
    W = torch.tensor([[float("nan"), 1.0, float("inf"), 2.0]])
    scale_blocks_(W, (1, 2), torch.tensor([[0.0, 0.0]]))
    assert torch.equal(W, torch.zeros(1, 4))


def test_primitive_argument_errors():
    x = torch.randn(4, 4)
    with pytest.raises(SpecError, match="`reduce`"):
        reduce_blocks(x, (1, 4), "mean")
    with pytest.raises(SpecError, match="`p`"):
        reduce_blocks(x, (1, 4), "norm", p=0)
    with pytest.raises(ShapeMismatchError, match=r"`factors`: expected shape \(4, 1\)"):
        scale_blocks_(x, (1, 4), torch.ones(4))


# ---------------------------------------------------------------- tensor_ops helpers
def test_kth_largest_helpers():
    from s3sparse import tensor_ops

    x = torch.tensor([[3.0, 1.0, 2.0, 5.0], [0.0, 0.0, 4.0, 0.0]])
    assert torch.equal(tensor_ops.kth_largest_value(x, 2), torch.tensor([3.0, 0.0]))
    assert torch.equal(tensor_ops.kth_largest_value(x.t(), 1, dim=0), torch.tensor([5.0, 4.0]))
    values, keep = tensor_ops.kth_largest_mask(x, 2)
    assert keep.tolist() == [[True, False, False, True], [True, False, True, False]]  # ties: lower index
    assert torch.equal(tensor_ops.kth_largest_mask(x.t(), 2, dim=0)[1], keep.t())
    op_values, op_keep = ops.kth_largest(x, 2)  # the op: values and mask along the last dim
    assert torch.equal(values, op_values) and torch.equal(keep, op_keep)
    assert torch.equal(tensor_ops.kth_largest_value(x, 2), op_values)
    assert torch.equal(tensor_ops.kth_largest_value(torch.tensor([[3, 1, 2]]), 1), torch.tensor([3]))
    assert torch.equal(tensor_ops.mid_kth_largest(x, 1), torch.tensor([4.0, 2.0]))
    assert torch.equal(tensor_ops.mid_kth_largest(x, 1, k_weight=1.0), torch.tensor([5.0, 4.0]))
    assert torch.all(tensor_ops.mid_kth_largest(x, 0) == float("inf"))
    assert torch.equal(tensor_ops.mid_kth_largest(x, 4), torch.tensor([1.0, 0.0]))
    with pytest.raises(SpecError, match=r"`k` must be in \[0, 4\]"):
        tensor_ops.kth_largest_value(x, 5)
    with pytest.raises(SpecError, match="`k_weight`"):
        tensor_ops.mid_kth_largest(x, 1, k_weight=-0.1)
    with pytest.raises(ArgumentTypeError, match="`k` must be an int"):
        tensor_ops.kth_largest_value(x, 1.0)


def test_layout_helpers():
    from s3sparse import dtypes, tensor_ops

    assert tensor_ops.normalize_order(None, 3) == (0, 1, 2)
    assert tensor_ops.normalize_order((-1, 0, 1), 3) == (2, 0, 1)
    with pytest.raises(SpecError, match="`order` must be a permutation of the 2 axes"):
        tensor_ops.normalize_order((0, 0), 2)
    perm = (2, 0, 3, 1)
    inv = tensor_ops.inverse_permutation(perm)
    t = torch.randn(2, 3, 4, 5)
    assert torch.equal(t.permute(perm).permute(inv), t)
    assert tensor_ops.interleave_unsqueeze(torch.zeros(2, 3)).shape == (2, 1, 3, 1)
    assert tensor_ops.interleaved_shape((2, 3), (4, 5)) == (2, 4, 3, 5)
    assert tensor_ops.reorder_permutation(3) == (0, 2, 4, 1, 3, 5)
    assert dtypes.get_dtype_epsilon(torch.float32) == torch.finfo(torch.float32).eps
    assert dtypes.get_dtype_epsilon(torch.float16, 1e-3) == 1e-3
    assert dtypes.get_dtype_epsilon(torch.int64) == torch.finfo(torch.get_default_dtype()).eps
    compute = {d: dtypes.opmath_dtype(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
    assert compute == {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                       torch.float32: torch.float32, torch.float64: torch.float64}
    assert tensor_ops.normalize_tile_shape((4, 6), (2,), arg="s", of="g", missing="whole") == (2, 6)
    with pytest.raises(SpecError, match=r"`s` \(2,\) has 1 dims but g \(4, 6\) has 2"):
        tensor_ops.normalize_tile_shape((4, 6), (2,), arg="s", of="g", missing="ones")


def test_error_hierarchy():
    import s3sparse
    from s3sparse.errors import CouplingError, UnknownNameError

    assert s3sparse.SparseKitError is S3Error
    for cls in (SpecError, ShapeMismatchError, CouplingError):
        assert issubclass(cls, S3Error) and issubclass(cls, ValueError)
    assert issubclass(UnknownNameError, KeyError) and str(UnknownNameError("plain message")) == "plain message"
    err = ShapeMismatchError((2, 3), torch.Size([3, 2]), "values")
    assert str(err) == "`values`: expected shape (2, 3), got (3, 2)"
    assert err.expected == (2, 3) and err.context == "values"
    assert str(ShapeMismatchError((1,), (2,))) == "shape mismatch: expected shape (1,), got (2,)"
