"""Time `prune_sparsegpt` on one M×K layer for the four reference patterns.

    python benchmarks/bench_sparsegpt.py --device cuda            # 2560×9728, N=8192 (issue 8)
    python benchmarks/bench_sparsegpt.py --quick                  # 256×1024 on the CPU, seconds
    python benchmarks/bench_sparsegpt.py --rows 512 --cols 2048 --samples 4096 --device cpu

Every pattern is pruned once as a warm-up, then ``--repeats`` (3) times; the
median is reported (CUDA events on a GPU, ``time.perf_counter`` on the CPU; the
Hessian, the weight copy and the pattern spec are built outside the timed region).
Also reported: the relative output error sqrt(tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)) and whether
the pattern holds. ``--python-path`` times the per-column Python sweep instead of
the `sparsegpt_block_` kernel (the pre-kernel implementation, for comparison);
``--breakdown`` adds the time of each stage (scope layout, kernel plan, damped
inverse, sweep kernel, trailing GEMM) for one more run per pattern.

Synthetic calibration data (deterministic, seeded): X (N×K) Gaussian with
per-channel log-normal scales (σ = 0.5), 0.5% of the channels ×10 (outlier
features) and a shared rank-64 component of 0.5× the scale; W ~ N(0, 0.02²);
H = XᵀX/N accumulated in fp32 on the device. Prints a table and writes JSON
(device name, torch version, git commit, every figure) to ``--out`` (default
``benchmarks/results/sparsegpt-<device>-<M>x<K>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import s3sparse
from common import device_name, git_commit
from s3sparse import patterns
from s3sparse.pruners import HessianAccumulator, output_error, prune_sparsegpt
from s3sparse.pruners import sparsegpt as sparsegpt_module

# name -> (constructor, label); each constructor returns (scope, nnz).
PATTERNS = {
    "nm": (lambda W: patterns.nm(W, 2, 4), "2:4"),
    "nm_blocks": (lambda W: patterns.nm_blocks(W), "4:8"),
    "coupled_nm": (lambda W: patterns.coupled_nm(W), "coupled 2:4"),
    "row_coupled_blocks": (lambda W: patterns.row_coupled_blocks(W), "16-col row-coupled"),
}


def synthetic_layer(M: int, K: int, N: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, H): W ~ N(0, 0.02²) (M, K) and H = XᵀX/N from the synthetic X described above."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scales = torch.exp(0.5 * torch.randn(K, generator=g))
    n_out = max(1, round(0.005 * K))
    scales[torch.randperm(K, generator=g)[:n_out]] *= 10.0
    rank = min(64, K)
    basis = torch.randn(rank, K, generator=g) / rank**0.5
    scales, basis = scales.to(device), basis.to(device)
    acc = HessianAccumulator(K, device=device)
    for start in range(0, N, 2048):
        n = min(2048, N - start)
        z = torch.randn(n, K, generator=g).to(device)
        shared = torch.randn(n, rank, generator=g).to(device) @ basis
        acc.add((z + 0.5 * shared) * scales)
    W = (0.02 * torch.randn(M, K, generator=g)).to(device)
    return W, acc.hessian


def pattern_holds(scope, W: torch.Tensor, nnz: int) -> bool:
    """Every scope keeps exactly ``nnz`` blocks, each block all zero or all nonzero."""
    from s3sparse.pruners.layout import scope_layout

    layout = scope_layout(scope)
    vals = W.detach()[layout.rows, layout.cols] != 0  # (S, blocks, elems)
    kept, dead = vals.all(-1), (~vals).all(-1)
    return bool((kept | dead).all()) and bool((kept.sum(-1) == nnz).all())


def time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _Clock:
    """Wall time between marks: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def seconds(self, a: int, b: int) -> float:
        if self.cuda:
            self.marks[b].synchronize()
            return self.marks[a].elapsed_time(self.marks[b]) / 1e3
        return self.marks[b] - self.marks[a]


