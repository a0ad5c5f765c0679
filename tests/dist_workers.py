"""Worker functions of tests/test_distributed.py (no tests here): run on 2 processes with gloo.

:func:`spawn` starts ``world`` processes with ``torch.multiprocessing.spawn``,
joins them into one gloo process group (file rendezvous in a scratch
directory, so parallel test runs never share a port), runs ``fn(rank, *args)``
on each and returns every rank's result (saved with ``torch.save``).
Each worker runs several scenarios, so the process start-up is paid once.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys

import torch
import torch.distributed as dist

WORLD = 2
# A hang (a rank missing a collective) fails the test after this, rather than never.
TIMEOUT_S = 120


def _entry(rank: int, world: int, scratch: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{scratch}/rendezvous", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        result = fn(rank, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    torch.save(result, os.path.join(scratch, f"result-rank{rank}.pt"))
    # Every rank has saved its result: leave without tearing gloo down. Its teardown has
    # aborted a rank now and then (SIGABRT, "terminate called without an active exception")
    # after the work was done, which failed the test (as in benchmarks/multi_gpu.py).
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, scratch, *args, world: int = WORLD) -> list:
    """``[fn(0, *args), fn(1, *args), ...]``, each run on its own rank of one gloo group."""
    import torch.multiprocessing as mp

    scratch = str(scratch)
    os.makedirs(scratch, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_entry, args=(world, scratch, fn, args), nprocs=world, join=True)
    return [torch.load(os.path.join(scratch, f"result-rank{r}.pt"), weights_only=False) for r in range(world)]


def _caught(fn) -> dict:
    """Run ``fn()``; what it raised (type name, message, notes) or ``{"ok": True}``."""
    try:
        fn()
    except Exception as exc:  # the scenario is about what is raised
        return {"ok": False, "type": type(exc).__name__, "message": str(exc), "notes": list(getattr(exc, "__notes__", []))}
    return {"ok": True}


# ------------------------------------------------------------------ one layer
# (pattern, M, K): 37 row groups split 18 / 19; block16-rows couples rows p and p+8;
# one row: rank 0 has nothing to prune.
LAYER_CASES = [
    ("2:4", 37, 64),
    ("block16-rows", 48, 64),
    ("coupled-2:4", 32, 64),
    ("4:8", 1, 64),
]


def _layer(M: int, K: int):
    g = torch.Generator().manual_seed(1234)
    W = torch.randn(M, K, generator=g)
    X = torch.randn(4 * K, K, generator=g) * (0.2 + torch.rand(K, generator=g))
    from s3sparse.pruners import compute_hessian

    return W, compute_hessian(X)


def _prune_layer(pattern: str, W0, H, method: str, group, **options):
    from s3sparse.llm import parse_pattern
    from s3sparse.pruners import StructuredOBS, prune_sparsegpt

    W = torch.nn.Parameter(W0.clone())
    scope, nnz = parse_pattern(pattern).build(W)
    if method == "sparsegpt":
        prune_sparsegpt(scope, H, nnz, process_group=group, **options)
    else:
        StructuredOBS(scope, H).prune_true_obs(nnz, process_group=group, **options)
    return W.detach().clone()


def _refine_layer(pattern: str, W0, H, pruned, group):
    """(weight, changed per sweep) of refine_mask's 2 sweeps from ``pruned``, alone or split over ``group``."""
    from s3sparse.llm import parse_pattern
    from s3sparse.pruners import refine_mask

    W = torch.nn.Parameter(pruned.clone())
    scope, nnz = parse_pattern(pattern).build(W)
    result = refine_mask(scope, H, nnz, W0, sweeps=2, chunk_size=3, process_group=group)
    return W.detach().clone(), result.changed


