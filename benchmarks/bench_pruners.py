"""Output error and time of every pruner on the four SPEC §2 patterns, one layer.

    python benchmarks/bench_pruners.py --rows 512 --cols 2048 --device cpu
    python benchmarks/bench_pruners.py --rows 2560 --cols 9728 --samples 8192 --device cuda \
        --methods sparsegpt true_obs

Prints a table and writes JSON (device name, torch version, git commit, every
figure) to ``--out`` (default benchmarks/results/pruners-<device>-<M>x<K>.json).
Synthetic calibration data: correlated, unevenly scaled Gaussian features.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import s3sparse
from common import device_name, git_commit
from s3sparse import patterns
from s3sparse.pruners import (
    HessianAccumulator,
    StructuredOBS,
    output_error,
    prune_magnitude,
    prune_obd,
    prune_sparsegpt,
)

METHODS = {
    "magnitude": lambda scope, H, nnz: prune_magnitude(scope, nnz),
    "obd": lambda scope, H, nnz: prune_obd(scope, H, nnz),
    "sparsegpt": lambda scope, H, nnz: prune_sparsegpt(scope, H, nnz),
    "obs_local": lambda scope, H, nnz: StructuredOBS(scope, H).prune(nnz, compensate="local"),
    "obs_full": lambda scope, H, nnz: StructuredOBS(scope, H).prune(nnz, compensate="full"),
    "obs_interleaved": lambda scope, H, nnz: StructuredOBS(scope, H).prune(nnz, compensate="interleaved", n_splits=4),
    "true_obs": lambda scope, H, nnz: StructuredOBS(scope, H).prune_true_obs(nnz, ng=64),
}


def synthetic_hessian(K: int, N: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    mix = (torch.eye(K) + 0.4 * torch.randn(K, K, generator=g) / K**0.5).to(device)
    scales = (torch.rand(K, generator=g) * 2 + 0.1).to(device)
    acc = HessianAccumulator(K, device=device)
    for start in range(0, N, 2048):
        n = min(2048, N - start)
        x = torch.randn(n, K, generator=g).to(device)
        acc.add((x @ mix) * scales)
    return acc.hessian


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patterns", nargs="+", default=list(patterns.PATTERNS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    M, K = args.rows, args.cols
    H = synthetic_hessian(K, args.samples, device, args.seed)
    W0 = torch.randn(M, K, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    results = []
    out = Path(args.out or f"benchmarks/results/pruners-{device.type}-{M}x{K}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=device_name(device),
        torch=torch.__version__,
        s3sparse=s3sparse.__version__,
        build=s3sparse.build_info(),
        commit=git_commit(),
        rows=M,
        cols=K,
        samples=args.samples,
        seed=args.seed,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    print(f"{M}x{K}, N={args.samples}, {device_name(device)}, torch {torch.__version__}")
    print(f"{'pattern':<11}{'method':<17}{'rel. output error':>18}{'time (s)':>10}{'peak GiB':>10}")
    for name in args.patterns:
        for method in args.methods:
            W = torch.nn.Parameter(W0.clone())
            scope, nnz = patterns.by_name(name, W)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            METHODS[method](scope, H, nnz)
            sync(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            err = output_error(W.detach(), W0, H)
            results.append(dict(pattern=name, method=method, output_error=err, seconds=seconds, peak_gib=peak))
            print(f"{name:<11}{method:<17}{err:>18.5f}{seconds:>10.2f}{peak:>10.2f}", flush=True)
            # Rewritten after every run, so an interrupted benchmark keeps what it measured.
            out.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
