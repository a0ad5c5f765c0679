"""One PackedLinear call per reference pattern (fp16, 2560x9728), for a profiler.

    ncu --section SpeedOfLight --section WarpStateStats -k regex:packed python benchmarks/profile_packed.py

Each pattern is called twice (the first call checks the tables on the host);
the profiler's kernel filter picks the launches.
"""

from __future__ import annotations

import argparse

import torch

from s3sparse import patterns
from s3sparse.sparse import PackedLinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2560x9728", help="MxK")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--patterns", nargs="+", default=["24", "block16"])
    args = ap.parse_args()
    M, K = (int(v) for v in args.shape.split("x"))
    for name in args.patterns:
        lin = torch.nn.Linear(K, M, bias=False, device="cuda", dtype=torch.float16)
        scope, nnz = patterns.by_name(name, lin.weight)
        scope.hard_threshold(nnz=nnz)
        packed = PackedLinear.from_linear(lin, scope, nnz)
        x = torch.randn(args.tokens, K, device="cuda", dtype=torch.float16)
        for _ in range(2):
            packed(x)
        torch.cuda.synchronize()
        print(name, packed)


if __name__ == "__main__":
    main()
