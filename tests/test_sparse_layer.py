"""The one Linear/Conv1D adapter (s3sparse.sparse.layer): an nn.Linear and a GPT-2 Conv1D computing
the same function look the same through it, whether pruned in place, read, resized or turned into a Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s3sparse.sparse.layer import LinearLayer, as_linear, is_conv1d, is_linear

transformers = pytest.importorskip("transformers")


def _pair(seed: int, out_features: int = 6, in_features: int = 8):
    """An nn.Linear and a Conv1D with the same weight and bias (the Conv1D stores the weight in × out)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    conv = transformers.pytorch_utils.Conv1D(out_features, in_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g))
        linear.bias.copy_(torch.randn(out_features, generator=g))
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    return linear, conv


def test_both_layouts_are_seen_as_out_by_in(seed):
    linear, conv = _pair(seed)
    assert is_linear(linear) and is_linear(conv) and is_conv1d(conv) and not is_conv1d(linear)
    assert not is_linear(nn.Conv1d(8, 6, 1))
    a, b = LinearLayer("linear", linear), LinearLayer("conv", conv)
    assert (a.shape, a.out_features, a.in_features, a.transposed) == ((6, 8), 6, 8, False)
    assert (b.shape, b.out_features, b.in_features, b.transposed) == ((6, 8), 6, 8, True)
    assert torch.equal(a.detached_matrix(), b.detached_matrix()) and torch.equal(a.bias, b.bias)
    assert a.numel() == b.numel() == 6 * 8 + 6
    x = torch.randn(3, 8)
    torch.testing.assert_close(as_linear(conv)(x), linear(x))
    assert as_linear(linear) is linear


def test_pruning_the_matrix_in_place_reaches_the_module_after_commit(seed):
    linear, conv = _pair(seed)
    for module in (linear, conv):
        layer = LinearLayer("layer", module)
        with torch.no_grad():
            layer.matrix()[:, :4] = 0  # prune the first 4 input columns
        layer.commit()
    x = torch.randn(3, 8)
    torch.testing.assert_close(conv(x), linear(x))
    assert bool((linear.weight[:, :4] == 0).all()) and bool((conv.weight[:4, :] == 0).all())


def test_install_resizes_either_layout_in_place(seed):
    linear, conv = _pair(seed)
    keep = torch.tensor([0, 2, 5])
    for module in (linear, conv):
        layer = LinearLayer("layer", module)
        layer.install(layer.detached_matrix()[keep].clone(), layer.bias[keep].clone())
        assert layer.shape == (3, 8)
    x = torch.randn(3, 8)
    torch.testing.assert_close(conv(x), linear(x))
    assert (linear.out_features, conv.nf) == (3, 3)
