"""The benchmark scripts keep working: data generator, loader, pattern check, table1 and ops end to end (tiny sizes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import data  # noqa: E402
import table1  # noqa: E402


def test_synthetic_layer_is_deterministic_and_as_described():
    a = data.synthetic_layer(32, 256, N=300, seed=3)
    b = data.synthetic_layer(32, 256, N=300, seed=3)
    c = data.synthetic_layer(32, 256, N=300, seed=4)
    assert torch.equal(a.W, b.W) and torch.equal(a.H, b.H)
    assert not torch.equal(a.H, c.H)
    assert a.W.dtype == a.H.dtype == torch.float32
    assert torch.equal(a.H, a.H.T)
    # H = XᵀX/N from the same generator, recomputed in fp64.
    X = torch.cat(list(data.calibration_inputs(256, 300, seed=3))).double()
    assert X.shape == (300, 256)
    torch.testing.assert_close(a.H.double(), X.T @ X / 300, rtol=1e-4, atol=1e-4)
    # N < K: rank-deficient; the outlier channels are ×10 in scale (×100 in H's diagonal).
    assert torch.linalg.matrix_rank(a.H.double()) <= 300
    scales, outliers = data.channel_scales(256, seed=3)
    assert outliers.numel() == 1  # round(0.5% of 256) = 1
    assert 0.01 < float(a.W.std()) / 0.02 < 1.2


def test_load_layers_file_list_and_directory(tmp_path):
    L = data.synthetic_layer(16, 32, N=64)
    torch.save({"W": L.W, "H": L.H.double(), "name": "one", "N": 64}, tmp_path / "a.pt")
    torch.save([{"W": L.W.half(), "H": L.H}, {"W": L.W, "H": L.H, "name": "three"}], tmp_path / "b.pt")
    layers = data.load_layers(tmp_path)
    assert [x.name for x in layers] == ["one", "b[0]", "three"]
    assert all(x.W.dtype == torch.float32 and x.H.dtype == torch.float32 for x in layers)
    assert layers[0].meta["N"] == 64
    assert [x.name for x in data.load_layers(tmp_path / "a.pt")] == ["one"]
    torch.save({"W": L.W, "H": L.H[:8, :8]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="need W"):
        data.load_layers(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        data.load_layers(tmp_path / "missing.pt")


@pytest.mark.parametrize("pattern", list(table1.PATTERNS))
def test_check_pattern_accepts_only_its_own_pattern(pattern):
    W0 = torch.randn(32, 64)
    pruned = {}
    for p in table1.PATTERNS:
        W = nn.Parameter(W0.clone())
        scope, nnz = table1.ours_scope(p, W)
        scope.hard_threshold(nnz=nnz)
        pruned[p] = W.detach()
    nnz = table1.NNZ[pattern]
    assert table1.check_pattern(pattern, pruned[pattern], nnz)["pattern_ok"]
    assert not table1.check_pattern(pattern, W0, nnz)["pattern_ok"]
    # Coupled 2:4 is a special case of 2:4; no other pattern satisfies another.
    for p, Wp in pruned.items():
        if p != pattern and not (pattern == "24" and p == "coupled24"):
            assert not table1.check_pattern(pattern, Wp, nnz)["pattern_ok"], p
    broken = pruned[pattern].clone()
    broken[broken == 0] = 1.0  # every pruned block comes back
    res = table1.check_pattern(pattern, broken, nnz)
    assert not res["pattern_ok"] and res["scopes_over"] == res["scopes"]


def test_rows_redone_parses_the_true_obs_warning():
    msg = "prune_true_obs: 12 of 2560 rows hit a non-positive-definite sub-problem and were redone with fp32 C"
    assert table1.rows_redone([msg]) == 12
    assert table1.rows_redone(["something else"]) is None


def test_table1_end_to_end(tmp_path):
    out = tmp_path / "t.json"
    table1.main(["--device", "cpu", "-M", "32", "-K", "64", "-N", "128", "--repeat", "2",
                 "--methods", "magnitude", "sparsegpt", "true_obs_l2r", "--c-dtype", "default", "float32",
                 "--skip-cells", "block16:sparsegpt", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["meta"]["commit"] and res["meta"]["torch"] == torch.__version__
    cells = {(c["pattern"], c["method"], c["c_dtype"]): c for c in res["cells"]}
    assert len(cells) == 4 * 4
    assert cells[("block16", "sparsegpt", "default")]["status"] == "skipped"
    for key, c in cells.items():
        if c["status"] == "skipped":
            continue
        assert c["status"] == "ok", (key, c.get("exception"))
        assert c["pattern_ok"] and c["n_runs"] == 2 and 0 < c["error"] < 1
        assert (c["rows_fp32"] is not None) == (key[1] == "true_obs_l2r")
    # --merge keeps the earlier cells and replaces the re-run one.
    table1.main(["--device", "cpu", "-M", "32", "-K", "64", "-N", "128", "--repeat", "1", "--patterns", "24",
                 "--methods", "magnitude", "--merge", "--out", str(out)])
    res2 = json.loads(out.read_text())
    assert len(res2["cells"]) == len(res["cells"]) and len(res2["invocations"]) == 2
    # --combine merges result files without running anything.
    both = tmp_path / "both.json"
    table1.main(["--combine", str(out), str(out), "--out", str(both)])
    res3 = json.loads(both.read_text())
    assert len(res3["cells"]) == len(res["cells"]) and len(res3["invocations"]) == 4


def test_table1_peer_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sparsekit", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match="--peer sparsekit: cannot import sparsekit"):
        table1.main(["--device", "cpu", "-M", "32", "-K", "64", "--peer", "sparsekit", "--out", str(tmp_path / "x.json")])


def test_ops_benchmark_runs(tmp_path, monkeypatch):
    import ops as ops_bench

    out = tmp_path / "ops.json"
    ops_bench.main(["--quick", "--repeat", "1", "--ops", "kth_largest",
                    "block_reduce", "no_such_op", "--out", str(out)])
    res = json.loads(out.read_text())
    assert {"copy_GB/s", "gemm_fp16_TFLOP/s", "gemm_fp32_TFLOP/s"} <= set(res["meta"]["ceilings"])
    rows = res["results"]
    assert any(r["op"] == "kth_largest" and r["GB/s"] > 0 for r in rows)
    assert any(r["op"] == "no_such_op" and r["status"] == "skipped" for r in rows)


def test_multi_gpu_benchmark_quick_on_two_cpu_ranks(tmp_path):
    """benchmarks/multi_gpu.py under torchrun, 2 gloo ranks on the CPU, tiny sizes."""
    import os
    import subprocess

    out = tmp_path / "mg.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(BENCH / "multi_gpu.py"), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    meta, layer, model = res["meta"], res["results"]["layer"], res["results"]["model"]
    assert meta["world_size"] == 2 and meta["backend"] == "gloo" and meta["commit"] and meta["torch"] == torch.__version__
    assert meta["env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    assert layer["seconds_1_rank"] > 0 and len(layer["seconds_n_ranks_per_rank"]) == 2 and layer["speedup"] > 0
    # The all-reduced H is the single-rank H up to fp32 round-off, and so are the results.
    assert layer["hessian_max_relative_difference"] < 1e-5
    assert layer["masks_differing"] == 0 and layer["error_relative_difference"] < 1e-5
    assert 0 < layer["error_n_ranks"] < 1
    assert model["layers"] == 7 and model["seconds_1_rank"] > 0 and model["layer_error_max_relative_difference"] < 1e-3


def test_packed_benchmark_runs(tmp_path):
    import packed as packed_bench

    out = tmp_path / "packed.json"
    res = packed_bench.main(["--quick", "--check", "--tokens", "1", "5", "--repeat", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    meta = res["meta"]
    assert meta["device"] and meta["torch"] == torch.__version__ and meta["commit"] and meta["copy_GB/s"] > 0
    assert meta["check"] and set(meta["timings"]) == {"graph", "eager"}
    assert not res["failures"] and not res["check_failures"]
    rows = res["results"]
    assert {r["pattern"] for r in rows} == set(packed_bench.PATTERNS)
    assert len(rows) == len(packed_bench.QUICK_SHAPES) * len(packed_bench.PATTERNS) * 2
    for r in rows:
        # On the CPU only the eager timing runs; no CUDA graph.
        assert not any("graph" in key for key in r), r
        for method in ("dense", "packed"):
            assert r[f"{method}_eager_s"] > 0 and r[f"{method}_eager_GB/s"] > 0 and r[f"{method}_eager_of_copy"] > 0
            assert r[f"{method}_rel_err"] < 5e-3, r  # fp16 output rounding
        assert r["packed_eager_speedup"] > 0 and r["unpack_exact"]
        # Semi-structured sparsity runs only on a GPU; the row says why not.
        assert "semi_eager_s" not in r and "CUDA only" in r["semi_status"]
        # The gather method (pack's GatherLinear) runs on the patterns of whole input columns only.
        if r["pattern"].startswith(packed_bench.COLUMN_PATTERNS):
            assert r["gather_eager_s"] > 0 and r["gather_rel_err"] < 5e-3, r
            kept = r["K"] // 2
            assert r["gather_bytes"] == r["M"] * kept * 2 + kept * 8, r  # half the columns (fp16) + the int64 index
        else:
            assert "gather_eager_s" not in r and "whole input columns" in r["gather_status"]
    ratio = {r["pattern"]: r["ratio"] for r in rows if (r["M"], r["K"]) == (64, 256)}
    assert ratio["2:4"] <= 0.56 and ratio["block16-rows"] < ratio["4:8"] < ratio["2:4"]


def test_packed_benchmark_semi_structured_needs_a_two_four_weight():
    import packed as packed_bench

    W = torch.randn(8, 16)
    assert not packed_bench.is_two_four(W)
    W.view(8, 4, 4)[..., :2] = 0
    assert packed_bench.is_two_four(W)
    if not torch.cuda.is_available():
        assert "CUDA only" in packed_bench.semi_structured(W)[-1]
    assert packed_bench.n_copies(100, 0) == 1 and packed_bench.n_copies(100, 450) == 5


def test_packed_model_benchmark_runs(tmp_path):
    pytest.importorskip("transformers")
    import packed_model

    out = tmp_path / "model.json"
    res = packed_model.main(["--quick", "--repeat", "1", "--prefix", "8", "--fuse", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    meta, results, checks = res["meta"], res["results"], res["checks"]
    assert meta["device"] and meta["torch"] == torch.__version__ and meta["commit"] and meta["transformers"]
    assert meta["config"]["num_hidden_layers"] == 2 and meta["prefix"] == 8 and meta["batch"] == 1
    assert meta["pruned_linears"] == 14 and meta["pack"]["layers"] == 14  # q, k, v, o, gate, up, down × 2 layers
    assert meta["pack"]["bytes_after"] < 0.6 * meta["pack"]["bytes_before"]
    assert not res["failures"]
    for name in ("dense", "packed"):
        r = results[name]
        assert r["eager_s"] > 0 and r["eager_tokens_per_s"] > 0 and "graph_s" not in r  # no CUDA graph on the CPU
    assert results["packed"]["weight_bytes"] < results["dense"]["weight_bytes"]
    assert results["packed"]["eager_speedup"] > 0
    # fp32 on the CPU: the decode step is the model's forward, and the packed model the pruned dense one.
    assert checks["ok"] and checks["same_greedy_token"]
    assert checks["step_vs_model_rel_err"] < 1e-5 and checks["packed_vs_dense_rel_err"] < 1e-5
    # --fuse: copies of both with q|k|v and gate|up stacked (fuse_siblings), timed and checked the same way.
    assert meta["fused"] and results["packed-fused"]["eager_speedup"] > 0 and results["dense-fused"]["eager_s"] > 0
    assert checks["dense-fused_vs_dense_rel_err"] < 1e-5 and checks["packed-fused_vs_dense_rel_err"] < 1e-5


def test_packed_model_profile_names_what_each_model_runs(tmp_path):
    pytest.importorskip("transformers")
    import packed_model

    prof = tmp_path / "profile.txt"
    packed_model.main(["--quick", "--repeat", "1", "--prefix", "8", "--profile", str(prof),
                       "--out", str(tmp_path / "model.json")])
    dense, packed = prof.read_text().split("# packed\n")
    assert dense.startswith("# dense\nCPU ops (self time): ")
    # The dense step's Linears are aten's; the packed step's go through the packed op instead.
    assert "aten::addmm" in dense or "aten::mm" in dense
    assert "s3sparse::packed_linear" in packed and "s3sparse::packed_linear" not in dense


def test_decode_step_matches_the_model_token_after_token():
    """DecodeStep at several prefix lengths, on a model whose layers are not pruned: model.forward's last logits."""
    pytest.importorskip("transformers")
    import packed_model

    model = packed_model.build_model(packed_model.QUICK, 1, torch.device("cpu"), torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    for prefix in (1, 5, 11):
        step = packed_model.DecodeStep(model, prefix)
        step.prefill(ids[:, :prefix])
        step.token.copy_(ids[:, prefix:prefix + 1])
        got = step.step()
        with torch.no_grad():
            want = model(ids[:, :prefix + 1]).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step.step(), got, rtol=0, atol=0)  # a step repeats exactly (graph replays)


