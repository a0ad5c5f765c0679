"""Where True OBS spends its GPU time: one timed call, then one call under ``torch.profiler``.

    python benchmarks/profile_true_obs.py --device cuda                          # 2:4, 2560×9728
    python benchmarks/profile_true_obs.py --device cuda --patterns block16 --rows 512
    python benchmarks/profile_true_obs.py --device cuda --eager                  # no CUDA-graph replay

For each pattern (``24``, ``48``, ``coupled24``, ``block16``: as in ``table1.py``) on
``data.synthetic_layer(M, K, N)``: a warm-up on a 256×1024 corner, a full warm-up call
(``--full-warmup``), a timed call (CUDA events), then the same call profiled. Printed:
the timed seconds and peak memory, the profiler's kernels by GPU time (``--top``), and
the GPU time grouped into kinds (GEMM, gather/index, elementwise/copy, factorisation,
our ops, other). ``--out`` writes it all as JSON (device, torch, commit).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402
from data import synthetic_layer  # noqa: E402

from s3sparse import StructuredOBS, patterns  # noqa: E402

SCOPES = {
    "24": lambda W: patterns.nm(W, 2, 4),
    "48": lambda W: patterns.nm_blocks(W, 2, 4, 2),
    "coupled24": lambda W: patterns.coupled_nm(W, 2, 4, 8),
    "block16": lambda W: patterns.row_coupled_blocks(W, 16, 8, 1),
}

KINDS = [  # (kind, regex on the kernel name), first match wins
    ("ours", r"s3sparse|lowrank|kth_largest|score_subsets"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|gemv|sm90_|sm80_|cublas|dot_kernel"),
    ("factorisation", r"potrf|trsm|trsv|cholesky|getrf|syrk|lauum|trtri|magma|cusolver|geqrf"),
    ("gather/index", r"gather|index|scatter|take"),
    ("sort/select", r"sort|topk|radix|select"),
    ("copy/cast/fill", r"copy|Memcpy|Memset|fill|cat|CatArray|direct_copy|unrolled_elementwise"),
    ("elementwise", r"elementwise|vectorized|reduce"),
]


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name, re.IGNORECASE):
            return kind
    return "other"


def run_once(pattern: str, W0: torch.Tensor, H: torch.Tensor, ng, panel_batches: int = 1) -> tuple:
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = SCOPES[pattern](W)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    StructuredOBS(scope, H).prune_true_obs(nnz, ng=ng, panel_batches=panel_batches)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3, W.detach()


def layer_error(W: torch.Tensor, W0: torch.Tensor, H: torch.Tensor) -> float:
    """``sqrt(tr(ΔW H ΔWᵀ) / tr(W0 H W0ᵀ))`` in fp64 (table1.py's error)."""
    H64 = H.double()
    dW = (W - W0).double()
    W64 = W0.double()
    return float(((dW @ H64) * dW).sum().div(((W64 @ H64) * W64).sum()).sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", "-M", type=int, default=2560)
    ap.add_argument("--cols", "-K", type=int, default=9728)
    ap.add_argument("--samples", "-N", type=int, default=8192)
    ap.add_argument("--patterns", nargs="+", default=["24"], choices=list(SCOPES))
    ap.add_argument("--ng", type=int, default=None)
    ap.add_argument("--panel-batches", type=int, default=1, help="True OBS's blocked form: batches a read of the factors serves")
    ap.add_argument("--eager", action="store_true", help="no CUDA-graph replay of the chunk sweep")
    ap.add_argument("--full-warmup", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="only the timed call")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device != "cuda" or not torch.cuda.is_available():
        sys.exit("profile_true_obs.py profiles GPU kernels: run it with --device cuda on a machine with a GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.eager:
        from s3sparse.pruners import true_obs

        real = true_obs.GraphReplay
        true_obs.GraphReplay = lambda fn, warmup=None, enabled=True: real(fn, warmup, enabled=False)
    layer = synthetic_layer(args.rows, args.cols, N=args.samples, device="cuda")
    result = {**environment(torch.device("cuda")), "M": args.rows, "K": args.cols, "N": args.samples,
              "eager": args.eager, "panel_batches": args.panel_batches, "patterns": {}}
    for pattern in args.patterns:
        run_once(pattern, layer.W[:256, :1024], layer.H[:1024, :1024].contiguous(), args.ng, args.panel_batches)
        if args.full_warmup:
            run_once(pattern, layer.W, layer.H, args.ng, args.panel_batches)
        torch.cuda.reset_peak_memory_stats()
        seconds, W_pruned = run_once(pattern, layer.W, layer.H, args.ng, args.panel_batches)
        peak = torch.cuda.max_memory_allocated() / 2**30
        error = layer_error(W_pruned, layer.W, layer.H)
        print(f"# pattern {pattern}: {seconds:.3f} s, peak {peak:.2f} GiB, error {error:.6f}", flush=True)
        entry = {"seconds": seconds, "peak_gib": peak, "error": error}
        if not args.no_profile:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            t0 = time.perf_counter()
            with torch.profiler.profile(activities=acts) as prof:
                run_once(pattern, layer.W, layer.H, args.ng, args.panel_batches)
            wall = time.perf_counter() - t0
            averages = prof.key_averages()
            kernels = []
            for e in averages:
                t = getattr(e, "self_device_time_total", None)
                if t is None:
                    t = e.self_cuda_time_total
                if t and t > 0 and not e.key.startswith(("aten::", "s3sparse::")):
                    kernels.append((e.key, t / 1e6, e.count))
            kernels.sort(key=lambda k: -k[1])
            total = sum(k[1] for k in kernels)
            by_kind: dict = {}
            for name, t, _ in kernels:
                kind = kind_of(name)
                by_kind[kind] = by_kind.get(kind, 0.0) + t
            print(f"  profiled call: {wall:.3f} s wall, {total:.3f} s of kernels ({len(kernels)} kernels)")
            for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
                print(f"  {kind:16s} {t:8.3f} s  {100 * t / max(total, 1e-12):5.1f}%")
            print(f"  {'kernel':90s} {'s':>8s} {'calls':>7s}")
            for name, t, count in kernels[: args.top]:
                print(f"  {name[:90]:90s} {t:8.3f} {count:7d}")
            ops_ = []
            for e in averages:
                t = getattr(e, "device_time_total", None)
                if t is None:
                    t = e.cuda_time_total
                if e.key.startswith(("aten::", "s3sparse::")) and t > 0:
                    ops_.append((e.key, t / 1e6, e.count))
            ops_.sort(key=lambda k: -k[1])
            print(f"  {'operator (GPU time of its kernels, inclusive)':60s} {'s':>8s} {'calls':>7s}")
            for name, t, count in ops_[: args.top]:
                print(f"  {name[:60]:60s} {t:8.3f} {count:7d}")
            entry.update(profiled_wall_s=wall, operators=[{"name": n, "seconds": t, "calls": c} for n, t, c in ops_[: args.top]], kernel_seconds=total, by_kind=by_kind,
                         kernels=[{"name": n, "seconds": t, "calls": c} for n, t, c in kernels[: args.top]])
        result["patterns"][pattern] = entry
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
