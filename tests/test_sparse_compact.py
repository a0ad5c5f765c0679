"""Channel compaction (s3sparse.sparse.compact): smaller dense layers, same outputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s3sparse import CouplingError, ShapeMismatchError, SparsityBuilder, SpecError, ArgumentTypeError, patterns, prune_magnitude
from s3sparse.sparse import (
    SIDECAR_NAME,
    GatherLinear,
    compact,
    compact_inputs,
    compact_model,
    load_compacted,
    save_compacted,
)


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


class GatedMLP(nn.Module):
    """LLaMA's MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, d: int = 16, f: int = 48, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(d, f, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(f, d, bias=bias, dtype=dtype)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):
    def __init__(self, d: int = 24, f: int = 40, act=F.gelu, bias: bool = True, consumer_bias: bool = True, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(d, f, bias=bias, dtype=dtype)
        self.fc2 = nn.Linear(f, d, bias=consumer_bias, dtype=dtype)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _prune_rows(layer: nn.Linear, sparsity: float = 0.5) -> None:
    scope, nnz = patterns.channels(layer.weight, sparsity)
    with torch.no_grad():
        prune_magnitude(scope, nnz)


# ------------------------------------------------------------------ plain producer -> act -> consumer
@pytest.mark.parametrize("act_name, act", [("relu", F.relu), ("gelu", F.gelu), ("identity", lambda x: x)])
def test_pruned_channels_of_a_plain_mlp_are_removed_and_constants_folded(seed, act_name, act):
    mlp = PlainMLP(act=act).eval()
    _prune_rows(mlp.fc1, 0.5)
    x = torch.randn(7, 3, 24)
    with torch.no_grad():
        ref = mlp(x)
    dead = (mlp.fc1.weight == 0).all(1)
    constant = act(mlp.fc1.bias.detach())  # what a dead channel outputs
    result = compact(mlp.fc1, [mlp.fc2], act=act_name)
    with torch.no_grad():
        out = mlp(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert mlp.fc1.out_features == mlp.fc2.in_features == 20 == result.channels_after
    assert mlp.fc1.weight.shape == (20, 24) and mlp.fc2.weight.shape == (24, 20) and mlp.fc1.bias.shape == (20,)
    assert result.channels_before == 40 and result.kept.tolist() == (~dead).nonzero().squeeze(1).tolist()
    # Dead channels with act(bias) == 0 are zero; the others are constants folded into fc2's bias.
    assert sorted(result.removed_zero) == (dead & (constant == 0)).nonzero().squeeze(1).tolist()
    assert sorted(result.removed_folded) == (dead & (constant != 0)).nonzero().squeeze(1).tolist()
    assert result.kept_dead == {}
    assert result.params_before == 40 * 24 + 40 + 24 * 40 + 24
    assert result.params_after == _params(mlp.fc1, mlp.fc2) == 20 * 24 + 20 + 24 * 20 + 24
    assert result.params_saved == 20 * 24 * 2 + 20 and result.applied


def test_integer_valued_weights_give_bitwise_identical_outputs(seed):
    """Exact where possible: with small integers every product and sum is exact, so removing zero terms changes nothing."""
    mlp = PlainMLP(d=8, f=16, act=F.relu, bias=False, consumer_bias=True)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randint(-3, 4, p.shape).float())
        mlp.fc1.weight[::3] = 0
    x = torch.randint(-3, 4, (5, 8)).float()
    with torch.no_grad():
        ref = mlp(x)
    compact(mlp.fc1, [mlp.fc2], act="relu")
    assert mlp.fc1.out_features == 16 - len(range(0, 16, 3))
    with torch.no_grad():
        assert torch.equal(mlp(x), ref)


def test_float64_agrees_to_float64_round_off(seed):
    mlp = PlainMLP(act=torch.tanh, dtype=torch.float64)
    _prune_rows(mlp.fc1, 0.75)
    x = torch.randn(9, 24, dtype=torch.float64)
    with torch.no_grad():
        ref = mlp(x)
    compact(mlp.fc1, [mlp.fc2], act=torch.tanh)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-12, atol=1e-13)
    assert mlp.fc1.weight.dtype == mlp.fc2.bias.dtype == torch.float64 and mlp.fc1.out_features == 10


