"""fuse_siblings: q/k/v and gate/up stacked into one layer each, dense and packed, same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from s3sparse.errors import ArgumentError, ArgumentTypeError
from s3sparse.llm import pack_model, parse_pattern
from s3sparse.sparse import PackedLinear, PackedWeight, fuse_siblings
from s3sparse.sparse.fuse import SiblingSlice, StackedSiblings

pytest.importorskip("transformers")
from test_llm_support import tiny_model  # noqa: E402

SIBLINGS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _pruned(family: str = "qwen3", pattern: str = "2:4", seed: int = 0) -> tuple[nn.Module, dict]:
    model = tiny_model(family, seed=seed)
    patterns = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in name:
                scope, nnz = parse_pattern(pattern).build(mod.weight)
                scope.hard_threshold(nnz=nnz)
                patterns[name] = pattern
    return model, patterns


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "coupled-2:4"])
def test_fused_model_gives_the_same_logits(packed, pattern):
    model, patterns = _pruned(pattern=pattern)
    if packed:
        pack_model(model, patterns)
    with torch.no_grad():
        want = model(_ids()).logits
    fused = copy.deepcopy(model)
    report = fuse_siblings(fused)
    assert len(report.fused) == 4 and not report.skipped, str(report)  # 2 layers x (qkv, gate/up)
    layer = fused.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, SiblingSlice) and isinstance(layer.mlp.up_proj, SiblingSlice)
    stacked = layer.self_attn.fused_q_proj_k_proj_v_proj
    assert isinstance(stacked.layer, PackedLinear if packed else nn.Linear)
    assert stacked.layer.out_features == sum(getattr(model.model.layers[0].self_attn, n).out_features
                                             for n in ("q_proj", "k_proj", "v_proj"))
    with torch.no_grad():
        got = fused(_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(m._last is None for m in fused.modules() if isinstance(m, StackedSiblings))  # nothing kept


def test_state_dict_holds_each_stacked_weight_once_and_no_sibling_weights():
    model, _ = _pruned()
    fuse_siblings(model)
    keys = list(model.state_dict())
    assert not any(f".{n}." in k for k in keys for n in SIBLINGS), keys
    assert sum("fused_q_proj_k_proj_v_proj.layer.weight" in k for k in keys) == 2
    assert sum("fused_gate_proj_up_proj.layer.weight" in k for k in keys) == 2
    assert len({p.data_ptr() for p in model.parameters()}) == len(list(model.parameters()))


def test_any_call_order_and_new_or_changed_inputs_give_each_siblings_own_output():
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(16, 8), nn.Linear(16, 4), nn.Linear(16, 4)
    ref = copy.deepcopy(parent)
    fuse_siblings(parent)
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        for name, inp in [("v_proj", x), ("q_proj", x), ("q_proj", y), ("k_proj", x), ("v_proj", y), ("k_proj", y)]:
            torch.testing.assert_close(getattr(parent, name)(inp), getattr(ref, name)(inp), rtol=0, atol=1e-6)
        parent.q_proj(x)
        x.mul_(2.0)  # changed in place after q took its part: k must not get the old x's output
        torch.testing.assert_close(parent.k_proj(x), ref.k_proj(x), rtol=0, atol=1e-6)


def test_fused_siblings_compile_fullgraph():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(64, 64, bias=False) for _ in range(3))

        def forward(self, h):
            return self.q_proj(h) * self.k_proj(h) + self.v_proj(h)

    model = Attn()
    with torch.no_grad():
        for lin in (model.q_proj, model.k_proj, model.v_proj):
            scope, nnz = parse_pattern("2:4").build(lin.weight)
            scope.hard_threshold(nnz=nnz)
        for n in ("q_proj", "k_proj", "v_proj"):
            setattr(model, n, PackedLinear(PackedWeight.from_pattern(getattr(model, n).weight, "2:4")))
    h = torch.randn(5, 64)
    with torch.no_grad():
        want = model(h)
        fuse_siblings(model)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_groups_that_cannot_be_stacked_are_reported_and_left_alone():
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(16, 8), nn.Linear(12, 8), nn.Linear(16, 8)
    parent.gate_proj, parent.up_proj = nn.Linear(16, 8, bias=False), nn.Linear(16, 8)
    report = fuse_siblings(parent)
    assert not report.fused
    reasons = dict(report.skipped)
    assert "in_features differ" in reasons["q_proj/k_proj/v_proj"]
    assert "bias" in reasons["gate_proj/up_proj"]
    assert isinstance(parent.q_proj, nn.Linear) and "skipped" in str(report)


def test_mixed_packed_and_dense_siblings_are_left_alone():
    model, patterns = _pruned()
    pack_model(model, {k: v for k, v in patterns.items() if not k.endswith("k_proj")})
    report = fuse_siblings(model)
    assert sum("q_proj" in w for w, _ in report.skipped) == 2
    assert len(report.fused) == 2  # the gate/up pairs


def test_bad_arguments_name_the_argument():
    with pytest.raises(ArgumentTypeError, match="`model`"):
        fuse_siblings("model")
    with pytest.raises(ArgumentError, match="`groups`"):
        fuse_siblings(nn.Linear(2, 2), groups=[("q_proj",)])
    with pytest.raises(ArgumentError, match="`groups`"):
        fuse_siblings(nn.Linear(2, 2), groups=[("a.q", "a.k")])


@pytest.mark.parametrize("family", ["qwen3", "llama", "bert"])
def test_each_stacked_layer_runs_once_a_forward_in_hugging_face_models(family):
    model = tiny_model(family)
    report = fuse_siblings(model)
    stacked = [m for m in model.modules() if isinstance(m, StackedSiblings)]
    assert len(stacked) == len(report.fused) == (2 if family == "bert" else 4), str(report)
    calls = []
    for m in stacked:
        m.layer.register_forward_hook(lambda mod, args, out: calls.append(mod))
    with torch.no_grad():
        model(_ids())
    assert len(calls) == len(stacked)  # the siblings shared one run of their stacked layer


def _qkv(widths=(8, 8, 8), bias=True) -> nn.Module:
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = (nn.Linear(16, w, bias=bias) for w in widths)
    return parent


def test_grad_mode_inference_mode_and_a_second_call_are_served_right():
    parent = _qkv()
    ref = copy.deepcopy(parent)
    fuse_siblings(parent)
    x = torch.randn(3, 16, requires_grad=True)  # (the stacked weights are frozen: the grad flows to x)
    with torch.no_grad():
        parent.q_proj(x)
    k = parent.k_proj(x)  # grad on now: not the no-grad output
    assert k.requires_grad
    torch.testing.assert_close(k, ref.k_proj(x))
    x = x.detach()
    with torch.no_grad():
        q1 = parent.q_proj(x)
        q1.mul_(10)  # the caller edits its output, then asks again: a new run, not the edited one
        torch.testing.assert_close(parent.q_proj(x), ref.q_proj(x))
    with torch.inference_mode():  # inference tensors have no version counter
        xi = torch.randn(3, 16)
        got = [parent.v_proj(xi), parent.q_proj(xi), parent.k_proj(xi)]
        want = [ref.v_proj(xi), ref.q_proj(xi), ref.k_proj(xi)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert parent.fused_q_proj_k_proj_v_proj._last is None


def test_a_compiled_call_does_not_reuse_an_eager_output_of_an_input_changed_since():
    parent = _qkv()
    ref = copy.deepcopy(parent)
    fuse_siblings(parent)
    x = torch.randn(3, 16)
    with torch.no_grad():
        parent.q_proj(x)  # eager: kept for k and v
        x.mul_(3)
        got = torch.compile(lambda h: parent.k_proj(h), fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, ref.k_proj(x))


def test_slices_expose_their_rows_of_the_stacked_weight_and_bias():
    parent = _qkv(widths=(8, 4, 4))
    ref = copy.deepcopy(parent)
    fuse_siblings(parent)
    for n in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(parent, n).weight, getattr(ref, n).weight)
        assert torch.equal(getattr(parent, n).bias, getattr(ref, n).bias)
    assert parent.k_proj.out_features == 4 and parent.k_proj.in_features == 16


def test_cross_attention_and_name_clashes_are_left_alone():
    parent = nn.Module()
    parent.encoder_attn = _qkv()
    parent.self_attn = _qkv()
    parent.self_attn.is_cross_attention = True
    clash = _qkv()
    clash.fused_q_proj_k_proj_v_proj = nn.Identity()
    parent.other = clash
    report = fuse_siblings(parent)
    assert not report.fused
    reasons = dict(report.skipped)
    assert "cross-attention" in reasons["encoder_attn.q_proj/k_proj/v_proj"]
    assert "cross-attention" in reasons["self_attn.q_proj/k_proj/v_proj"]
    assert "already has a child" in reasons["other.q_proj/k_proj/v_proj"]


def test_packed_siblings_keep_their_paths_and_column_patterns_say_why_not():
    model, patterns = _pruned()
    pack_model(model, patterns)
    attn = model.model.layers[0].self_attn
    for n in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, n).use_dense_cache(16).use_sp24(None)
    fuse_siblings(model)
    stacked = attn.fused_q_proj_k_proj_v_proj.layer
    assert stacked._dense_min_tokens == 16 and not stacked._sp24_max_tokens
    cols, cpat = _pruned(pattern="col-blocks:16:0.5")
    pack_model(cols, cpat, compact_channels=False)
    report = fuse_siblings(cols)
    assert report.skipped and all("not one col-blocks" in why or "seams" in why for _, why in report.skipped)


@pytest.mark.parametrize("groups", ["gate_proj", ("gate_proj", "up_proj"), [("gate_proj", "gate_proj")]])
def test_malformed_groups_are_refused(groups):
    with pytest.raises(ArgumentError, match="`groups`"):
        fuse_siblings(nn.Linear(2, 2), groups=groups)
