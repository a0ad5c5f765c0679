"""One sp24_linear call a token count on a 2560x9728 fp16 2:4 weight (after a warm-up), for a profiler
(ncu -k regex:sp24 python benchmarks/lab/sp24_one.py 1 16). SP_SHAPE=4096x4096 picks another shape."""

import os
import sys

import torch

from s3sparse import ops
from s3sparse.patterns import parse_pattern
from s3sparse.sparse import PackedWeight
from s3sparse.sparse.sp24 import sp24_meta_words

M, K = (int(v) for v in os.environ.get("SP_SHAPE", "2560x9728").split("x"))
W = torch.nn.Parameter(torch.randn(M, K, device="cuda", dtype=torch.float16))
with torch.no_grad():
    scope, nnz = parse_pattern("2:4").build(W)
    scope.hard_threshold(nnz=nnz)
packed = PackedWeight.from_pattern(W.detach(), "2:4")
values, meta = packed.values, sp24_meta_words(packed, 0)
for n in [int(a) for a in sys.argv[1:]] or [1, 16]:
    x = torch.randn(n, K, device="cuda", dtype=torch.float16)
    for _ in range(3):
        ops.sp24_linear(x, values, meta, M, None, checked=True)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(f"tokens{n}")
    ops.sp24_linear(x, values, meta, M, None, checked=True)
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
print("done")
