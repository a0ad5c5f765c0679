"""Lab: 2:4 at 32-4096 tokens through torch's two sparse tensor-core backends, beside dense and PackedLinear.

    python benchmarks/lab/semi_backends.py [--shapes 2560x9728 ...] [--tokens 64 512 ...] [--out lab.json]

The questions: from how many tokens does torch's 2:4 path beat PackedLinear's default, and how much do
cuSPARSELt's algorithm search and its fused transpose add? (A first version also asked whether torch's
CUTLASS 2:4 GEMM could run on PackedLinear's own values, shared, not copied: for plain 2:4 they are exactly
its ``packed`` operand. It cannot on an H100: ``sparse_semi_structured_mad_op : Supported only on GPUs with
compute capability 8.x``; benchmarks/results/semi-backends-h100-350efa5.txt.) Timed, fp16, GPU time by
CUDA-graph replay, weights rotated over 200 MiB (L2 cold), µs a call:

* ``dense``     F.linear(x, W)
* ``packed``    PackedLinear's default path (whatever it picks at that token count)
* ``cslt``      F.linear(x, to_sparse_semi_structured(W)): what ``use_semi_structured`` runs (cuSPARSELt,
                algorithm 0, its own copy of W)
* ``cslt_t``    torch._cslt_sparse_mm(compressed, x.t(), transpose_result=True): the same, the output's
                transpose fused

(``torch._cslt_sparse_mm_search`` failed on the H100 with cuSPARSELt's "internal error", so the algorithm
stays 0.)

Each output is checked against F.linear in fp32 (relative error printed). JSON with the device, torch and
commit goes to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import graph_us, write_rows  # noqa: E402

from s3sparse.patterns import parse_pattern  # noqa: E402
from s3sparse.sparse import PackedLinear, PackedWeight  # noqa: E402

ROTATE_BYTES = 200 * 2**20


def build(M: int, K: int, dtype: torch.dtype):
    W = torch.randn(M, K, device="cuda", dtype=dtype)
    with torch.no_grad():
        scope, nnz = parse_pattern("2:4").build(W)
        scope.hard_threshold(nnz=nnz)
    layer = PackedLinear(PackedWeight.from_pattern(W, "2:4"))
    from torch.sparse import to_sparse_semi_structured

    return dict(W=W, layer=layer, cslt=to_sparse_semi_structured(W), compressed=torch._cslt_compress(W))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["2560x9728", "9728x2560", "4096x4096"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[32, 64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default="semi-backends.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.float16
    rows = []
    print(f"{'shape':>10} {'N':>5} " + " ".join(f"{m:>10}" for m in ("dense", "packed", "cslt", "cslt_t"))
          + "   ×dense: packed cslt cslt_t   err cslt_t")
    for shape in args.shapes:
        M, K = (int(v) for v in shape.split("x"))
        copies = max(1, math.ceil(ROTATE_BYTES / (M * K * 2)))
        sets = [build(M, K, dtype) for _ in range(copies)]
        for n in args.tokens:
            x = torch.randn(n, K, device=dev, dtype=dtype)
            fns = {
                "dense": [lambda s=s: F.linear(x, s["W"]) for s in sets],
                "packed": [lambda s=s: s["layer"](x) for s in sets],
                "cslt": [lambda s=s: F.linear(x, s["cslt"]) for s in sets],
                "cslt_t": [lambda s=s: torch._cslt_sparse_mm(s["compressed"], x.t(), transpose_result=True)
                           for s in sets],
            }
            want = F.linear(x.float(), sets[0]["W"].float())
            row = dict(M=M, K=K, tokens=n, us={}, err={})
            for name, calls in fns.items():
                try:
                    with torch.no_grad():
                        got = calls[0]().float()
                        row["err"][name] = float((got - want).norm() / want.norm())
                        row["us"][name] = graph_us(calls, dev, args.repeat)
                except Exception as exc:  # noqa: BLE001 - the lab reports what fails
                    row["us"][name] = None
                    row["err"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
            us, d = row["us"], row["us"]["dense"]
            ratio = lambda k: f"{d / us[k]:.2f}" if us.get(k) else "-"  # noqa: E731
            print(f"{shape:>10} {n:>5} " + " ".join(f"{us[k]:>10.1f}" if us.get(k) else f"{'-':>10}" for k in fns)
                  + f"   {ratio('packed')} {ratio('cslt')} {ratio('cslt_t')}   {row['err']['cslt_t']}", flush=True)
        del sets
        torch.cuda.empty_cache()
    write_rows(args.out, dev, rows)


if __name__ == "__main__":
    main()
