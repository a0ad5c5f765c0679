"""Pruning on several processes (torch.distributed, gloo, 2 ranks on the CPU).

Layer level: ``prune_sparsegpt`` / ``prune_true_obs`` with a ``process_group``
give the weight one process computes on the same H, with whole row groups per
rank. Model level: ``prune_model`` on 2 ranks against 1 (H summed over the
ranks' windows); the CLI under torchrun. Errors: a rank that raises makes every
rank raise, and no OUT_DIR is left. The workers live in ``dist_workers.py``;
each spawn runs many scenarios, so the process start-up is paid once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dist_workers
from test_llm_support import save_tiny_model

from s3sparse.llm import UsageError, parse_pattern, prune_model
from s3sparse.pruners import StructuredOBS, prune_sparsegpt
from s3sparse.pruners.layout import restrict_rows, row_components, scope_layout
from s3sparse.pruners.sharding import split_evenly

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------ no processes
def test_split_evenly_gives_contiguous_runs_differing_by_at_most_one():
    assert split_evenly(37, 2) == [0, 18, 37]
    assert split_evenly(3, 4) == [0, 0, 1, 2, 3]
    for n, parts in [(10, 3), (0, 2), (100, 7)]:
        bounds = split_evenly(n, parts)
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        assert bounds[0] == 0 and bounds[-1] == n and max(sizes) - min(sizes) <= 1


def test_row_components_keep_row_coupled_rows_together():
    W = torch.nn.Parameter(torch.randn(32, 32))
    scope, _ = parse_pattern("block16-rows").build(W)
    layout = scope_layout(scope)
    components = row_components(layout)
    assert sorted(tuple(c.tolist()) for c in components) == sorted((p, p + 8) for b in (0, 16) for p in range(b, b + 8))
    rows = torch.cat(components[:3])
    sub = restrict_rows(layout, rows, W.detach()[rows])
    assert sub.num_scopes == layout.num_scopes * 3 // 16 and int(sub.rows.max()) == rows.numel() - 1
    with pytest.raises(ValueError, match="splits a scope"):
        restrict_rows(layout, torch.tensor([0, 1]), W.detach()[:2])


def test_a_process_group_without_torch_distributed_is_a_clear_error():
    W = torch.nn.Parameter(torch.randn(8, 16))
    scope, nnz = parse_pattern("2:4").build(W)
    H = torch.eye(16)
    with pytest.raises(ValueError, match="not initialised.*init_process_group"):
        prune_sparsegpt(scope, H, nnz, process_group=object())
    with pytest.raises(ValueError, match="not initialised"):
        StructuredOBS(scope, H).prune_true_obs(nnz, process_group="world")
    with pytest.raises(UsageError, match="process_group must be 'auto', None or"):
        prune_model(torch.nn.Linear(2, 2), torch.zeros(1, 4, dtype=torch.long), process_group="everyone")


# ------------------------------------------------------------------ one layer, 2 ranks
@pytest.fixture(scope="module")
def layer_runs(tmp_path_factory):
    return dist_workers.spawn(dist_workers.layer_worker, tmp_path_factory.mktemp("layer"))


@pytest.mark.parametrize("pattern", [case[0] for case in dist_workers.LAYER_CASES])
@pytest.mark.parametrize("method", ["sparsegpt", "true-obs"])
def test_sharded_layer_equals_the_single_process_result_on_every_rank(layer_runs, pattern, method):
    for rank, run in enumerate(layer_runs):
        result = run["pruned"][(pattern, method)]
        alone, sharded = result["alone"], result["sharded"]
        # Rows are independent given H: the same masks, the same weights up to round-off.
        assert torch.equal(alone == 0, sharded == 0), (rank, pattern, method)
        assert _max_relative_difference(alone, sharded) <= 1e-6, (rank, pattern, method)
        assert parse_pattern(pattern).holds(sharded)
    # Every rank ends with the whole layer, the same one.
    assert torch.equal(layer_runs[0]["pruned"][(pattern, method)]["sharded"], layer_runs[1]["pruned"][(pattern, method)]["sharded"])


@pytest.mark.parametrize("pattern", [case[0] for case in dist_workers.LAYER_CASES])
def test_sharded_refine_mask_is_the_single_process_one_on_every_rank(layer_runs, pattern):
    """refine_mask with a process group: each rank sweeps its row groups, the rows are gathered; the same
    swaps per sweep (counts summed over the ranks) and weights as alone, identical on every rank; and
    True OBS with refine=2 on the group ends with the same mask."""
    for run in layer_runs:
        result = run["refined"][pattern]
        (alone, changed_alone), (sharded, changed_sharded) = result["alone"], result["sharded"]
        assert changed_sharded == changed_alone
        assert torch.equal(alone == 0, sharded == 0)
        assert _max_relative_difference(alone, sharded) <= 1e-6
        assert torch.equal(result["option"] == 0, alone == 0)
    assert layer_runs[0]["refined"][pattern]["alone"][1][0] > 0 or pattern == "4:8"  # one row: maybe no swap
    for key in ("sharded", "option"):
        first, second = (run["refined"][pattern][key] for run in layer_runs)
        first, second = (first[0], second[0]) if key == "sharded" else (first, second)
        assert torch.equal(first, second), key


@pytest.mark.parametrize("pattern, M, K", dist_workers.LAYER_CASES)
def test_row_shards_are_whole_row_groups_covering_every_row_once(layer_runs, pattern, M, K):
    shards = layer_runs[0]["shards"][pattern]
    assert shards == layer_runs[1]["shards"][pattern]  # every rank agrees on who prunes what
    group_of = {row: tuple(c) for c in shards["components"] for row in c}
    for key in ("true_obs_rows", "sparsegpt_rows"):
        per_rank = shards[key]
        assert sorted(r for rows in per_rank for r in rows) == list(range(M))
        for rows in per_rank:
            assert all(set(group_of[r]) <= set(rows) for r in rows), (key, "a row group was split")
        groups = [len({group_of[r] for r in rows}) for rows in per_rank]
        assert max(groups) - min(groups) <= 1, groups
    if pattern == "2:4":
        assert [len(rows) for rows in shards["true_obs_rows"]] == [18, 19]  # 37 rows: an uneven split
    if pattern == "block16-rows":
        assert all(len(c) == 2 and c[1] - c[0] == 8 for c in shards["components"])


def test_a_rank_that_raises_in_a_pruner_makes_every_rank_raise(layer_runs):
    for rank, run in enumerate(layer_runs):
        failure = run["failures"]["true-obs"]
        # The same type everywhere (callers that fall back on it stay in step), the weight untouched.
        assert not failure["ok"] and failure["type"] == "FloatingPointError" and "injected on rank 1" in failure["message"]
        assert failure["unchanged"]
        assert any("raised on rank 1 of 2" in note for note in failure["notes"]), failure["notes"]
        unpicklable = run["failures"]["sparsegpt-unpicklable"]
        assert not unpicklable["ok"] and unpicklable["unchanged"] and "injected on rank 1" in unpicklable["message"]
        # Rank 1 raises its own exception; rank 0 cannot rebuild a local class, and says what it was.
        assert unpicklable["type"] == ("LocalOnlyError" if rank == 1 else "RankFailedError")
        if rank == 0:
            assert "rank 1 of 2 failed while pruning its rows with SparseGPT: LocalOnlyError" in unpicklable["message"]
    # After the failures the ranks are still in step: a clean sharded call works.
    assert torch.equal(layer_runs[0]["after_failures"], layer_runs[1]["after_failures"])


def test_rows_redone_on_one_rank_are_counted_in_every_rank_s_warning(layer_runs):
    messages = [run["redone_warnings"] for run in layer_runs]
    assert len(messages[0]) == 1 and messages[0] == messages[1], messages
    redone = int(messages[0][0].split("prune_true_obs: ")[1].split(" of ")[0])
    assert 0 < redone <= 19 and " of 37 rows" in messages[0][0]  # rank 1 prunes 19 of the 37 rows
    assert torch.equal(layer_runs[0]["redone_weight"], layer_runs[1]["redone_weight"])
    assert torch.isfinite(layer_runs[0]["redone_weight"]).all()


# ------------------------------------------------------------------ a whole model, 2 ranks
@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    return dist_workers.spawn(dist_workers.model_worker, tmp_path_factory.mktemp("model"))


def _compare(alone, ranks):
    """(largest weight difference relative to the weight's scale, masks that differ, largest relative layer-error difference)."""
    (wa, ra), (wb, rb) = alone, ranks
    weight = max(_max_relative_difference(wa[k], wb[k]) for k in wa)
    masks = sum(int(((wa[k] == 0) != (wb[k] == 0)).sum()) for k in wa)
    errors = max(abs(x["error"] - y["error"]) / x["error"] for x, y in zip(ra["layers"], rb["layers"]))
    return weight, masks, errors


def test_two_ranks_agree_with_one_within_fp32_round_off_of_the_summed_hessian(model_runs):
    for run in model_runs:
        weight, masks, errors = _compare(run["fp32"]["alone"], run["fp32"]["ranks"])
        print(f"fp32 H: weights {weight:.2e} (relative), masks differing {masks}, layer errors {errors:.2e} (relative)")
        # fp32 sums in another order: a near-tied mask entry may flip (no bound on where ties fall),
        # so only a handful may differ; the default fp64 sums are held to equality (the test below).
        entries = sum(w.numel() for w in run["fp32"]["alone"][0].values())
        assert masks <= entries // 1000 and errors < 1e-3
        report = run["fp32"]["ranks"][1]
        assert report["world_size"] == 2 and report["calibration"]["n_samples"] == 15
        assert all(layer["status"] == "pruned" and layer["pattern_holds"] for layer in report["layers"])
        assert {layer["method"] for layer in report["layers"]} == {"true-obs", "sparsegpt", "obd"}


def test_fp64_hessians_make_two_ranks_give_the_one_rank_weights_exactly(model_runs):
    for run in model_runs:
        for case in ("fp64", "one_window"):  # one_window: rank 0 has no calibration window at all
            weight, masks, errors = _compare(run[case]["alone"], run[case]["ranks"])
            assert weight == 0 and masks == 0 and errors == 0, case


def test_same_world_size_and_seed_give_identical_weights_on_every_rank(model_runs):
    """Two 2-rank runs (the second with progress bars, a third with offload) give the same weights, on both ranks."""
    first = model_runs[0]["fp32"]["ranks"][0]
    for run in model_runs:
        for weights in (run["fp32"]["ranks"][0], run["fp32"]["again"][0], run["fp32"]["offload"][0]):
            assert weights.keys() == first.keys() and all(torch.equal(weights[k], first[k]) for k in first)
    # Both ranks report the same layer errors.
    assert [x["error"] for x in model_runs[0]["fp32"]["ranks"][1]["layers"]] == \
        [x["error"] for x in model_runs[1]["fp32"]["ranks"][1]["layers"]]


def test_progress_bars_on_rank_0_only(model_runs):
    assert "blocks" in model_runs[0]["stderr_with_progress"]
    assert model_runs[1]["stderr_with_progress"] == ""


def test_a_numeric_failure_on_one_rank_falls_back_to_magnitude_on_every_rank(model_runs):
    reports = [run["fallback"][1] for run in model_runs]
    for report in reports:
        fallbacks = [layer["name"] for layer in report["layers"] if layer["fallback"]]
        assert fallbacks == ["model.layers.0.mlp.down_proj"]
        assert "injected non-finite weights on rank 1" in report["layers"][6]["fallback"]
        assert all(layer["pattern_holds"] for layer in report["layers"])
    weights = [run["fallback"][0] for run in model_runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_rank_that_raises_in_a_block_makes_every_rank_raise(model_runs):
    for run in model_runs:
        failure = run["block_failure"]
        assert not failure["ok"] and failure["type"] == "RuntimeError"
        assert "injected failure in a block forward on rank 1" in failure["message"]
    assert any("running model.layers.1 on its calibration windows" in n for n in model_runs[0]["block_failure"]["notes"])


# ------------------------------------------------------------------ the CLI under torchrun
FAST = ["--pattern", "2:4", "--method", "true-obs", "--opt", "ng=8", "--override", "*.down_proj=4:8,method=sparsegpt",
        "--calib", "pydoc:calib", "--n-samples", "6", "--seq-len", "32", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "qwen3"))


def _torchrun(args, cwd, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_torchrun_prune_matches_the_single_process_cli(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from s3sparse.llm.cli import main

    alone = tmp_path / "alone"
    assert main(["prune", model_dir, "--out", str(alone), *FAST]) == 0
    capsys.readouterr()
    out = tmp_path / "two"
    proc = _torchrun(["-m", "s3sparse", "prune", model_dir, "--out", str(out), *FAST], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 alone prints the table and writes OUT_DIR
    assert proc.stdout.count("saved the pruned model") == 1
    assert sum(line.startswith("layer ") for line in proc.stdout.splitlines()) == 1
    assert "2 processes (torchrun)" in proc.stdout
    a, b = load_file(str(alone / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    # The default fp64 Hessian sums make H (rounded to fp32) independent of how the windows are
    # split over the ranks: every mask is the one-process mask, and the weights are the same up to
    # the round-off of pruning a share of the rows (none here; 1e-6 allows other BLAS builds).
    differing = {k: int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a}
    assert sum(differing.values()) == 0, {k: n for k, n in differing.items() if n}
    assert max(_max_relative_difference(a[k], b[k]) for k in a) <= 1e-6
    report = json.loads((out / "s3sparse.json").read_text())
    single = json.loads((alone / "s3sparse.json").read_text())
    assert report["world_size"] == 2 and single["world_size"] == 1
    worst = max(abs(x["error"] - y["error"]) / x["error"] for x, y in zip(single["layers"], report["layers"]))
    print(f"torchrun vs one process: largest relative layer-error difference {worst:.2e}")
    assert worst <= 1e-6
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


@pytest.mark.parametrize("where, rank, message", [("measure", 1, "out of memory (injected on rank 1)"),
                                                  ("save", 0, "disk full (injected on rank 0)")])
def test_torchrun_a_failing_rank_stops_every_rank_and_leaves_no_out_dir(model_dir, tmp_path, where, rank, message):
    out = tmp_path / "out"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_workers.py")
    proc = _torchrun([script, where, "prune", model_dir, "--out", str(out), *FAST], tmp_path)
    assert proc.returncode != 0
    # Both ranks raise the error: the failing one its own, the other a copy saying where it came from.
    other = 1 - rank
    assert f"raised on rank {rank} of 2" in proc.stderr and "every rank stops with it" in proc.stderr, proc.stderr[-4000:]
    assert f"rank {other} stops with it" in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.count(message) >= 2
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_a_torchrun_environment_without_a_rendezvous_is_a_one_line_usage_error(model_dir, tmp_path, monkeypatch, capsys):
    from s3sparse.llm.cli import main

    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["prune", model_dir, "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s3sparse (rank 0 of 2): error: WORLD_SIZE=2 is set but torch.distributed could not start")
    assert "launch with torchrun" in err and len(err.splitlines()) == 1
    assert not torch.distributed.is_initialized() and not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "two")
    assert main(["prune", model_dir, "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "RANK='two' is not an integer" in capsys.readouterr().err
