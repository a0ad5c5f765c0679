"""Time and operator count of ``StructuredOBS.prune`` with ``split`` / ``interleaved`` / ``full``.

    OMP_NUM_THREADS=1 python benchmarks/bench_prune_split.py --rows 256 --cols 2048 --samples 4096
    python benchmarks/bench_prune_split.py --device cuda --rows 2560 --cols 9728 --samples 8192

For each pattern and mode: wall time of ``prune`` (best of ``--repeats`` runs after one
warm-up), the output error, and the ATen operator calls of one run (``torch.profiler``
on the CPU side, nested calls included): all of them, and the working ones (views,
allocations and metadata left out), a proxy for the kernel launches the same run makes
on a GPU. The layer is ``data.py``'s synthetic layer. JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from common import device_name, git_commit, sync
from data import synthetic_layer
from s3sparse import StructuredOBS, output_error, patterns

PATTERNS = {
    "24": patterns.nm, "48": patterns.nm_blocks, "coupled24": patterns.coupled_nm, "block16": patterns.row_coupled_blocks,
}


def run_once(
    W0: torch.Tensor, H: torch.Tensor, pattern: str, mode: str, n_splits: int, inv_h: torch.Tensor
) -> torch.Tensor:
    """One ``prune`` on a fresh copy of ``W0`` (the shared inverse precomputed, as in a model pipeline)."""
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = PATTERNS[pattern](W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        StructuredOBS(scope, H, inv_h=inv_h).prune(nnz, compensate=mode, n_splits=n_splits)
    return W.detach()


# Operators that only make views, allocate or read metadata: no kernel on a GPU.
NO_KERNEL = {
    "aten::" + name for name in (
        "as_strided", "as_strided_", "view", "reshape", "_reshape_alias", "expand", "transpose", "unsqueeze",
        "squeeze", "slice", "select", "permute", "t", "mT", "alias", "diagonal", "split", "split_with_sizes",
        "tensor_split", "unbind", "detach", "lift_fresh", "resolve_conj", "resolve_neg", "empty", "empty_strided",
        "empty_like", "resize_", "to", "contiguous", "expand_as", "view_as", "flatten", "unflatten", "chunk",
        "narrow", "is_nonzero", "result_type", "_unsafe_view", "numpy_T", "matrix_H", "conj", "_conj",
    )
}


def count_ops(fn) -> tuple[int, int]:
    """``(all, working)``: ATen operator calls while ``fn`` runs (nested included), and those
    of them that do work (not views, allocations or metadata) — a proxy for GPU launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    return sum(e.count for e in events), sum(e.count for e in events if e.key not in NO_KERNEL)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--modes", nargs="+", default=["split", "interleaved"],
                        choices=["full", "split", "interleaved"])
    parser.add_argument("--n-splits", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-count", action="store_true", help="skip the profiler run")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layer = synthetic_layer(args.rows, args.cols, args.samples, device=device)
    W0, H = layer.W, layer.H
    inv_h = StructuredOBS.compute_inverse(H, 1e-2)  # prune's default damping
    rows = []
    for pattern in args.patterns:
        for mode in args.modes:
            n_splits = 1 if mode == "full" else args.n_splits
            run_once(W0, H, pattern, mode, n_splits, inv_h)  # warm-up
            times = []
            for _ in range(args.repeats):
                sync(device)
                t0 = time.perf_counter()
                W = run_once(W0, H, pattern, mode, n_splits, inv_h)
                sync(device)
                times.append(time.perf_counter() - t0)
            ops, work = (None, None)
            if not args.no_count:
                ops, work = count_ops(lambda: run_once(W0, H, pattern, mode, n_splits, inv_h))
            row = dict(pattern=pattern, mode=mode, n_splits=n_splits, seconds=min(times), aten_ops=ops,
                       working_ops=work, error=output_error(W, W0, H))
            rows.append(row)
            print(f"{pattern:>10} {mode:>11} n_splits={n_splits:<3} {row['seconds']:8.3f} s  "
                  f"ops {ops if ops is not None else '-':>8} (working {work if work is not None else '-':>7})  "
                  f"error {row['error']:.5f}", flush=True)
    meta = dict(device=device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
                commit=git_commit(), M=args.rows, K=args.cols, N=args.samples, label=args.label)
    out = Path(args.out or f"benchmarks/results/prune-split-{device.type}-{args.rows}x{args.cols}{args.label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
