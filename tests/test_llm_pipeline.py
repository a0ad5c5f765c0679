"""prune_model on tiny random models: block discovery, input capture, every method, patterns, robustness."""

from __future__ import annotations

import pytest
import torch

from test_llm_support import tiny_calibration, tiny_model

from s3sparse.llm import UsageError, find_blocks, linear_layers, parse_pattern, prune_model
from s3sparse.llm.blocks import capture_block_inputs, per_block_arguments, run_block
from s3sparse.llm.pipeline import _HessianHooks


def _pruned_linears(model):
    name, blocks = find_blocks(model)
    return [layer for i, block in enumerate(blocks) for layer in linear_layers(block, f"{name}.{i}")]


@pytest.mark.parametrize("family, blocks_name", [("qwen3", "model.layers"), ("llama", "model.layers"),
                                                  ("gpt2", "transformer.h"), ("bert", "encoder.layer")])
def test_find_blocks_in_every_family(family, blocks_name):
    model = tiny_model(family)
    name, blocks = find_blocks(model)
    assert name == blocks_name and len(blocks) == 2
    layers = linear_layers(blocks[0], f"{name}.0")
    assert len(layers) >= 4 and all(layer.name.startswith(f"{name}.0.") for layer in layers)


def test_find_blocks_refuses_a_model_without_blocks():
    with pytest.raises(UsageError, match="no repeated transformer blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("family", ["qwen3", "bert"])
def test_captured_inputs_reproduce_the_dense_model(family):
    """Running the blocks one by one on the captured inputs gives the model's own last hidden state."""
    model = tiny_model(family)
    ids = tiny_calibration(4, 32).input_ids
    name, blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks, [ids], torch.device("cpu"))
    hidden = calls[0].hidden
    for block in blocks:
        hidden = run_block(block, calls[0], hidden)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    # the hidden state after the last block (before the final norm for decoders)
    torch.testing.assert_close(hidden, out.hidden_states[-1] if family == "bert" else _before_final_norm(model, ids))


def _before_final_norm(model, ids):
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return captured["x"]


