"""Each custom op of ``s3sparse.ops`` at the sizes the pruners use on a 2560×9728 layer,
with achieved GB/s or TFLOP/s next to ceilings measured in the same run.

    python benchmarks/ops.py                      # cuda when available, M=2560, K=9728
    python benchmarks/ops.py --quick              # CPU smoke run: M=256, K=1024
    python benchmarks/ops.py --ops lowrank_sub kth_largest --repeat 10

Ceilings, measured first: ``copy`` — device-to-device ``dst.copy_(src)`` bandwidth (bytes read
+ written per second), ``gemm_fp16`` / ``gemm_fp32`` — ``torch.mm`` of two n×n matrices (fp32
without TF32). ``lowrank_sub`` (True OBS's Schur updates) is timed on the panel and the
factor product of a 2:4 sweep half done.

Each op case reports its median time (CUDA events on a GPU, ``perf_counter`` on the CPU;
warm-up call excluded; sub-millisecond ops timed over back-to-back calls), the minimum bytes it
must move (``GB/s``, against the copy ceiling: ``of_copy``) and, where it does arithmetic, its
flops (``TFLOP/s``, against the GEMM ceiling of its precision: ``of_gemm``; ``roofline`` =
min(GEMM ceiling, copy bandwidth × flops/byte)). Every op listed in ``s3sparse.ops.__all__``
is run when this script has a case for it; one that is missing at run time is reported as
skipped, and an op present without a case here is listed as such.

JSON (device name, torch version, git commit — ``$S3SPARSE_GIT_COMMIT`` / ``$S3SPARSE_COMMIT``
override it — and every figure) goes to ``--out`` (default
``benchmarks/results/ops-<device>[-quick].json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from s3sparse import ops  # noqa: E402

from common import GIB, environment, exact_fp32, sync, timeit  # noqa: E402

KNOWN = ["block_reduce", "block_scale_", "kth_largest", "score_subsets", "lowrank_sub"]
# Ops with a benchmark script of their own.
ELSEWHERE = {
    "packed_to_dense": "see benchmarks/packed.py",
    "packed_linear": "benchmarks/packed.py (against dense F.linear and 2:4 semi-structured)",
    "lowrank_factor": "timed with lowrank_sub's case (the factor of the same panel)",
}


def spd_inverse(K: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A well-conditioned C = (XXᵀ/2K + 0.1 I)⁻¹ with unit diagonal (like the pruners' scaled C)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(K, 2 * K, generator=g).to(device)
    with exact_fp32():
        H = X @ X.T / (2 * K)
    H.diagonal().add_(0.1)
    C = torch.cholesky_inverse(torch.linalg.cholesky(H))
    d = C.diagonal().rsqrt()
    C = C * d[:, None] * d[None, :]
    return ((C + C.T) / 2).to(dtype)


class Bench:
    def __init__(self, device: torch.device, repeat: int):
        self.device = device
        self.repeat = repeat
        self.rows: List[dict] = []
        self.ceil: Dict[str, float] = {}

    def record(self, op: str, case: str, t: dict, bytes_: Optional[float] = None, flops: Optional[float] = None,
               precision: Optional[str] = None, **extra) -> dict:
        row = dict(op=op, case=case, **t, **extra)
        s = t["seconds"]
        if bytes_ is not None:
            row["bytes"] = bytes_
            row["GB/s"] = bytes_ / s / 1e9
            if "copy_GB/s" in self.ceil:
                row["of_copy"] = row["GB/s"] / self.ceil["copy_GB/s"]
        if flops is not None:
            row["flops"] = flops
            row["TFLOP/s"] = flops / s / 1e12
            gemm = self.ceil.get(f"gemm_{precision}_TFLOP/s") if precision else None
            if gemm:
                row["of_gemm"] = row["TFLOP/s"] / gemm
                if bytes_:
                    row["roofline_TFLOP/s"] = min(gemm, self.ceil["copy_GB/s"] * 1e9 * flops / bytes_ / 1e12)
        self.rows.append(row)
        parts = [f"{op:<15} {case:<44} {s * 1e3:10.3f} ms"]
        if "GB/s" in row:
            parts.append(f"{row['GB/s']:9.1f} GB/s" + (f" ({row['of_copy']:.0%} of copy)" if "of_copy" in row else ""))
        if "TFLOP/s" in row:
            parts.append(f"{row['TFLOP/s']:8.2f} TFLOP/s" + (f" ({row['of_gemm']:.0%} of {precision} GEMM)" if "of_gemm" in row else ""))
        for k, v in extra.items():
            parts.append(f"{k}={v}")
        print("  ".join(parts), flush=True)
        return row

    def note(self, op: str, case: str, status: str, detail: str = "") -> None:
        self.rows.append(dict(op=op, case=case, status=status, detail=detail))
        print(f"{op:<15} {case:<44} {status}{': ' + detail if detail else ''}", flush=True)


# ------------------------------------------------------------------ ceilings
def _copy_ceiling(b: Bench, nbytes: int) -> None:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=b.device).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), b.device, b.repeat)
    r = b.record("ceiling", f"copy {nbytes / 2**20:.0f} MiB", t, bytes_=2.0 * nbytes)
    b.ceil["copy_GB/s"] = r["GB/s"]


def _gemm_ceiling(b: Bench, prec: str, dtype: torch.dtype, n: int) -> None:
    A = torch.randn(n, n, device=b.device).to(dtype)
    B = torch.randn(n, n, device=b.device).to(dtype)
    with exact_fp32():
        t = timeit(lambda: torch.mm(A, B), b.device, b.repeat)
    r = b.record("ceiling", f"gemm_{prec} {n}x{n}x{n}", t, flops=2.0 * n**3)
    b.ceil[f"gemm_{prec}_TFLOP/s"] = r["TFLOP/s"]


def ceilings(b: Bench, quick: bool) -> None:
    cuda = b.device.type == "cuda"
    _copy_ceiling(b, (64 if quick else 1024) * 2**20 if cuda else (64 if quick else 256) * 2**20)
    # fp16 GEMM: the tensor-core ceiling on a GPU (on a CPU it is emulated, for the record only).
    _gemm_ceiling(b, "fp16", torch.float16, 8192 if cuda else 512)
    _gemm_ceiling(b, "fp32", torch.float32, 8192 if cuda else (512 if quick else 1024))


# ------------------------------------------------------------------ op cases
VIEWS = {  # (size, stride, block) of the reference patterns' views over an M×K weight
    "4:8": lambda M, K: ([M, K], [K, 1], [1, 2]),
    "coupled 2:4": lambda M, K: ([M, K // 16, 8, 2], [K, 16, 1, 8], [1, 1, 1, 2]),
    "16-col row-coupled": lambda M, K: ([M // 16, 2, 8 * K], [16 * K, 8 * K, 1], [1, 1, 16]),
}


def case_block_reduce(b: Bench, M: int, K: int) -> None:
    W = torch.randn(M, K, device=b.device)
    for name, view in VIEWS.items():
        size, stride, block = view(M, K)
        grid = math.prod(s // k for s, k in zip(size, block))
        for reduce in ("norm", "max"):
            t = timeit(lambda: ops.block_reduce(W, size, stride, 0, block, reduce), b.device, b.repeat)
            b.record("block_reduce", f"{name} {reduce} fp32 {M}x{K}", t, bytes_=4.0 * (M * K + grid))


def case_block_scale_(b: Bench, M: int, K: int) -> None:
    W = torch.randn(M, K, device=b.device)
    for name, view in VIEWS.items():
        size, stride, block = view(M, K)
        gshape = [s // k for s, k in zip(size, block)]
        scale = torch.rand(gshape, device=b.device) * 0.2 + 0.9
        keep = torch.rand(gshape, device=b.device) > 0.5
        t = timeit(lambda: ops.block_scale_(W, size, stride, 0, block, scale), b.device, b.repeat)
        b.record("block_scale_", f"{name} float scale {M}x{K}", t, bytes_=4.0 * 2 * M * K + 4.0 * scale.numel())
        W.normal_()
        t = timeit(lambda: ops.block_scale_(W, size, stride, 0, block, keep), b.device, b.repeat)
        b.record("block_scale_", f"{name} bool mask {M}x{K}", t, bytes_=4.0 * 2 * M * K + keep.numel())


def case_kth_largest(b: Bench, M: int, K: int) -> None:
    for rows, n, k, what in (
        (M * K // 4, 4, 2, "2:4 scopes"),
        (M * K // 8, 4, 2, "4:8 scopes (block norms)"),
        (M, K, K // 2, "whole rows"),
    ):
        x = torch.randn(rows, n, device=b.device)
        t = timeit(lambda: ops.kth_largest(x, k), b.device, b.repeat)
        b.record("kth_largest", f"{what} ({rows}, {n}) k={k}", t, bytes_=4.0 * rows * n + 4.0 * rows + 1.0 * rows * n)


def _subset_flops(P: int) -> float:
    # Cholesky of a P×P block (P³/3), two triangular solves for w_Sᵀ C_SS⁻¹ w_S (≈ P² + 2P).
    return P**3 / 3.0 + P * P + 2.0 * P


def case_score_subsets(b: Bench, M: int, K: int) -> None:
    dev = b.device
    from itertools import combinations

    for what, E, bk, per_item, c_dtype in (
        ("2:4 shared C (StructuredOBS.prune)", 4, 1, False, torch.float32),
        ("4:8 shared C (StructuredOBS.prune)", 8, 2, False, torch.float32),
        ("2:4 per-row C fp16 (true OBS, joint)", 4, 1, True, torch.float16),
    ):
        blocks = E // bk
        subsets_b = torch.tensor(list(combinations(range(blocks), blocks // 2)), dtype=torch.long)
        subsets = (subsets_b[..., None] * bk + torch.arange(bk)).reshape(subsets_b.shape[0], -1).to(dev)
        S, P = subsets.shape
        G = K // E
        if per_item:
            N = min(M, 64) * G  # one 64-row chunk of the layer
            U = N
        else:
            N, U = M * G, G
        w = torch.randn(N, E, device=dev)
        C = spd_inverse(E, "cpu").expand(U, E, E) + 0.05 * torch.eye(E)
        c = C.contiguous().to(dev, c_dtype)
        c_index = None if per_item else torch.arange(G, device=dev).repeat(M)
        t = timeit(lambda: ops.score_subsets(w, c, subsets, c_index), dev, b.repeat)
        esize = torch.finfo(c_dtype).bits // 8
        bytes_ = 4.0 * N * E + esize * U * E * E + 4.0 * N * S + 8.0 * N + (8.0 * N if c_index is not None else 0.0)
        b.record("score_subsets", f"{what} N={N} E={E} S={S} P={P}", t, bytes_=bytes_,
                 flops=N * S * _subset_flops(P), precision="fp32")


def case_lowrank_sub(b: Bench, M: int, K: int, quick: bool) -> None:
    """The Schur-update op of True OBS halfway through a 2:4 sweep (ng=64: P=128 columns
    pruned per batch, half of the batches done): the panel C[S, R] = C0[S, R] - U[S] U[R]ᵀ
    (R the K/2 columns later batches visit, U the K/4 factor columns so far, fp16, read
    through a strided view as the pruner does), then the new factor U_b = C[S, R]ᵀ L⁻ᵀ
    by ``lowrank_factor`` (hi + lo fp16 parts: 3P inner dimension)."""
    dev = b.device
    P = 64 if quick else 128
    R, O = K // 2, K // 4
    for N in ((8,) if quick else (32, 64)):
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            need = N * (K * (O + P) * 2 + 3 * P * R * 4)
            free = torch.cuda.mem_get_info(dev)[0]
            if need > 0.9 * free:
                b.note("lowrank_sub", f"N={N} P={P} R={R} O={O} fp16 U", "skipped", f"needs {need / GIB:.1f} GiB")
                continue
        g = torch.Generator(device="cpu").manual_seed(N * 1000 + P)
        U = (torch.randn(N, K, O + P, generator=g) * 0.01).to(dev, torch.float16)
        base = torch.randn(N, P, R, generator=g).to(dev)
        a = U[:, :P, :O]
        bv = U[:, K - R :, :O]  # a strided view (last dim contiguous), as the pruner passes U[:, s0:, :o]
        t = timeit(lambda: ops.lowrank_sub(base, a, bv), dev, b.repeat)
        # On a GPU a tensor-core fp16 GEMM; the CPU kernel widens to fp32 first.
        prec = "fp16" if dev.type == "cuda" else "fp32"
        b.record("lowrank_sub", f"panel N={N} P={P} R={R} O={O} fp16 U", t,
                 bytes_=N * (2.0 * (P + R) * O + 2 * 4.0 * P * R), flops=2.0 * N * P * R * O, precision=prec)
        panel = ops.lowrank_sub(base, a, bv)
        linv = torch.linalg.inv(torch.eye(P, device=dev) + 0.1 * torch.randn(N, P, P, generator=g).to(dev).tril(-1))
        t = timeit(lambda: ops.lowrank_factor(panel, linv, torch.float16), dev, b.repeat)
        # CUDA: the panel read once, [hi; lo; hi] fp16 written, one GEMM over 3P; CPU: one fp32 GEMM.
        b.record("lowrank_factor", f"factor N={N} R={R} P={P} hi+lo fp16", t,
                 bytes_=N * (4.0 * P * R + 3 * 2.0 * P * R + 3 * 2.0 * P * R + 4.0 * R * P),
                 flops=2.0 * N * R * P * 3 * P, precision=prec)
        U = base = a = bv = panel = linv = None


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; cpu with --quick)")
    ap.add_argument("--rows", "-M", type=int, default=2560)
    ap.add_argument("--cols", "-K", type=int, default=9728)
    ap.add_argument("--ops", nargs="+", default=None, help="subset of the ops to run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="M=256, K=1024, small ceilings (CPU smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.cols = 256, 1024
        args.device = args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    M, K = args.rows, args.cols
    if M % 16 or K % 16:
        ap.error("M and K must be multiples of 16 (the reference patterns' views)")

    b = Bench(device, args.repeat)
    env = environment(device)
    print(f"{env['device']}, torch {env['torch']}, build {env['build']}, commit {env['commit']}, M={M}, K={K}")
    cases: Dict[str, Callable[[], None]] = {
        "block_reduce": lambda: case_block_reduce(b, M, K),
        "block_scale_": lambda: case_block_scale_(b, M, K),
        "kth_largest": lambda: case_kth_largest(b, M, K),
        "score_subsets": lambda: case_score_subsets(b, M, K),
        "lowrank_sub": lambda: case_lowrank_sub(b, M, K, args.quick),
    }
    present = list(getattr(ops, "__all__", KNOWN))
    wanted = args.ops or list(dict.fromkeys(KNOWN + present))
    ceilings(b, args.quick)
    for name in wanted:
        if not callable(getattr(ops, name, None)):
            b.note(name, "-", "skipped", "not in s3sparse.ops at run time")
            continue
        if name in ELSEWHERE:
            b.note(name, "-", "elsewhere", ELSEWHERE[name])
            continue
        if name not in cases:
            b.note(name, "-", "no case", "present in s3sparse.ops but this script has no benchmark for it yet")
            continue
        try:
            cases[name]()
        except Exception as exc:  # noqa: BLE001 - one op's failure must not hide the others
            b.note(name, "-", "failed", f"{type(exc).__name__}: {exc}")
            traceback.print_exc(limit=4)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        sync(device)

    out = Path(args.out) if args.out else HERE / "results" / f"ops-{device.type}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(benchmark="ops", **env, M=M, K=K, repeat=args.repeat, ceilings=b.ceil, ops_present=present,
                timing="CUDA events" if device.type == "cuda" else "time.perf_counter")
    out.write_text(json.dumps(dict(meta=meta, results=b.rows), indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
