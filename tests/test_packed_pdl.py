"""The decode kernels as programmatic dependent launches (the default on sm_90+; ``S3SPARSE_PACKED_PDL``
is read once per process, so each case runs in a child process with it set): chains of packed layers
whose second kernel reads the first one's output, eagerly and replayed in a CUDA graph, must equal the
pruned dense chain."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import torch
    from torch import nn
    from s3sparse.llm import parse_pattern
    from s3sparse.sparse import PackedLinear

    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    def layer(name, m, k):
        lin = nn.Linear(k, m).to("cuda", torch.float16)
        scope, nnz = parse_pattern(name).build(lin.weight)
        scope.hard_threshold(nnz=nnz)
        return lin, PackedLinear.from_linear(lin, pattern=name)

    def rel(got, want):
        return float((got.float() - want).norm() / want.norm())

    def dense_chain(a, b, x):  # the pruned dense layers in fp32, the hidden rounded to fp16 like the packed chain's
        f = torch.nn.functional.linear
        return f(f(x.float(), a.weight.float(), a.bias.float()).half().float(), b.weight.float(), b.bias.float())

    for name in ("2:4", "4:8", "coupled-2:4"):
        (a, pa), (b, pb) = layer(name, 256, 512), layer(name, 512, 256)
        for n in (1, 2, 4, 16):
            x = torch.randn(n, 512, device="cuda", dtype=torch.float16)
            want = dense_chain(a, b, x)
            chain = lambda: pb(pa(x))  # pb's kernel reads pa's output: a dependent launch must wait for it
            for call in range(3):  # the first calls check the tables; later ones take the decode kernels
                err = rel(chain(), want)
                assert err < 5e-3, f"{name} tokens={n} eager call {call}: rel err {err}"
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                chain()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = [chain() for _ in range(4)]
            x.copy_(torch.randn_like(x))
            want = dense_chain(a, b, x)
            graph.replay()
            torch.cuda.synchronize()
            for i, out in enumerate(outs):
                err = rel(out, want)
                assert err < 5e-3, f"{name} tokens={n} graph output {i}: rel err {err}"
    print("ok")
""")


@pytest.mark.cuda
@pytest.mark.parametrize("sp24", ["1", "0"], ids=["sp24", "packed-kernels"])
def test_dependent_launch_chains_equal_the_dense_chain(sp24):
    env = dict(os.environ, S3SPARSE_PACKED_PDL="1", S3SPARSE_PACKED_SP24=sp24)
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
