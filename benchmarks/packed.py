"""Packed execution (``s3sparse.sparse.PackedLinear``) against dense ``F.linear`` and 2:4 semi-structured sparsity.

    python benchmarks/packed.py                    # cuda, fp16, the three layer shapes below
    python benchmarks/packed.py --quick            # CPU smoke run: small shapes, a few seconds
    python benchmarks/packed.py --shapes 4096x4096 --tokens 1 16 --patterns 2:4 --repeat 10

For every weight shape M×K (default 2560×9728, 9728×2560, 4096×4096), pattern (default the four
reference patterns 2:4, 4:8, coupled-2:4, block16-rows) and token count N (default 1, 2, 4, 8, 16,
64, 512, 4096), a random weight pruned by magnitude to the pattern is multiplied by a random
(N, K) input three ways:

* ``dense`` — ``F.linear(x, W)`` on the dense weight (cuBLAS on a GPU);
* ``ours`` — ``PackedLinear`` (the ``s3sparse::packed_linear`` op on the packed weight);
* ``semi`` — ``F.linear(x, to_sparse_semi_structured(W))`` (2:4 semi-structured sparsity, cuSPARSELt /
  CUTLASS), where it runs: only a weight that is 2:4 (2:4 and coupled 2:4 are), on a GPU that supports
  it; otherwise the row says why not.

Each time is the median over ``--repeat`` samples (CUDA events on a GPU, ``perf_counter`` on the
CPU; a warm-up call excluded; short calls timed back to back). ``GB/s`` counts the bytes a call
must move — the weight in its stored form (dense, packed, or semi-structured values + metadata),
x and y — and ``of_copy`` relates it to the device-to-device copy bandwidth (bytes read + written
per second) measured first in the same run. ``ratio`` is the packed size over the dense size. Each
result is also checked against the dense product (``max_rel_err``).

A table is printed; JSON (device name, torch version, git commit — ``$S3SPARSE_GIT_COMMIT`` /
``$S3SPARSE_COMMIT`` override it — and every figure) goes to ``--out`` (default
``benchmarks/results/packed-<device>[-quick].json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import environment, sync, timeit  # noqa: E402

from s3sparse.llm import parse_pattern  # noqa: E402
from s3sparse.sparse import PackedLinear  # noqa: E402

SHAPES = ["2560x9728", "9728x2560", "4096x4096"]
TOKENS = [1, 2, 4, 8, 16, 64, 512, 4096]
PATTERNS = ["2:4", "4:8", "coupled-2:4", "block16-rows"]
QUICK_SHAPES = ["64x256", "128x128"]
QUICK_TOKENS = [1, 4, 64]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_shape(text: str) -> tuple[int, int]:
    try:
        m, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is MxK, e.g. 2560x9728, got {text!r}") from None
    return m, k


def copy_bandwidth(device: torch.device, nbytes: int, repeat: int, min_sample_s: float) -> float:
    """Device-to-device ``dst.copy_(src)`` bandwidth, bytes read + written per second."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, repeat, min_sample_s=min_sample_s)
    return 2.0 * nbytes / t["seconds"]