def test_sliding_window_layers_get_their_own_masks():
    """With mixed config.layer_types each block is run with the mask the model gives it."""
    model = tiny_model("qwen3", use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    ids = tiny_calibration(2, 32).input_ids
    name, blocks = find_blocks(model)
    own = per_block_arguments(model, blocks, [ids], torch.device("cpu"))
    assert own is not None and len(own) == 2
    calls = capture_block_inputs(model, blocks, [ids], torch.device("cpu"))
    hidden = calls[0].hidden
    for i, block in enumerate(blocks):
        hidden = run_block(block, own[i][0], hidden)
    torch.testing.assert_close(hidden, _before_final_norm(model, ids))


def test_qkv_share_one_hessian():
    model = tiny_model("qwen3")
    name, blocks = find_blocks(model)
    layers = linear_layers(blocks[0], f"{name}.0")
    calls = capture_block_inputs(model, blocks, [tiny_calibration(2, 16).input_ids], torch.device("cpu"))
    hooks = _HessianHooks(layers, torch.device("cpu"))
    run_block(blocks[0], calls[0], calls[0].hidden)
    hooks.end_call()
    hooks.remove()
    acc = hooks.accumulators
    q, k, v = (acc[f"{name}.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert acc[f"{name}.0.mlp.gate_proj"] is acc[f"{name}.0.mlp.up_proj"]
    assert acc[f"{name}.0.mlp.down_proj"] is not acc[f"{name}.0.mlp.up_proj"]
    assert q.num_samples == 2 * 16


@pytest.mark.parametrize("method", ["magnitude", "obd", "sparsegpt", "obs-full", "obs-interleaved", "true-obs"])
def test_every_method_keeps_2_4_in_every_linear(method):
    model = tiny_model("qwen3")
    report = prune_model(model, tiny_calibration(), "2:4", method, progress=False)
    pattern = parse_pattern("2:4")
    for layer in _pruned_linears(model):
        assert pattern.holds(layer.module.weight), layer.name
        assert float((layer.module.weight == 0).float().mean()) == pytest.approx(0.5)
    assert len(report.layers) == 14 and all(r.status == "pruned" and r.pattern_holds for r in report.layers)
    assert all(0 < r.error < 1 for r in report.layers)
    assert len(report.blocks) == 2 and all(b.output_error is not None for b in report.blocks)


def test_second_order_methods_beat_magnitude():
    errors = {}
    for method in ("magnitude", "sparsegpt", "true-obs"):
        report = prune_model(tiny_model("qwen3"), tiny_calibration(16, 32), "2:4", method, progress=False)
        errors[method] = report.mean_error()
    assert errors["true-obs"] < errors["magnitude"] and errors["sparsegpt"] < errors["magnitude"]


@pytest.mark.parametrize("pattern", ["4:8", "coupled-2:4", "block16-rows", "channels:0.25", "1:4"])
def test_patterns_by_name_hold_after_pruning(pattern):
    model = tiny_model("qwen3")
    prune_model(model, tiny_calibration(), pattern, "sparsegpt", progress=False)
    choice = parse_pattern(pattern)
    assert all(choice.holds(layer.module.weight) for layer in _pruned_linears(model))


def test_gpt2_conv1d_layers_are_pruned_along_their_input_dimension():
    model = tiny_model("gpt2")
    report = prune_model(model, tiny_calibration(), "2:4", "sparsegpt", progress=False)
    pattern = parse_pattern("2:4")
    for layer in _pruned_linears(model):
        assert layer.transposed
        assert pattern.holds(layer.module.weight.t()), layer.name  # (in, out) storage: the pattern is on Wᵀ
    assert all(r.pattern_holds for r in report.layers)


def test_overrides_and_skip_by_glob():
    model = tiny_model("qwen3")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune_model(
        model, tiny_calibration(), "2:4", "sparsegpt",
        overrides={"*.down_proj": {"pattern": "4:8", "method": "obd"}, "model.layers.1.*": "dense"},
        skip=["k_proj"], progress=False,
    )
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.0.mlp.down_proj"].pattern == "4:8" and by_name["model.layers.0.mlp.down_proj"].method == "obd"
    assert by_name["model.layers.0.self_attn.k_proj"].status == "skipped"
    assert all(by_name[f"model.layers.1.{p}"].status in ("dense", "skipped") for p in ("mlp.up_proj", "self_attn.q_proj"))
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(dict(model.named_parameters())[name], before[name])
    assert parse_pattern("4:8").holds(model.model.layers[0].mlp.down_proj.weight)


def test_a_pattern_that_cannot_divide_a_layer_is_refused_before_any_work():
    model = tiny_model("qwen3")
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(UsageError, match=r"layer model\.layers\.0\.self_attn\.q_proj \(weight 64x64\).*2:6"):
        prune_model(model, tiny_calibration(), "2:6", "sparsegpt", progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_too_many_subsets_for_shared_c_obs_is_a_usage_error():
    with pytest.raises(UsageError, match="subsets"):
        prune_model(tiny_model("qwen3"), tiny_calibration(), "channels:0.5", "obs-full", progress=False)


def test_same_seed_gives_identical_weights():
    results = []
    for _ in range(2):
        model = tiny_model("qwen3")
        prune_model(model, tiny_calibration(seed=3), "2:4", "true-obs", progress=False)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    other = tiny_model("qwen3")
    prune_model(other, tiny_calibration(seed=4), "2:4", "true-obs", progress=False)
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight, results[0]["model.layers.0.mlp.up_proj.weight"])


def test_the_weights_do_not_depend_on_how_the_windows_are_split():
    """Batching the windows is what splitting them over ranks does to the Hessian sums (each batch,
    like each rank's share, is summed on its own, then added): with the default fp64 sums, H rounded
    to fp32 -- and so every mask and weight -- is the same for one batch of 8 windows, 3+3+2 and 8x1."""
    results = []
    for batch_size in (8, 3, 1):
        model = tiny_model("qwen3")
        prune_model(model, tiny_calibration(seed=5), "2:4", "true-obs", method_options={"ng": 8},
                    overrides={"*.down_proj": {"pattern": "4:8", "method": "sparsegpt"}}, batch_size=batch_size,
                    progress=False)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for batch_size, weights in zip((3, 1), results[1:]):
        differing = [n for n in results[0] if not torch.equal(results[0][n], weights[n])]
        assert differing == [], (batch_size, differing)


def test_dead_inputs_and_rank_deficiency_are_reported_not_fatal():
    """Zeroed embedding columns give dead inputs to q/k/v; 4 tokens for 64 inputs make every H rank-deficient."""
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:8] = 0.0
    report = prune_model(model, tiny_calibration(1, 4), "2:4", "true-obs", progress=False)
    q = next(r for r in report.layers if r.name == "model.layers.0.self_attn.q_proj")
    assert q.dead_inputs == 8 and q.rank_deficient and "dead inputs" in q.notes()
    assert all(r.status == "pruned" and r.pattern_holds for r in report.layers)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "dead inputs" in report.layer_table()


def test_a_method_that_fails_numerically_falls_back_to_magnitude(monkeypatch):
    from s3sparse.pruners import SparseGPT

    def broken(*args, **kwargs):
        raise FloatingPointError("rows stayed numerically unstable")

    monkeypatch.setattr(SparseGPT, "prune", broken)
    model = tiny_model("qwen3")
    report = prune_model(model, tiny_calibration(), "2:4", "sparsegpt", progress=False)
    assert all(r.fallback and "unstable" in r.fallback for r in report.layers)
    assert all(r.pattern_holds for r in report.layers)
    assert "magnitude fallback" in report.layer_table()
    assert report.sparsity_summary()["fallbacks"]
    _assert_fallbacks_counted(report, 14)


def _assert_fallbacks_counted(report, count: int) -> None:
    """The summary line and the JSON report count the fallbacks, and the JSON gives each reason."""
    import json

    assert report.fallback_count == count
    first_line = report.sparsity_report().splitlines()[0]
    assert f"{count} by magnitude after their method failed" in first_line, first_line
    data = json.loads(json.dumps(report.to_dict()))
    assert data["fallbacks"]["count"] == count
    assert data["sparsity"]["fallback_count"] == count
    assert sorted(data["fallbacks"]["layers"]) == sorted(r.name for r in report.layers if r.fallback)
    assert all(data["fallbacks"]["layers"][r.name] == r.fallback for r in report.layers if r.fallback)


def _state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _same_state(model, state) -> bool:
    return all(torch.equal(p, state[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("failure", ["numerical_error", "linalg_error"])
def test_genuine_numerical_failures_fall_back_and_are_counted(monkeypatch, failure):
    """NumericalError (what the pruners raise) and LinAlgError fall back, on the failing layers only."""
    from s3sparse import NumericalError
    from s3sparse.pruners import SparseGPT

    real = SparseGPT.prune
    exc = {
        "numerical_error": NumericalError("SparseGPT produced non-finite weights"),
        "linalg_error": torch.linalg.LinAlgError("cholesky: the factorization could not be completed"),
    }[failure]
    calls = []

    def fails_on_two_layers(self, scope, *args, **kwargs):
        calls.append(1)
        if len(calls) in (2, 9):
            raise exc
        real(self, scope, *args, **kwargs)

    monkeypatch.setattr(SparseGPT, "prune", fails_on_two_layers)
    report = prune_model(tiny_model("qwen3"), tiny_calibration(), "2:4", "sparsegpt", progress=False)
    fell_back = [r for r in report.layers if r.fallback]
    assert [report.layers.index(r) for r in fell_back] == [1, 8]
    assert all(type(exc).__name__ in r.fallback and r.pattern_holds for r in fell_back)
    _assert_fallbacks_counted(report, 2)


def test_no_fallback_is_counted_as_zero():
    report = prune_model(tiny_model("qwen3"), tiny_calibration(), "2:4", "obd", progress=False)
    _assert_fallbacks_counted(report, 0)


@pytest.mark.parametrize("error", ["argument_error", "type_error", "value_error"])
def test_argument_errors_inside_the_run_stop_it(monkeypatch, error):
    """An S3Error about an argument (or any ValueError / TypeError that is not numerical) raised by
    a method stops the run naming the layer; it used to be taken for a numerical failure and the
    layer silently pruned by magnitude. The failing layer's weight is left as it was."""
    from s3sparse import ArgumentError, S3Error
    from s3sparse.pruners import SparseGPT

    exc = {
        "argument_error": ArgumentError("`damp` must be a finite number >= 0, got -1"),
        "type_error": TypeError("unsupported operand"),
        "value_error": ValueError("a bug, not a numerical failure"),
    }[error]

    def refuses(*args, **kwargs):
        raise exc

    monkeypatch.setattr(SparseGPT, "prune", refuses)
    model = tiny_model("qwen3")
    before = _state(model)
    with pytest.raises(UsageError if error == "argument_error" else type(exc)) as info:
        prune_model(model, tiny_calibration(), "2:4", "sparsegpt", progress=False)
    if error == "argument_error":
        assert info.value.__cause__ is exc and isinstance(exc, S3Error)
        assert "model.layers.0.self_attn.q_proj" in str(info.value) and "`damp`" in str(info.value)
    else:
        assert info.value is exc
    assert _same_state(model, before)


def test_a_non_finite_weight_stops_the_run_before_any_work():
    """A NaN weight used to be zeroed by magnitude/OBD, or make SparseGPT fail and fall back."""
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[7, 3] = float("nan")
    before = _state(model)
    with pytest.raises(UsageError) as info:
        prune_model(model, tiny_calibration(), "2:4", "sparsegpt", progress=False)
    message = str(info.value)
    assert "`model.layers.1.mlp.up_proj`" in message and "NaN at index (7, 3)" in message
    assert isinstance(info.value.__cause__, __import__("s3sparse").NonFiniteError)
    assert all(torch.equal(p, before[name]) or torch.isnan(before[name]).any() for name, p in model.named_parameters())


def test_non_finite_calibration_inputs_stop_the_run():
    """An Inf in a norm (not a pruned layer) makes q/k/v's inputs non-finite: the run stops naming
    the layer (a NaN Hessian used to make the layer fall back to magnitude)."""
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = float("inf")
    before = _state(model)
    with pytest.raises(UsageError) as info:
        prune_model(model, tiny_calibration(), "2:4", "sparsegpt", progress=False)
    message = str(info.value)
    assert "the calibration inputs of `model.layers.0.self_attn.q_proj`" in message and "index (" in message
    assert isinstance(info.value.__cause__, __import__("s3sparse").NonFiniteError)
    assert _same_state(model, before)


def test_a_layer_whose_inputs_are_all_zero_falls_back_and_is_counted():
    """H = 0 (every input of q/k/v zero, so of o_proj too): no method can use it; those layers are
    pruned by magnitude and counted, the others by their method."""
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.zero_()
    report = prune_model(model, tiny_calibration(), "2:4", "sparsegpt", progress=False)
    fell_back = [r.name for r in report.layers if r.fallback]
    assert fell_back == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert all("every calibration input of this layer was zero" in r.fallback for r in report.layers if r.fallback)
    assert all(r.pattern_holds for r in report.layers)
    _assert_fallbacks_counted(report, 4)


def test_fp32_redo_warnings_are_counted(monkeypatch):
    import warnings

    from s3sparse.pruners import Magnitude

    real = Magnitude.prune

    def noisy(self, scope, hessian, nnz, *args, **kwargs):
        warnings.warn("prune_true_obs: 12 of 64 rows hit a non-positive-definite sub-problem and were redone", RuntimeWarning)
        real(self, scope, hessian, nnz, *args, **kwargs)

    monkeypatch.setattr(Magnitude, "prune", noisy)
    report = prune_model(tiny_model("qwen3"), tiny_calibration(), "2:4", "magnitude", progress=False)
    assert all(r.fp32_redos == 12 for r in report.layers)
    assert report.sparsity_summary()["fp32_redos"] == 12 * 14
    assert "rows redone in fp32: 168" in report.sparsity_report()


def test_offload_on_cpu_matches_no_offload():
    """The offload path (blocks moved one at a time) gives the same weights; on CPU both devices are the CPU."""
    a, b = tiny_model("qwen3"), tiny_model("qwen3")
    prune_model(a, tiny_calibration(), "2:4", "sparsegpt", progress=False)
    prune_model(b, tiny_calibration(), "2:4", "sparsegpt", progress=False, offload=True, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bf16_model():
    model = tiny_model("qwen3").to(torch.bfloat16)
    report = prune_model(model, tiny_calibration(), "2:4", "sparsegpt", progress=False)
    assert all(r.pattern_holds for r in report.layers)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_bad_calibration_argument():
    with pytest.raises(UsageError, match="calibration must be"):
        prune_model(tiny_model("qwen3"), torch.randn(2, 8), "2:4", "sparsegpt", progress=False)


@pytest.mark.cuda
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_pipeline(offload):
    model = tiny_model("qwen3")
    report = prune_model(model, tiny_calibration(), "2:4", "true-obs", device="cuda", offload=offload, progress=False)
    assert all(r.pattern_holds for r in report.layers)
    expected = "cpu" if offload else "cuda"
    assert all(p.device.type == expected for p in model.parameters())
