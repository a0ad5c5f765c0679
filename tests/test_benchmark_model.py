"""benchmarks/model.py (issue 16 item 3, whole-model pruning) keeps working: a tiny Qwen3 on the CPU, SparseGPT, 2:4."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_model_benchmark_tiny_sparsegpt(tmp_path, capsys):
    pytest.importorskip("transformers")
    import model as model_bench

    from s3sparse.llm import pipeline

    originals = {name: getattr(pipeline, name) for name in model_bench.PipelineTimer.WRAPPED}
    out = tmp_path / "model.json"
    res = model_bench.main(["--tiny", "--device", "cpu", "--methods", "sparsegpt", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    # The timing wrappers are gone once the run is over.
    assert all(getattr(pipeline, name) is fn for name, fn in originals.items())

    meta = res["meta"]
    assert meta["benchmark"] == "model" and meta["torch"] == torch.__version__ and meta["commit"]
    assert meta["device"] and meta["transformers"] and meta["methods"] == ["sparsegpt"]
    assert meta["windows"] == model_bench.TINY_WINDOWS and meta["seq_len"] == model_bench.TINY_SEQ_LEN
    config = meta["config"]
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64 and config["tie_word_embeddings"]

    r = res["results"]["sparsegpt"]
    assert r["status"] == "ok" and res["ok"]
    for key in ("total_s", "calibration_s", "prune_s", "other_s", "capture_s", "dense_forward_s", "hessian_s",
                "pruned_forward_s", "block_error_s", "layer_overhead_s", "build_s", "init_checksum", "mean_error"):
        assert isinstance(r[key], float), key
    assert r["split"] == "wrapped pipeline functions" and r["wrappers_missing"] == []
    assert r["peak_gib"] is None  # CPU: no CUDA memory figure
    # The split accounts for the whole call (no timing asserts beyond that).
    parts = r["calibration_s"] + r["prune_s"] + r["other_s"]
    assert parts == pytest.approx(r["total_s"], rel=1e-6)
    assert r["hessian_s"] <= r["dense_forward_s"]
    # Every block Linear is pruned, and the weights hold 2:4 exactly.
    assert r["linears_pruned"] == r["linears_expected"] == 2 * model_bench.LINEARS_PER_BLOCK and r["all_pruned"]
    check = r["check"]
    assert check["pattern_ok"] and check["layers_failed"] == [] and check["groups_over"] == 0
    assert check["zero_fraction"] == 0.5 and check["layers_checked"] == r["linears_pruned"]
    assert r["fallbacks"] == 0 and r["pipeline_pattern_violations"] == []
    assert [b["block"] for b in r["blocks"]] == [0, 1] and len(r["layers"]) == r["linears_pruned"]
    assert r["calibration"]["n_samples"] == model_bench.TINY_WINDOWS

    printed = capsys.readouterr().out
    assert "[sparsegpt] block 1/2" in printed and "[sparsegpt] block 2/2" in printed
    assert "all checks passed" in printed


def test_model_benchmark_weight_check_sees_a_broken_group():
    pytest.importorskip("transformers")
    import model as model_bench

    layer = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4], [0, 0, 5, 6, 7, 8, 9, 0]]))
    holder = torch.nn.Module()
    holder.lin = layer
    check = model_bench.check_weights(holder, ["lin"], "2:4")
    assert not check["pattern_ok"] and check["layers_failed"] == ["lin"]
    assert check["groups"] == 4 and check["groups_over"] == 1 and check["zero_fraction"] == 7 / 16