@torch.no_grad()
def breakdown(make, W0: torch.Tensor, H: torch.Tensor, blocksize: int) -> dict:
    """prune_sparsegpt's stages, timed one by one (its own code, re-sequenced here)."""
    from s3sparse import ops
    from s3sparse.pruners.hessian import check_hessian, damped_inverse
    from s3sparse.pruners.layout import scope_layout
    from s3sparse.pruners.sparsegpt import _kernel_plan, _PythonSweep

    device = W0.device
    clock = _Clock(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    W = W0.clone()
    scope, nnz = make(W)
    M, K = W.shape
    t0 = clock.mark()
    layout = scope_layout(scope)
    t1 = clock.mark()
    group_rows, tables = _kernel_plan(layout, K, blocksize, device)
    t2 = clock.mark()
    check_hessian(H, K, like=W)
    Wf = W.to(torch.float32, copy=True)
    U, _ = damped_inverse(H, 0.01, upper_factor=True)
    d2 = torch.diagonal(U) ** 2
    pruned = torch.zeros(M, K, dtype=torch.bool, device=device)
    t3 = clock.mark()
    sweep = gemm = 0.0
    pairs = []
    python_sweep = None
    for bi, i1 in enumerate(range(0, K, blocksize)):
        i2 = min(i1 + blocksize, K)
        a = clock.mark()
        if tables[bi] is not None:
            err, _ = ops.sparsegpt_block_(Wf[:, i1:i2], pruned[:, i1:i2], U[i1:i2, i1:i2], *tables[bi], group_rows,
                                          nnz, layout.block_numel, check=False)
        else:
            python_sweep = python_sweep or _PythonSweep(layout, K)
            err = python_sweep.block(Wf, U, d2, pruned, i1, i2, nnz)
        b = clock.mark()
        Wf[:, i2:] -= err @ U[i1:i2, i2:]
        c = clock.mark()
        pairs.append((a, b, c))
    t4 = clock.mark()
    ok = bool(torch.isfinite(Wf).all())
    t5 = clock.mark()
    for a, b, c in pairs:
        sweep += clock.seconds(a, b)
        gemm += clock.seconds(b, c)
    return dict(layout=clock.seconds(t0, t1), plan=clock.seconds(t1, t2), inverse=clock.seconds(t2, t3),
                sweep=sweep, trailing_gemm=gemm, final_check=clock.seconds(t4, t5), total=clock.seconds(t0, t5),
                kernel_blocks=sum(t is not None for t in tables), blocks=len(tables), finite=ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2560)
    parser.add_argument("--cols", type=int, default=9728)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--python-path", action="store_true", help="time the per-column Python sweep (no kernel)")
    parser.add_argument("--quick", action="store_true", help="256x1024, N=1024, on the CPU")
    parser.add_argument("--breakdown", action="store_true", help="also time the stages (layout, plan, inverse, sweep, GEMM)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.cols, args.samples, args.device = 256, 1024, 1024, "cpu"

    device = torch.device(args.device)
    M, K = args.rows, args.cols
    sparsegpt_module._USE_BLOCK_KERNEL = not args.python_path
    W0, H = synthetic_layer(M, K, args.samples, device, args.seed)
    tag = "-python" if args.python_path else ""
    out = Path(args.out or f"benchmarks/results/sparsegpt-{device.type}-{M}x{K}{tag}.json")
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
        blocksize=args.blocksize,
        repeats=args.repeats,
        path="python" if args.python_path else "kernel",
        threads=torch.get_num_threads(),
        seed=args.seed,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    print(f"SparseGPT {M}x{K}, N={args.samples}, {meta['device']}, torch {torch.__version__}, "
          f"{meta['path']} path, median of {args.repeats} after a warm-up")
    print(f"{'pattern':<20}{'time (s)':>10}{'min (s)':>10}{'rel. output error':>19}{'pattern':>9}")
    results = []
    for name in args.patterns:
        make, label = PATTERNS[name]
        times, W = [], None
        for rep in range(args.repeats + 1):  # rep 0 is the warm-up
            W = torch.nn.Parameter(W0.clone())
            scope, nnz = make(W)
            t = time_once(lambda: prune_sparsegpt(scope, H, nnz, blocksize=args.blocksize), device)
            if rep:
                times.append(t)
        err = output_error(W.detach(), W0, H)
        ok = pattern_holds(scope, W, nnz)
        med = statistics.median(times)
        results.append(dict(pattern=name, label=label, seconds=med, times=times, output_error=err, pattern_holds=ok))
        print(f"{label:<20}{med:>10.3f}{min(times):>10.3f}{err:>19.5f}{'ok' if ok else 'BROKEN':>9}", flush=True)
        if args.breakdown:
            parts = breakdown(make, W0, H, args.blocksize)
            results[-1]["breakdown"] = parts
            print("    " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in parts.items()),
                  flush=True)
        out.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
