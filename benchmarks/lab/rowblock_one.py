"""One PackedLinear call a token count on a 2560x9728 fp16 block16-rows weight (after a warm-up), for a
profiler (ncu -k regex:rowblock python benchmarks/lab/rowblock_one.py 1 16): the row-block kernel's FMA
form at 1-2 tokens, its tensor-core form from 3. RB_SHAPE=4096x4096 picks another shape; RB_DEVICE=cpu
runs it on the CPU (a dry run of the script)."""

import os
import sys

import torch

from s3sparse.patterns import parse_pattern
from s3sparse.sparse import PackedLinear, PackedWeight

DEV = os.environ.get("RB_DEVICE", "cuda")
M, K = (int(v) for v in os.environ.get("RB_SHAPE", "2560x9728").split("x"))
W = torch.nn.Parameter(torch.randn(M, K, device=DEV, dtype=torch.float16))
with torch.no_grad():
    scope, nnz = parse_pattern("block16-rows").build(W)
    scope.hard_threshold(nnz=nnz)
layer = PackedLinear(PackedWeight.from_pattern(W.detach(), "block16-rows"))
cuda = DEV == "cuda"
for n in [int(a) for a in sys.argv[1:]] or [1, 16]:
    x = torch.randn(n, K, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push(f"tokens{n}")  # (device_packed.sh rowblockncu profiles this call only)
        layer(x)
        if cuda:
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
print("done")
