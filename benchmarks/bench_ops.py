"""Time each s3sparse operator at the sizes the pruners use on a 2560x9728 layer.

    python benchmarks/bench_ops.py --device cuda [--quick]

Prints a table (median of repeated runs) and writes JSON with the device name,
torch version and git commit to benchmarks/results/ops-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import s3sparse
from s3sparse import ops

from bench_pruners import device_name, git_commit, sync


def timeit(fn, device, repeat: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spd(K: int, device, dtype=torch.float32) -> torch.Tensor:
    X = torch.randn(K, 2 * K, device=device)
    H = X @ X.T / (2 * K) + 0.1 * torch.eye(K, device=device)
    C = torch.cholesky_inverse(torch.linalg.cholesky(H))
    d = C.diagonal().sqrt()
    return (C / d[:, None] / d[None, :]).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    M, K = (256, 1024) if args.quick else (2560, 9728)
    rows = []

    def record(name: str, seconds: float, **extra) -> None:
        rows.append(dict(op=name, seconds=seconds, **extra))
        desc = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"{name:<16}{seconds * 1e3:>12.3f} ms   {desc}", flush=True)

    print(f"{device_name(device)}, torch {torch.__version__}, build {s3sparse.build_info()}")
    W = torch.randn(M, K, device=device)
    # Block reductions / scaling over the coupled 2:4 view.
    size, stride, block = [M, K // 16, 8, 2], [K, 16, 1, 8], [1, 1, 1, 2]
    record("block_reduce", timeit(lambda: ops.block_reduce(W, size, stride, 0, block, "norm"), device, args.repeat),
           view="coupled24", elems=M * K)
    scale = torch.rand(M, K // 16, 8, 1, device=device)
    record("block_scale_", timeit(lambda: ops.block_scale_(W, size, stride, 0, block, scale), device, args.repeat),
           view="coupled24", elems=M * K)
    # Top-k per scope, and over a whole matrix.
    scores = torch.randn(M * K // 4, 4, device=device)
    record("kth_largest", timeit(lambda: ops.kth_largest(scores, 2), device, args.repeat), rows=scores.shape[0], n=4)
    big = torch.randn(4, M * K // 4, device=device)
    record("kth_largest", timeit(lambda: ops.kth_largest(big, big.shape[1] // 2), device, args.repeat),
           rows=4, n=big.shape[1])
    # Subset scoring: 2:4 (E=4, 6 subsets of 2) for every scope of the layer, shared C blocks.
    E, G = 4, K // 4
    w = torch.randn(M * G, E, device=device)
    c = spd(E, device).expand(G, E, E).contiguous() + 0.01 * torch.randn(G, E, E, device=device).abs()
    c = (c + c.transpose(1, 2)) / 2
    c_index = torch.arange(G, device=device).repeat(M)
    subsets = torch.combinations(torch.arange(E, device=device), 2)
    record("score_subsets", timeit(lambda: ops.score_subsets(w, c, subsets, c_index), device, args.repeat),
           items=w.shape[0], E=E, subsets=subsets.shape[0])
    # True OBS's Schur update (left-looking): the panel C0[S, R] - U[S] U[R]^T, fp16 factors,
    # a 2:4 sweep half done (P = 128 pruned columns per batch, R = K/2, K/4 factor columns).
    for N, P in ((16, 128), (64, 128)):
        if args.quick:
            N = min(N, 8)
        R, O = K // 2, K // 4
        U = (torch.randn(N, K, O, device=device) * 0.01).half()
        base = torch.randn(N, P, R, device=device)
        t = timeit(lambda: ops.lowrank_sub(base, U[:, :P], U[:, K - R :]), device, args.repeat)
        flops = 2.0 * N * P * R * O
        record("lowrank_sub", t, N=N, P=P, R=R, O=O, u_dtype="float16", tflops=round(flops / t / 1e12, 2))
        del U, base

    out = Path(args.out or f"benchmarks/results/ops-{device.type}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name(device), torch=torch.__version__, build=s3sparse.build_info(), commit=git_commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), M=M, K=K)
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