def layer_worker(rank: int) -> dict:
    """Sharded vs single-process pruning of one layer on the same H; row shards; failures on rank 1."""
    from s3sparse.llm import parse_pattern
    from s3sparse.pruners import layout as layout_mod
    from s3sparse.pruners import StructuredOBS
    from s3sparse.pruners import sparsegpt as sparsegpt_mod
    from s3sparse.pruners.true_obs_sweep import ChunkSweep
    from s3sparse.pruners.sharding import RowShard

    group = dist.group.WORLD
    out: dict = {"pruned": {}, "shards": {}, "failures": {}, "refined": {}}
    for pattern, M, K in LAYER_CASES:
        W0, H = _layer(M, K)
        scope, _ = parse_pattern(pattern).build(torch.nn.Parameter(W0.clone()))
        lay = layout_mod.scope_layout(scope)
        out["shards"][pattern] = {
            "components": [c.tolist() for c in layout_mod.row_components(lay)],
            "true_obs_rows": [r.tolist() for r in RowShard.of_groups(layout_mod.row_groups(lay).rows, group).rows_by_rank],
            "sparsegpt_rows": [r.tolist() for r in RowShard.of_groups(layout_mod.row_components(lay), group).rows_by_rank],
        }
        for method in ("sparsegpt", "true-obs"):
            out["pruned"][(pattern, method)] = {
                "alone": _prune_layer(pattern, W0, H, method, None),
                "sharded": _prune_layer(pattern, W0, H, method, group),
            }
        out["refined"][pattern] = {
            "alone": _refine_layer(pattern, W0, H, out["pruned"][(pattern, "true-obs")]["alone"], None),
            "sharded": _refine_layer(pattern, W0, H, out["pruned"][(pattern, "true-obs")]["alone"], group),
            "option": _prune_layer(pattern, W0, H, "true-obs", group, refine=2),
        }

    # Failures on rank 1 only: every rank must raise, and no rank may write its weight.
    W0, H = _layer(37, 64)
    real_chunk = ChunkSweep.run
    real_sweep = sparsegpt_mod._sweep

    class LocalOnlyError(Exception):
        """Defined in a function: cannot be pickled, so the other ranks get a RankFailedError."""

    def run(kind):
        W = torch.nn.Parameter(W0.clone())
        scope, nnz = parse_pattern("2:4").build(W)
        result = _caught(lambda: (
            sparsegpt_mod.prune_sparsegpt(scope, H, nnz, process_group=group) if kind.startswith("sparsegpt")
            else StructuredOBS(scope, H).prune_true_obs(nnz, process_group=group)
        ))
        result["unchanged"] = bool(torch.equal(W.detach(), W0))
        return result

    def failing_chunk(self, *args, **kwargs):
        raise FloatingPointError("injected on rank 1")

    def failing_sweep(*args, **kwargs):
        raise LocalOnlyError("injected on rank 1")

    if rank == 1:
        ChunkSweep.run = failing_chunk
    out["failures"]["true-obs"] = run("true-obs")
    ChunkSweep.run = real_chunk
    if rank == 1:
        sparsegpt_mod._sweep = failing_sweep
    out["failures"]["sparsegpt-unpicklable"] = run("sparsegpt")
    sparsegpt_mod._sweep = real_sweep
    # And a clean call afterwards still works: nobody is left out of step.
    out["after_failures"] = _prune_layer("2:4", W0, H, "sparsegpt", group)

    # Rows redone in fp32 on rank 1 only: the warning counts them on every rank.
    import warnings

    from s3sparse import ops

    from s3sparse.pruners import true_obs

    real_sub = ops.lowrank_sub
    real_level = true_obs._prune_level
    level_dtype = {"now": None}

    def level(layer, W, todo, s, lvl, dtype, *args):
        level_dtype["now"] = dtype  # the level's factor precision (on CPU held in fp32: not a.dtype)
        return real_level(layer, W, todo, s, lvl, dtype, *args)

    def flaky(base, a, b):
        result = real_sub(base, a, b)
        if level_dtype["now"] == torch.float16 and result.shape[1] > 4:  # the panels C[S, R], as in test_pruners
            result[::3] = float("nan")
        return result

    if rank == 1:
        ops.lowrank_sub = flaky
        true_obs._prune_level = level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["redone_weight"] = _prune_layer("2:4", W0, H, "true-obs", group, chunk_size=16)
    ops.lowrank_sub = real_sub
    true_obs._prune_level = real_level
    out["redone_warnings"] = [str(w.message) for w in caught if "redone" in str(w.message)]
    return out


