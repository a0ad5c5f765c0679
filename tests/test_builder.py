"""SparsityBuilder: fluent construction by name, couplings across parameters, and its errors."""

from __future__ import annotations

import pytest
import torch

from s3sparse import BlockCoupling, BlockSpec, ScopeCoupling, ScopeSpec, SparsityBuilder, View
from s3sparse.errors import ArgumentError, ArgumentTypeError, CouplingError, S3Error, SpecError, UnknownNameError


def mlp(F=8, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    up = torch.nn.Parameter(torch.randn(F, D, generator=g, dtype=torch.float64))
    down = torch.nn.Parameter(torch.randn(D, F, generator=g, dtype=torch.float64))
    return up, down


def test_coupled_neurons_across_two_parameters():
    up, down = mlp()
    builder = (
        SparsityBuilder()
        .add_block(up, (1, -1), "up_rows")
        .add_block(down, (-1, 1), "down_cols")
        .couple_blocks(["up_rows", "down_cols"], [(0, 1), (1, 0)], "neurons")
        .add_scope("neurons", (-1,), "ffn")
    )
    neurons = builder.get_block("neurons")
    assert isinstance(neurons, BlockCoupling) and neurons.name == "neurons"
    assert neurons.specs == (builder.get_block("up_rows"), builder.get_block("down_cols"))
    assert builder.get_all_blocks() == [neurons]
    (scope,) = builder.get_all_scopes()
    assert scope is builder.get_scope("ffn") and scope.block is neurons and scope.name == "ffn"
    union = torch.cat([up.detach(), down.detach().t()], 1).norm(dim=1)
    keep = set(union.topk(3).indices.tolist())
    scope.hard_threshold(nnz=3)
    alive_up = set((up.detach() != 0).all(1).nonzero().flatten().tolist())
    alive_down = set((down.detach() != 0).all(0).nonzero().flatten().tolist())
    assert alive_up == alive_down == keep
    assert (up.detach() != 0).any(1).sum() == 3  # pruned neurons are wholly zero


def test_two_scopes_coupled():
    W1 = torch.nn.Parameter(torch.randn(4, 8, dtype=torch.float64))
    W2 = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
    builder = (
        SparsityBuilder()
        .add_block(W1, (1, 1), "b1")
        .add_block(View(W2, (4, 8), (1, 4)), (1, 1), "b2")  # W2 transposed, through a View
        .add_scope("b1", (1, 4), "s1")
        .add_scope("b2", (1, 4), "s2")
        .couple_scopes(["s1", "s2"], None, "joint")
    )
    joint = builder.get_scope("joint")
    assert isinstance(joint, ScopeCoupling) and joint.numblk_per_scope() == 8
    assert builder.get_all_scopes() == [joint]
    assert isinstance(builder.get_scope("s1"), ScopeSpec)  # members stay reachable by name
    combined = torch.cat([W1.detach().reshape(4, 2, 4), W2.detach().t().reshape(4, 2, 4)], -1).abs()
    kept = combined >= combined.sort(-1, descending=True).values[..., 3:4]
    joint.hard_threshold(nnz=4)
    after = torch.cat([W1.detach().reshape(4, 2, 4), W2.detach().t().reshape(4, 2, 4)], -1) != 0
    assert torch.equal(after, kept)
    assert torch.equal(after.sum(-1), torch.full((4, 2), 4))


def test_uncoupled_scopes_and_order():
    W = torch.randn(4, 8)
    V = torch.randn(4, 8)
    builder = SparsityBuilder().add_block(W, (1, 1), "w").add_block(V, (1, 2), "v")
    builder.add_scope("w", (1, 4), "sw").add_scope("v", (1, 2), "sv")
    assert [s.name for s in builder.get_all_scopes()] == ["sw", "sv"]
    assert [b.name for b in builder.get_all_blocks()] == ["w", "v"]
    assert isinstance(builder.get_block("w"), BlockSpec)
    assert "sw" in repr(builder)


def test_builder_errors():
    up, down = mlp()
    b = SparsityBuilder().add_block(up, (1, -1), "up").add_block(down, (-1, 1), "down")
    with pytest.raises(UnknownNameError, match=r"`name`: no block named 'nope' \(known: 'up', 'down'\)") as info:
        b.get_block("nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, S3Error)
    with pytest.raises(UnknownNameError, match="no scope named 'nope'.*none yet"):
        b.get_scope("nope")
    with pytest.raises(SpecError, match="a block named 'up' already exists"):
        b.add_block(up, (1, 1), "up")
    with pytest.raises(ArgumentTypeError, match="non-empty str"):
        b.add_block(up, (1, 1), "")
    with pytest.raises(UnknownNameError, match="`names`: no block named 'x'"):
        b.couple_blocks(["up", "x"], None, "c")
    with pytest.raises(CouplingError, match="block grids"):
        b.couple_blocks(["up", "down"], None, "c")
    with pytest.raises(CouplingError, match="repeats"):
        b.couple_blocks(["up", "up"], None, "c")
    with pytest.raises(ArgumentTypeError, match="`names`"):
        b.couple_blocks("up", None, "c")
    b.couple_blocks(["up", "down"], [(0, 1), (1, 0)], "neurons")
    with pytest.raises(CouplingError, match="already coupled in 'neurons'"):
        b.couple_blocks(["up"], None, "again")
    with pytest.raises(CouplingError, match="'neurons' is a coupling"):
        b.couple_blocks(["neurons"], None, "again")
    with pytest.raises(CouplingError, match="member of the coupling 'neurons'; scope the coupling instead"):
        b.add_scope("up", (-1,), "s")
    with pytest.raises(UnknownNameError, match="`block_name`"):
        b.add_scope("nope", (-1,), "s")
    b.add_scope("neurons", (-1,), "s")
    with pytest.raises(SpecError, match="already has the scope 's'"):
        b.add_scope("neurons", (2,), "s2")
    with pytest.raises(SpecError, match="a scope named 's' already exists"):
        b.add_scope("neurons", (2,), "s")
    with pytest.raises(ArgumentError, match="does not divide"):
        b.add_block(torch.randn(3, 3), (2, 2), "bad")


def test_scope_coupling_rules():
    W1, W2 = torch.randn(4, 8), torch.randn(4, 8)
    b = (
        SparsityBuilder()
        .add_block(W1, (1, 1), "b1")
        .add_block(W2, (1, 1), "b2")
        .add_scope("b1", (1, 4), "s1")
        .add_scope("b2", (1, 8), "s2")
    )
    with pytest.raises(CouplingError, match="scope grids"):
        b.couple_scopes(["s1", "s2"], None, "j")
    b2 = SparsityBuilder().add_block(W1, (1, 1), "b1").add_block(W2, (1, 1), "b2")
    b2.add_scope("b1", (1, 4), "s1").add_scope("b2", (1, 4), "s2").couple_scopes(["s1", "s2"], None, "j")
    with pytest.raises(CouplingError, match="already coupled in 'j'"):
        b2.couple_scopes(["s1"], None, "k")
    with pytest.raises(CouplingError, match="'j' is a coupling"):
        b2.couple_scopes(["j"], None, "k")
    with pytest.raises(CouplingError, match="repeats"):
        b2.couple_scopes(["s1", "s1"], None, "k")
    with pytest.raises(CouplingError, match="already has the scope"):
        b2.couple_blocks(["b1", "b2"], None, "c")