def test_bfloat16_layers_stay_bfloat16(seed):
    mlp = PlainMLP(act=F.gelu, dtype=torch.bfloat16)
    _prune_rows(mlp.fc1, 0.5)
    x = torch.randn(6, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = mlp(x).float()
    compact(mlp.fc1, [mlp.fc2], act=F.gelu)
    assert all(p.dtype == torch.bfloat16 for p in mlp.parameters())
    with torch.no_grad():
        torch.testing.assert_close(mlp(x).float(), ref, rtol=2e-2, atol=2e-2)


def test_constants_without_a_consumer_bias_are_kept_and_strict_refuses_them(seed):
    mlp = PlainMLP(act=F.gelu, bias=True, consumer_bias=False)
    with torch.no_grad():
        mlp.fc1.weight[:10] = 0
        mlp.fc1.bias[:5] = 0  # gelu(0) = 0: these are exactly zero
    before = mlp.fc1.weight.detach().clone()
    with pytest.raises(SpecError, match=r"`producer`: 5 pruned channel\(s\) cannot be removed exactly.*no bias"):
        compact(mlp.fc1, [mlp.fc2], act="gelu", strict=True)
    assert torch.equal(mlp.fc1.weight, before)  # nothing changed
    x = torch.randn(4, 24)
    with torch.no_grad():
        ref = mlp(x)
    result = compact(mlp.fc1, [mlp.fc2], act="gelu")
    assert result.removed_zero == list(range(5)) and result.removed_folded == []
    assert sorted(result.kept_dead) == list(range(5, 10)) and "no bias" in result.kept_dead[5]
    assert mlp.fc1.out_features == 35
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_fold_bias_false_keeps_constant_channels(seed):
    mlp = PlainMLP(act=F.gelu)
    with torch.no_grad():
        mlp.fc1.weight[:8] = 0
        mlp.fc1.bias[:8] = 1.0
    result = compact(mlp.fc1, [mlp.fc2], act="gelu", fold_bias=False)
    assert result.channels_after == 40 and len(result.kept_dead) == 8 and "fold_bias=False" in result.kept_dead[0]


def test_every_channel_dead_leaves_a_zero_width_layer_with_the_same_output(seed):
    mlp = PlainMLP(act=F.relu)
    with torch.no_grad():
        mlp.fc1.weight.zero_()
    x = torch.randn(3, 24)
    with torch.no_grad():
        ref = mlp(x)
    result = compact(mlp.fc1, [mlp.fc2], act="relu")
    assert result.channels_after == 0 and mlp.fc2.weight.shape == (24, 0)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_dry_run_reports_and_changes_nothing(seed):
    mlp = PlainMLP()
    _prune_rows(mlp.fc1, 0.5)
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    result = compact(mlp.fc1, [mlp.fc2], act="gelu", dry_run=True)
    assert result.channels_after == 20 and not result.applied
    assert all(torch.equal(state[k], v) for k, v in mlp.state_dict().items())


def test_a_producer_alone_shrinks_its_output_to_the_kept_features(seed):
    layer = nn.Linear(12, 20, bias=False)
    with torch.no_grad():
        layer.weight[5:9] = 0
    x = torch.randn(4, 12)
    with torch.no_grad():
        ref = layer(x)
    result = compact(layer)
    assert layer.out_features == 16 and result.removed_zero == [5, 6, 7, 8]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref[:, result.kept], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ gated (LLaMA-style) MLP
def test_coupled_up_gate_down_through_a_block_coupling(seed):
    mlp = GatedMLP().eval()
    spec = (
        SparsityBuilder()
        .add_block(mlp.up_proj.weight, (1, -1), "up_rows")
        .add_block(mlp.gate_proj.weight, (1, -1), "gate_rows")
        .add_block(mlp.down_proj.weight, (-1, 1), "down_cols")
        .couple_blocks(["up_rows", "gate_rows", "down_cols"], [(0, 1), (0, 1), (1, 0)], "neurons")
        .add_scope("neurons", (-1, 1), "ffn")
    )
    scope = spec.get_scope("ffn")
    with torch.no_grad():
        prune_magnitude(scope, 20)
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = mlp(x)
    result = compact(scope, root=mlp, gate=mlp.gate_proj, act=mlp.act_fn)
    assert (result.producer, result.gate, result.consumers) == ("up_proj", "gate_proj", ("down_proj",))
    assert mlp.up_proj.weight.shape == mlp.gate_proj.weight.shape == (20, 16) and mlp.down_proj.weight.shape == (16, 20)
    assert result.params_after == _params(mlp) == 3 * 20 * 16 and result.params_before == 3 * 48 * 16
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_gate_or_up_pruned_alone_is_exact_with_silu(seed):
    """silu(0) = 0 and act(g)·0 = 0: a channel goes when its gate row or its up row is zero (no biases)."""
    mlp = GatedMLP()
    _prune_rows(mlp.gate_proj, 0.25)
    _prune_rows(mlp.up_proj, 0.25)
    dead = (mlp.gate_proj.weight == 0).all(1) | (mlp.up_proj.weight == 0).all(1)
    x = torch.randn(6, 16)
    with torch.no_grad():
        ref = mlp(x)
    result = compact(mlp.up_proj, [mlp.down_proj], gate=mlp.gate_proj, act=mlp.act_fn)
    assert result.channels_after == 48 - int(dead.sum()) and sorted(result.removed_zero) == dead.nonzero().squeeze(1).tolist()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_gated_channels_with_biases_follow_the_exactness_rules(seed):
    mlp = GatedMLP(bias=True)
    with torch.no_grad():
        mlp.up_proj.weight[0:4] = 0  # up row zero, up bias non-zero: act(gate(x))·b stays -> kept
        mlp.up_proj.weight[4:8] = 0
        mlp.up_proj.bias[4:8] = 0  # up row and bias zero: product exactly zero -> removed
        mlp.gate_proj.weight[8:12] = 0  # gate row zero, silu(b_g) != 0: silu(b_g)·up(x) -> kept
        mlp.gate_proj.weight[12:16] = 0
        mlp.gate_proj.bias[12:16] = 0  # silu(0) = 0 -> removed
        mlp.up_proj.weight[16:20] = 0
        mlp.gate_proj.weight[16:20] = 0  # both rows zero: constant silu(b_g)·b_u -> folded into down's bias
    x = torch.randn(6, 16)
    with torch.no_grad():
        ref = mlp(x)
    with pytest.raises(SpecError, match=r"`producer`: 8 pruned channel\(s\).*channel 0: up_proj: row zero but its bias"):
        compact(mlp.up_proj, [mlp.down_proj], gate=mlp.gate_proj, act="silu", strict=True, root=mlp)
    assert mlp.up_proj.out_features == 48
    result = compact(mlp.up_proj, [mlp.down_proj], gate=mlp.gate_proj, act="silu", root=mlp)
    assert result.removed_zero == list(range(4, 8)) + list(range(12, 16))
    assert result.removed_folded == list(range(16, 20))
    assert sorted(result.kept_dead) == list(range(0, 4)) + list(range(8, 12))
    assert result.kept_dead[8].startswith("gate_proj: row zero but act(gate bias)")
    assert mlp.down_proj.in_features == 48 - 12
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_strict_names_the_gate_when_the_gate_row_is_the_problem(seed):
    mlp = GatedMLP()
    with torch.no_grad():
        mlp.gate_proj.weight[3] = 0
    with pytest.raises(SpecError, match=r"`gate`: 1 pruned channel\(s\).*channel 3: gate_proj: row zero but act"):
        compact(mlp.up_proj, [mlp.down_proj], gate=mlp.gate_proj, act=torch.sigmoid, strict=True, root=mlp)


def test_a_coupling_not_followed_by_the_weights_is_refused(seed):
    """A channel pruned in gate but not in up, although the coupling says they go together."""
    mlp = GatedMLP()
    spec = (
        SparsityBuilder()
        .add_block(mlp.up_proj.weight, (1, -1), "up_rows")
        .add_block(mlp.gate_proj.weight, (1, -1), "gate_rows")
        .add_block(mlp.down_proj.weight, (-1, 1), "down_cols")
        .couple_blocks(["up_rows", "gate_rows", "down_cols"], [(0, 1), (0, 1), (1, 0)], "neurons")
        .add_scope("neurons", (-1, 1), "ffn")
    )
    with torch.no_grad():
        mlp.gate_proj.weight[7] = 0
    with pytest.raises(CouplingError, match=r"`spec`: the coupling 'neurons'.*block 7 is zero in gate_proj and not in up_proj, down_proj"):
        compact(spec.get_scope("ffn"), root=mlp, gate="gate_proj", act="silu")
    assert mlp.up_proj.out_features == 48 and mlp.down_proj.in_features == 48


def test_zero_consumer_columns_shrink_the_producer_too(seed):
    """`columns` on down_proj with its producers known: up, gate and down all shrink, nothing is gathered."""
    mlp = GatedMLP()
    scope, nnz = patterns.columns(mlp.down_proj.weight, 0.5)
    with torch.no_grad():
        prune_magnitude(scope, nnz)
    x = torch.randn(6, 16)
    with torch.no_grad():
        ref = mlp(x)
    result = compact(mlp.up_proj, [mlp.down_proj], gate=mlp.gate_proj, act="silu")
    assert result.channels_after == 24 and mlp.gate_proj.out_features == 24
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_a_channels_spec_with_explicit_consumers(seed):
    mlp = PlainMLP(act=F.relu)
    scope, nnz = patterns.channels(mlp.fc1.weight, 0.5)
    with torch.no_grad():
        prune_magnitude(scope, nnz)
    x = torch.randn(6, 24)
    with torch.no_grad():
        ref = mlp(x)
    with pytest.raises(SpecError, match=r"`consumers`: the spec covers only the output rows of fc1"):
        compact(scope, root=mlp, act="relu")
    result = compact(scope, ["fc2"], root=mlp, act="relu")
    assert result.consumers == ("fc2",) and mlp.fc1.out_features == 20
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ input columns of a lone layer
@pytest.mark.parametrize("make", [lambda w: patterns.columns(w, 0.5), lambda w: patterns.col_blocks(w, 4, 0.5)])
def test_a_columns_spec_alone_installs_a_gather_linear(seed, make):
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 8))
    scope, nnz = make(model[2].weight)
    with torch.no_grad():
        prune_magnitude(scope, nnz)
    x = torch.randn(5, 10)
    with torch.no_grad():
        ref = model(x)
    result = compact(scope, root=model)
    assert isinstance(model[2], GatherLinear) and model[2].linear.weight.shape == (8, 16)
    assert result.channels_after == 16 and result.params_saved == 8 * 16 and "2" in result.replaced
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    assert set(model[2].state_dict()) == {"index", "linear.weight", "linear.bias"}