def is_two_four(W: torch.Tensor) -> bool:
    """Whether every run of 4 adjacent weights of a row holds at most 2 non-zeros."""
    M, K = W.shape
    return K % 4 == 0 and bool(((W != 0).view(M, K // 4, 4).sum(-1) <= 2).all())


def semi_structured(W: torch.Tensor):
    """``(weight, stored bytes, None)`` as 2:4 semi-structured, or ``(None, None, reason)``."""
    if not is_two_four(W):
        return None, None, "the weight is not 2:4 (semi-structured sparsity needs 2 of every 4)"
    try:
        from torch.sparse import to_sparse_semi_structured

        Ws = to_sparse_semi_structured(W)
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    parts = [getattr(Ws, name, None) for name in ("packed", "meta")]
    stored = sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
    return Ws, stored or None, None


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().abs().max().clamp_min(1e-30)
    return float((got.float() - want.float()).abs().max() / scale) if want.numel() else 0.0


class Run:
    def __init__(self, device: torch.device, dtype: torch.dtype, repeat: int, min_sample_s: float, copy_bps: float):
        self.device, self.dtype, self.repeat, self.min_sample_s, self.copy_bps = device, dtype, repeat, min_sample_s, copy_bps
        self.rows: List[dict] = []

    def time(self, fn) -> float:
        return timeit(fn, self.device, self.repeat, min_sample_s=self.min_sample_s)["seconds"]

    def case(self, M: int, K: int, pattern: str, tokens: List[int]) -> None:
        dev, dtype = self.device, self.dtype
        esize = torch.finfo(dtype).bits // 8
        linear = torch.nn.Linear(K, M, bias=False, device=dev, dtype=dtype)
        with torch.no_grad():
            linear.weight.normal_()
            scope, nnz = parse_pattern(pattern).build(linear.weight)
            scope.hard_threshold(nnz=nnz)
        W = linear.weight.detach()
        packed = PackedLinear.from_linear(linear, pattern=pattern)
        dense_bytes = M * K * esize
        ratio = packed.nbytes / dense_bytes
        Ws, semi_bytes, semi_reason = semi_structured(W)
        for N in tokens:
            x = torch.randn(N, K, device=dev, dtype=dtype)
            io = (N * K + N * M) * esize
            row = dict(M=M, K=K, pattern=pattern, tokens=N, dtype=str(dtype).replace("torch.", ""), ratio=ratio,
                       packed_bytes=packed.nbytes, dense_bytes=dense_bytes, row_group=packed.row_group,
                       index_format=packed.packed.index_format)
            with torch.no_grad():
                want = F.linear(x, W)
                row["dense_s"] = self.time(lambda: F.linear(x, W))
                row["ours_s"] = self.time(lambda: packed(x))
                row["ours_max_rel_err"] = max_rel_err(packed(x), want)
                if Ws is not None:
                    try:
                        row["semi_max_rel_err"] = max_rel_err(F.linear(x, Ws), want)
                        row["semi_s"] = self.time(lambda: F.linear(x, Ws))
                    except Exception as exc:  # noqa: BLE001 - e.g. a token count the kernel refuses
                        row["semi_status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                else:
                    row["semi_status"] = semi_reason
            for kind, nbytes in (("dense", dense_bytes), ("ours", packed.nbytes), ("semi", semi_bytes)):
                if f"{kind}_s" in row and nbytes:
                    row[f"{kind}_GB/s"] = (nbytes + io) / row[f"{kind}_s"] / 1e9
                    row[f"{kind}_of_copy"] = (nbytes + io) / row[f"{kind}_s"] / self.copy_bps
            row["speedup_vs_dense"] = row["dense_s"] / row["ours_s"]
            self.rows.append(row)
            self.print_row(row)
        del packed, Ws, linear
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    @staticmethod
    def header() -> str:
        return (f"{'shape':>10} {'pattern':<13} {'N':>5} {'dense ms':>9} {'ours ms':>9} {'speedup':>7} "
                f"{'ours GB/s':>9} {'of copy':>7} {'semi ms':>9} {'ratio':>6}  notes")

    @staticmethod
    def print_row(r: dict) -> None:
        semi = f"{r['semi_s'] * 1e3:9.3f}" if "semi_s" in r else f"{'-':>9}"
        notes = "" if "semi_s" in r else f"semi: {r.get('semi_status', '')}"
        print(f"{r['M']:>4}x{r['K']:<5} {r['pattern']:<13} {r['tokens']:>5} {r['dense_s'] * 1e3:9.3f} "
              f"{r['ours_s'] * 1e3:9.3f} {r['speedup_vs_dense']:7.2f} {r['ours_GB/s']:9.1f} {r['ours_of_copy']:7.1%} "
              f"{semi} {r['ratio']:6.3f}  {notes}", flush=True)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; cpu with --quick)")
    ap.add_argument("--dtype", default="float16", choices=sorted(_DTYPES))
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help="MxK weight shapes")
    ap.add_argument("--tokens", nargs="+", type=int, default=None)
    ap.add_argument("--patterns", nargs="+", default=None, help="pattern names of the model pipeline")
    ap.add_argument("--repeat", type=int, default=None, help="timed samples per cell (default 10; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, tokens {QUICK_TOKENS} on the CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.device = args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = args.shapes or [parse_shape(s) for s in (QUICK_SHAPES if args.quick else SHAPES)]
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    pattern_names = args.patterns or PATTERNS
    repeat = args.repeat or (2 if args.quick else 10)
    min_sample_s = 0.002 if args.quick else 0.02
    dtype = _DTYPES[args.dtype]

    env = environment(device)
    print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}, {args.dtype}")
    copy_bytes = (1024 if device.type == "cuda" else 32 if args.quick else 256) * 2**20
    copy_bps = copy_bandwidth(device, copy_bytes, repeat, min_sample_s)
    print(f"device-to-device copy: {copy_bps / 1e9:.1f} GB/s (read + write, {copy_bytes / 2**20:.0f} MiB)")
    run = Run(device, dtype, repeat, min_sample_s, copy_bps)
    print(run.header())
    failures = []
    for M, K in shapes:
        for pattern in pattern_names:
            try:
                run.case(M, K, pattern, tokens)
            except Exception as exc:  # noqa: BLE001 - one case's failure must not hide the others
                failures.append(dict(M=M, K=K, pattern=pattern, status="failed", detail=f"{type(exc).__name__}: {exc}"))
                print(f"{M}x{K} {pattern}: failed: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc(limit=4)
            sync(device)

    out = Path(args.out) if args.out else HERE / "results" / f"packed-{device.type}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(benchmark="packed", **env, dtype=args.dtype, shapes=[f"{m}x{k}" for m, k in shapes], tokens=tokens,
                patterns=pattern_names, repeat=repeat, **{"copy_GB/s": copy_bps / 1e9},
                timing="CUDA events" if device.type == "cuda" else "time.perf_counter")
    result = dict(meta=meta, results=run.rows, failures=failures)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
