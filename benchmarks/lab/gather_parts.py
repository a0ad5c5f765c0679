"""Lab: where a GatherLinear's time goes at 1-64 tokens (a col-blocks:16:0.5 weight, fp16, CUDA).

    python benchmarks/lab/gather_parts.py [--shapes 2560x9728 ...] [--tokens 1 16 64] [--out lab.json]

On an H100 the gather route of a column pattern ran at only 1.03-1.16x dense at 1-16 tokens
(benchmarks/results/packed-gather-h100-350efa5.txt) though it reads half the bytes. Timed here, GPU time by
CUDA-graph replay, weights rotated over 200 MiB, µs a call:

* ``dense``   F.linear(x, W) on the pruned M x K weight
* ``gather``  the GatherLinear (x.index_select(-1, index), then F.linear on the M x K' kept columns)
* ``select``  x.index_select(-1, index) alone
* ``small``   F.linear(x', W') alone, x' already gathered
* ``half``    F.linear on an M x K' weight that never had columns dropped (a dense layer of that shape)
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
from s3sparse.sparse.compact import compact_inputs  # noqa: E402

ROTATE_BYTES = 200 * 2**20


def build(M: int, K: int, dtype: torch.dtype) -> dict:
    W = torch.randn(M, K, device="cuda", dtype=dtype)
    with torch.no_grad():
        scope, nnz = parse_pattern("col-blocks:16:0.5").build(W)
        scope.hard_threshold(nnz=nnz)
    layer = torch.nn.Linear(K, M, bias=False, device="cuda", dtype=dtype)
    layer.weight.data.copy_(W)
    gathered = compact_inputs(layer)
    return dict(W=W, gathered=gathered, index=gathered.index, small=gathered.linear.weight.detach(),
                half=torch.randn_like(gathered.linear.weight.detach()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["2560x9728", "9728x2560", "4096x4096"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default="gather-parts.json")
    args = ap.parse_args()
    dev, dtype, rows = torch.device("cuda"), torch.float16, []
    names = ("dense", "gather", "select", "small", "half")
    print(f"{'shape':>10} {'N':>4} " + " ".join(f"{m:>8}" for m in names) + "   µs, graph replay")
    for shape in args.shapes:
        M, K = (int(v) for v in shape.split("x"))
        sets = [build(M, K, dtype) for _ in range(max(1, math.ceil(ROTATE_BYTES / (M * K * 2))))]
        for n in args.tokens:
            x = torch.randn(n, K, device=dev, dtype=dtype)
            xs = x.index_select(-1, sets[0]["index"])
            fns = {
                "dense": [lambda s=s: F.linear(x, s["W"]) for s in sets],
                "gather": [lambda s=s: s["gathered"](x) for s in sets],
                "select": [lambda s=s: x.index_select(-1, s["index"]) for s in sets],
                "small": [lambda s=s: F.linear(xs, s["small"]) for s in sets],
                "half": [lambda s=s: F.linear(xs, s["half"]) for s in sets],
            }
            row = dict(M=M, K=K, kept=int(sets[0]["index"].numel()), tokens=n, us={})
            with torch.no_grad():
                for name, calls in fns.items():
                    row["us"][name] = graph_us(calls, dev, args.repeat)
            rows.append(row)
            print(f"{shape:>10} {n:>4} " + " ".join(f"{row['us'][k]:>8.1f}" for k in names), flush=True)
        del sets
        torch.cuda.empty_cache()
    write_rows(args.out, dev, rows)


if __name__ == "__main__":
    main()