def test_compact_inputs_of_a_conv1d(seed):
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(6, 12)  # in 12, out 6, weight stored (12, 6)
    with torch.no_grad():
        conv.weight[[1, 4, 5, 9]] = 0  # rows of the (in, out) weight are input features
    x = torch.randn(3, 12)
    with torch.no_grad():
        ref = conv(x)
    gathered = compact_inputs(conv)
    assert gathered.index.tolist() == [0, 2, 3, 6, 7, 8, 10, 11] and gathered.linear.weight.shape == (6, 8)
    with torch.no_grad():
        torch.testing.assert_close(gathered(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ShapeMismatchError, match="`input`"):
        gathered(torch.randn(3, 8))


def test_a_columns_spec_on_a_gpt2_conv1d_is_its_output_channels(seed):
    """Conv1D stores (in, out): whole columns of c_fc.weight are its output channels, so c_fc is the producer."""
    from test_llm_support import tiny_model

    mlp = tiny_model("gpt2").transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.bias.normal_()
    scope, nnz = patterns.columns(mlp.c_fc.weight, 0.5)
    with torch.no_grad():
        prune_magnitude(scope, nnz)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = mlp(x)
    result = compact(scope, ["c_proj"], root=mlp, act=mlp.act)
    assert result.producer == "c_fc" and result.channels_after == 128 and len(result.removed_folded) == 128
    assert mlp.c_fc.weight.shape == (64, 128) and mlp.c_fc.nf == 128 and mlp.c_proj.weight.shape == (128, 64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ argument errors
def test_errors_name_the_argument(seed):
    mlp = PlainMLP()
    with pytest.raises(SpecError, match=r"`spec`: block .* is not a whole row or column.*PackedLinear"):
        compact(patterns.nm(mlp.fc1.weight)[0], root=mlp, act="gelu")
    with pytest.raises(ShapeMismatchError, match=r"`consumers\[0\]`: expected shape in_features 40 .* got in_features 24"):
        compact(mlp.fc1, [nn.Linear(24, 24)], act="gelu")
    with pytest.raises(SpecError, match="`act`: give the elementwise activation"):
        compact(mlp.fc1, [mlp.fc2])
    with pytest.raises(KeyError, match="`act`: unknown activation 'swish2'"):
        compact(mlp.fc1, [mlp.fc2], act="swish2")
    with pytest.raises(ArgumentTypeError, match=r"`consumers\[0\]` must be an nn.Linear"):
        compact(mlp.fc1, [nn.Conv2d(40, 3, 1)], act="gelu")
    with pytest.raises(ArgumentTypeError, match="`root`: compacting an S3 spec needs root="):
        compact(patterns.channels(mlp.fc1.weight)[0], [mlp.fc2], act="gelu")
    with pytest.raises(SpecError, match="not the weight of any nn.Linear"):
        compact(patterns.channels(mlp.fc1.weight.detach().clone())[0], [mlp.fc2], root=mlp, act="gelu")
    gated = GatedMLP()
    both = (
        SparsityBuilder().add_block(gated.up_proj.weight, (1, -1), "u").add_block(gated.gate_proj.weight, (1, -1), "g")
        .couple_blocks(["u", "g"], None, "ug").add_scope("ug", (-1, 1), "s")
    ).get_scope("s")
    with pytest.raises(SpecError, match=r"`gate`: the spec has two producers \(up_proj, gate_proj\)"):
        compact(both, ["down_proj"], root=gated, act="silu")
    two = (
        SparsityBuilder().add_block(gated.down_proj.weight, (-1, 1), "a").add_block(mlp.fc2.weight, (-1, 1), "b")
        .add_scope("a", (1, -1), "sa").add_scope("b", (1, -1), "sb").couple_scopes(["sa", "sb"], None, "both")
    ).get_scope("both")
    with pytest.raises(SpecError, match="`spec` holds the input columns of 2 layers"):
        compact(two, root=nn.ModuleDict({"g": gated, "m": mlp}))
    with pytest.raises(SpecError, match="`target` is a GatedMLP"):
        compact(gated, act="silu")
    assert gated.up_proj.out_features == 48 and mlp.fc1.out_features == 40  # nothing was touched


# ------------------------------------------------------------------ whole Hugging Face models
def _hidden(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _mlp_layers(model, family):
    if family in ("llama", "qwen3"):
        return [(b.mlp.up_proj, b.mlp.gate_proj, b.mlp.down_proj) for b in model.model.layers]
    if family == "gpt2":
        return [(b.mlp.c_fc, None, b.mlp.c_proj) for b in model.transformer.h]
    return [(b.intermediate.dense, None, b.output.dense) for b in model.encoder.layer]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "bert"])
def test_compact_model_after_channel_pruning_with_the_pipeline(seed, family):
    from test_llm_support import tiny_calibration, tiny_model

    from s3sparse.llm import prune_model

    model = tiny_model(family)
    if family in ("gpt2", "bert"):  # HF initialises biases to zero; non-zero ones make pruned channels constants
        with torch.no_grad():
            for producer, _, _ in _mlp_layers(model, family):
                producer.bias.normal_(0, 0.5)
    prune_model(model, tiny_calibration(4, 16), "channels:0.5", "magnitude", progress=False)
    ids = tiny_calibration(2, 24, seed=5).input_ids
    ref = _hidden(model, ids)
    expected = []
    for producer, gate, _ in _mlp_layers(model, family):
        rows = (producer.weight.t() if family == "gpt2" else producer.weight) == 0
        dead = rows.all(1)
        if gate is not None:
            dead |= (gate.weight == 0).all(1)  # silu(0) = 0: either row zero removes the channel
        expected.append(int((~dead).sum()))
    params = sum(p.numel() for p in model.parameters())
    report = compact_model(model)
    assert [r.channels_after for r in report.layers] == expected
    assert all(r.channels_after < r.channels_before for r in report.layers)
    torch.testing.assert_close(_hidden(model, ids), ref, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == params - report.params_saved > 0
    for (producer, gate, consumer), width in zip(_mlp_layers(model, family), expected):
        assert (producer.nf if family == "gpt2" else producer.out_features) == width
        assert consumer.weight.shape[0 if family == "gpt2" else 1] == width
    key = "n_inner" if family == "gpt2" else "intermediate_size"
    if len(set(expected)) == 1:
        assert report.config_updated and getattr(model.config, key) == expected[0]
    else:
        assert not report.config_updated and getattr(model.config, key) == (None if family == "gpt2" else 128)
        assert "load_compacted" in report.note
    table = report.table()
    assert report.layers[0].name in table and "total" in table and f"{report.params_saved:,}" in table
    if family in ("gpt2", "bert"):  # the pipeline zeroes rows, not biases: the constants are folded
        assert all(len(r.removed_folded) == r.channels_before - r.channels_after for r in report.layers)


def test_per_layer_widths_reload_through_the_sidecar(seed, tmp_path):
    from test_llm_support import tiny_model

    transformers = pytest.importorskip("transformers")
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:40] = 0
        model.model.layers[1].mlp.gate_proj.weight[10:30] = 0
    ids = torch.randint(0, 1000, (2, 12))
    ref = _hidden(model, ids)
    report = compact_model(model)
    assert [r.channels_after for r in report.layers] == [88, 108] and not report.config_updated
    assert model.config.intermediate_size == 128 and model.model.layers[0].mlp.intermediate_size == 88
    path = save_compacted(model, str(tmp_path / "out"))
    sidecar = json.load(open(os.path.join(path, SIDECAR_NAME)))
    assert sidecar["linears"]["model.layers.0.mlp.down_proj"] == {"type": "Linear", "in_features": 88, "out_features": 64, "bias": False}
    with pytest.raises(Exception, match="size mismatch|mismatch"):
        transformers.LlamaForCausalLM.from_pretrained(path)
    loaded = load_compacted(path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.model.layers[0].mlp.down_proj.weight.shape == (64, 88) and loaded.model.layers[1].mlp.up_proj.out_features == 108
    torch.testing.assert_close(_hidden(loaded.eval(), ids), _hidden(model, ids), rtol=0, atol=0)
    torch.testing.assert_close(_hidden(loaded, ids), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(SpecError, match="already exists"):
        save_compacted(model, path)


def test_gpt2_uniform_widths_reload_with_from_pretrained(seed, tmp_path):
    from test_llm_support import tiny_model

    transformers = pytest.importorskip("transformers")
    model = tiny_model("gpt2")
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight[:, 100:] = 0  # Conv1D (in, out): columns are the output channels
    ids = torch.randint(0, 1000, (2, 12))
    ref = _hidden(model, ids)
    report = compact_model(model)
    assert report.config_updated and model.config.n_inner == 100 and report.new_size == 100
    model.save_pretrained(tmp_path / "gpt2")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    assert loaded.transformer.h[1].mlp.c_fc.weight.shape == (64, 100)
    torch.testing.assert_close(_hidden(loaded, ids), ref, rtol=1e-4, atol=1e-5)


def test_compact_model_is_all_or_nothing(seed):
    """A strict failure in the second MLP leaves the first one untouched (plan, check, then swap)."""
    from test_llm_support import tiny_model

    model = tiny_model("llama", mlp_bias=True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:8] = 0
        model.model.layers[0].mlp.up_proj.bias[:8] = 0  # removable
        model.model.layers[1].mlp.up_proj.weight[:8] = 0
        model.model.layers[1].mlp.up_proj.bias[:8] = 0.5  # act(gate(x))·0.5 depends on x: not removable
    with pytest.raises(SpecError, match="model.layers.1.mlp.up_proj: row zero but its bias"):
        compact_model(model, strict=True)
    assert model.model.layers[0].mlp.up_proj.out_features == 128
    report = compact(model)  # compact(model) is compact_model(model)
    assert [r.channels_after for r in report.layers] == [120, 128] and len(report.layers[1].kept_dead) == 8


def test_compact_model_dry_run_and_refusals(seed):
    from test_llm_support import tiny_model

    model = tiny_model("bert")
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight[:16] = 0
    report = compact_model(model, dry_run=True)
    assert not report.applied and report.layers[0].channels_after == 112
    assert model.encoder.layer[0].intermediate.dense.out_features == 128
    with pytest.raises(SpecError, match="`model`: found no MLP that compact_model knows in Sequential"):
        compact_model(nn.Sequential(nn.Linear(4, 4)))