def test_prune_split_benchmark_runs(tmp_path):
    import bench_prune_split

    out = tmp_path / "split.json"
    bench_prune_split.main(["--rows", "32", "--cols", "128", "--samples", "256", "--patterns", "24", "block16",
                            "--modes", "full", "interleaved", "--n-splits", "4", "--repeats", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["meta"]["M"] == 32 and res["meta"]["K"] == 128
    rows = res["results"]
    assert [(r["pattern"], r["mode"], r["n_splits"]) for r in rows] == [
        ("24", "full", 1), ("24", "interleaved", 4), ("block16", "full", 1), ("block16", "interleaved", 4)
    ]
    assert all(0 < r["error"] < 1 and r["seconds"] > 0 and 0 < r["working_ops"] < r["aten_ops"] for r in rows)


def test_refine_benchmark_runs(tmp_path, capsys):
    import refine

    out = tmp_path / "r.json"
    refine.main(["--synthetic", "16x64", "--sweeps", "1", "--patterns", "2:4", "--starts", "magnitude", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["errors"][1] <= row["errors"][0] and len(row["seconds"]) == 1
    assert row["start_seconds"] >= 0 and row["refine_peak_gib"] is None  # CPU: no CUDA peak
    assert result["environment"]["torch"] == torch.__version__


def test_refine_benchmark_first_rows(tmp_path):
    import refine

    out = tmp_path / "r.json"
    refine.main(["--synthetic", "32x64", "--rows", "16", "--sweeps", "1", "--patterns", "block16", "--starts",
                 "magnitude", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shape"] == [16, 64] and row["layer"].endswith("[:16]")
    assert row["errors"][1] <= row["errors"][0]