# ------------------------------------------------------------------ whole model
def _tiny():
    from test_llm_support import tiny_model

    return tiny_model("qwen3")


def _calibration(n_samples: int):
    from test_llm_support import tiny_calibration

    return tiny_calibration(n_samples, 32)


# true-obs by default; one MLP layer by SparseGPT, one attention layer by OBD (not row-split: broadcast)
_OVERRIDES = {"*.mlp.down_proj": {"pattern": "4:8", "method": "sparsegpt"}, "*.self_attn.k_proj": {"method": "obd"}}


def _prune(n_samples: int, group, hessian_dtype=torch.float32, progress=False, overrides=_OVERRIDES, offload=False):
    from s3sparse.llm import prune_model

    model = _tiny()
    report = prune_model(model, _calibration(n_samples), "2:4", "true-obs", method_options={"ng": 8},
                         overrides=overrides, progress=progress, hessian_dtype=hessian_dtype, process_group=group,
                         offload=offload, device="cpu")
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return weights, report.to_dict()


def model_worker(rank: int) -> dict:
    """prune_model on 2 ranks against 1 rank; determinism; no windows on a rank; fallback; a failing rank."""
    from s3sparse.llm import pipeline
    from s3sparse.pruners import sparsegpt as sparsegpt_mod

    group = dist.group.WORLD
    out: dict = {}
    # 15 windows: 7 on rank 0, 8 on rank 1.
    out["fp32"] = {"alone": _prune(15, None), "ranks": _prune(15, group)}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out["fp32"]["again"] = _prune(15, group, progress=True)
    out["stderr_with_progress"] = err.getvalue()
    out["fp32"]["offload"] = _prune(15, group, offload=True)
    out["fp64"] = {"alone": _prune(15, None, torch.float64), "ranks": _prune(15, group, torch.float64)}
    # One window: rank 0 has none, and still prunes its rows of every layer.
    out["one_window"] = {"alone": _prune(1, None, torch.float64), "ranks": _prune(1, group, torch.float64)}

    # SparseGPT fails numerically on rank 1 for one layer: every rank falls back to magnitude for it.
    real_sweep, calls = sparsegpt_mod._sweep, []

    def sweep_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise FloatingPointError("injected non-finite weights on rank 1")
        return real_sweep(*args, **kwargs)

    if rank == 1:
        sparsegpt_mod._sweep = sweep_failing_once
    out["fallback"] = _prune(4, group)
    sparsegpt_mod._sweep = real_sweep

    # A block raising on rank 1 while it re-runs its pruned block: every rank raises.
    real_run, runs = pipeline.run_block, []

    def run_block_failing(*args, **kwargs):
        runs.append(1)
        if len(runs) == 3:  # block 0's dense pass, block 0's pruned pass, then block 1's dense pass
            raise RuntimeError("injected failure in a block forward on rank 1")
        return real_run(*args, **kwargs)

    if rank == 1:
        pipeline.run_block = run_block_failing
    out["block_failure"] = _caught(lambda: _prune(2, group))
    pipeline.run_block = real_run
    return out


# ------------------------------------------------------------------ the CLI under torchrun, with a failure
def cli_with_failure(argv, where: str) -> int:
    """``s3sparse`` failing on one rank (a torchrun script, see the tests): ``where`` is
    ``measure`` (rank 1 runs out of memory measuring its third layer's error) or
    ``save`` (rank 0 cannot write OUT_DIR)."""
    from s3sparse.llm import pipeline, save
    from s3sparse.llm.cli import main

    rank = os.environ.get("RANK")
    if where == "measure" and rank == "1":
        real, calls = pipeline.output_error, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("out of memory (injected on rank 1)")
            return real(*args, **kwargs)

        pipeline.output_error = failing
    elif where == "save" and rank == "0":
        def disk_full(*args, **kwargs):
            raise OSError("disk full (injected on rank 0)")

        save._copy_extra_files = disk_full  # after the weights are in the staging directory
    return main(argv)


if __name__ == "__main__":  # torchrun ... tests/dist_workers.py WHERE prune ...
    sys.exit(cli_with_failure(sys.argv[2:], sys.argv[1]))
