"""A 2:4 decode kernel on the sparse tensor cores (benchmarks/lab/sp24_lab.cu), timed against dense
``F.linear`` and the package's ``PackedLinear`` in one run: fp16, 1-32 tokens, CUDA-graph replay,
each call on its own copy of the weight (copies spanning 4x the L2 cache, as benchmarks/packed.py).

The kernel reads the package's canonical 2:4 values as they are and a metadata tensor built here, in
the order ``mma.sp`` reads it. Which bits of which lane's metadata word the instruction reads for
which (row, column) is spelled out in ``LAYOUTS``; every layout is checked against fp32 ``F.linear``
(a wrong layout gives errors of order 1) and only the layouts that pass are timed.
The package's builder of the same words is ``s3sparse.sparse.sp24.sp24_meta_words`` (equal to
``meta_words(kept_index(W), "halves", True)`` here; tests/test_sp24.py checks it through a model of
the fragments).
Run from the repository root on the GPU machine, with s3sparse importable::

    PYTHONPATH=$PWD python3 benchmarks/lab/sp24_lab.py [NAME=-DFLAG,-DFLAG ...]

Knobs of the kernel: SP_U (iterations a batch of loads), SP_OWNMETA=1 (the kernel reads the package's
own 3-bit meta and builds the metadata words itself; layout "own"), SP_SELSPLIT (1: one metadata word a lane,
the two steps through selectors 0 and 1; 0: two words, selector 0), SP_WARPS (warps a block).
Environment: SP_WARPS_PER_SM (the K split is chosen so the grid has about this many warps an SM;
default "16"; a list times each), SP_TOKENS (default "1 2 4 8 16 32"; at most 32: tiles of 8 tokens).
Writes $OUT/sp24_lab.json (else /tmp).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

REPO = os.getcwd()
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from common import copy_bandwidth, git_commit, l2_cache_bytes, time_graph, warm_up  # noqa: E402
from s3sparse import patterns  # noqa: E402
from s3sparse.sparse import PackedLinear, PackedWeight  # noqa: E402


def build(name: str, flags: list[str]):
    directory = f"/tmp/sp24_lab/{name}"
    os.makedirs(directory, exist_ok=True)
    return load(name=f"sp24_{name}", sources=[f"{REPO}/benchmarks/lab/sp24_lab.cu"],
                extra_cuda_cflags=["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", *flags],
                build_directory=directory, verbose=False)


def kept_index(W: torch.Tensor) -> torch.Tensor:
    """(M, K/4, 2): the positions (0-3) of the two kept columns of each group of 4, ascending."""
    M, K = W.shape
    nz = W.view(M, K // 4, 4) != 0
    if not bool((nz.sum(-1) == 2).all()):
        raise ValueError("every group of 4 must keep exactly 2 non-zeros")
    pos = torch.arange(4, device=W.device, dtype=torch.int64).expand(M, K // 4, 4)
    return pos[nz].view(M, K // 4, 2)


def step_index(idx: torch.Tensor) -> torch.Tensor:
    """(tiles, iters, 2 steps, 16 rows, 16 compressed columns): the 2-bit index the instruction needs
    for compressed column j of tile row r in step s of iteration i, under the kernel's k order:
    virtual group q = j // 2 is original group 16 i + 4 (q % 4) + 2 s + q // 4."""
    M, G, _ = idx.shape
    tiles, iters = M // 16, G // 16
    q = torch.arange(8, device=idx.device)
    s = torch.arange(2, device=idx.device)
    group = 4 * (q % 4)[None, :] + 2 * s[:, None] + (q // 4)[None, :]  # (2, 8) within an iteration
    v = idx.view(tiles, 16, iters, 16, 2)[:, :, :, group, :]  # (tiles, 16 rows, iters, 2, 8, 2)
    return v.reshape(tiles, 16, iters, 2, 16).permute(0, 2, 3, 1, 4)


def pack_bits(v: torch.Tensor) -> torch.Tensor:
    """(..., 16) 2-bit fields -> (...) int32 words, field j at bits 2j."""
    w = (v.to(torch.int64) << (2 * torch.arange(16, device=v.device))).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def meta_words(idx: torch.Tensor, layout: str, selsplit: bool) -> torch.Tensor:
    """(tiles, iters, 32 lanes, words) int32, flattened: each lane's metadata word(s) an iteration.

    Layouts (the two lanes of a quad that the selector names: first, second):
      rows   first: row g, columns 0-15; second: row g + 8, columns 0-15
      halves first: row g columns 0-7 (low 16 bits), row g + 8 columns 0-7 (high);
             second: the same for columns 8-15
    """
    st = step_index(idx)  # (tiles, iters, 2, 16, 16)
    tiles, iters = st.shape[:2]
    g_rows = st[:, :, :, :8, :]  # rows g
    h_rows = st[:, :, :, 8:, :]  # rows g + 8
    if layout == "rows":
        first, second = pack_bits(g_rows), pack_bits(h_rows)  # (tiles, iters, 2, 8)
    elif layout == "halves":
        first = pack_bits(torch.cat([g_rows[..., :8], h_rows[..., :8]], -1))
        second = pack_bits(torch.cat([g_rows[..., 8:], h_rows[..., 8:]], -1))
    else:
        raise ValueError(layout)
    words = 1 if selsplit else 2
    out = torch.zeros(tiles, iters, 8, 4, words, dtype=torch.int32, device=idx.device)  # (.., g, t, w)
    for s in range(2):
        if selsplit:  # step s: lanes t = 2s, 2s + 1, word 0
            out[:, :, :, 2 * s, 0], out[:, :, :, 2 * s + 1, 0] = first[:, :, s], second[:, :, s]
        else:  # step s: lanes t = 0, 1, word s
            out[:, :, :, 0, s], out[:, :, :, 1, s] = first[:, :, s], second[:, :, s]
    return out.reshape(-1).contiguous()


LAYOUTS = ["rows", "halves"]


def main() -> None:
    variants = {"u4": []}
    for arg in sys.argv[1:]:
        name, _, flags = arg.partition("=")
        variants[name] = [f for f in flags.split(",") if f]
    t0 = time.time()
    with cf.ThreadPoolExecutor(8) as pool:
        mods = dict(zip(variants, pool.map(lambda kv: build(*kv), variants.items())))
    print(f"built {len(mods)} variants in {time.time() - t0:.0f} s", flush=True)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rotate = 4 * l2_cache_bytes(dev)
    copy_bps = copy_bandwidth(dev, 1 << 30, 5)
    print(f"{torch.cuda.get_device_name()}: copy {copy_bps / 1e9:.0f} GB/s, weights rotate over "
          f"{rotate / 2**20:.0f} MiB", flush=True)
    targets = [int(v) for v in os.environ.get("SP_WARPS_PER_SM", "16").split()]
    tokens = [int(v) for v in os.environ.get("SP_TOKENS", "1 2 4 8 16 32").split()]
    rows = []
    for M, K in [(2560, 9728), (9728, 2560), (4096, 4096)]:
        W = torch.randn(M, K, device=dev, dtype=torch.float16)
        with torch.no_grad():
            scope, nnz = patterns.by_name("24", W)
            scope.hard_threshold(nnz=nnz)
        Wd = W.detach()
        packed = PackedLinear(PackedWeight.from_pattern(Wd, "2:4"))
        vals = Wd[Wd != 0].view(M, K // 2)
        assert torch.equal(vals, packed.packed.values.view(M, K // 2)), "the canonical values are row-major kept values"
        idx = kept_index(Wd)
        n_sp = max(1, math.ceil(rotate / (vals.numel() * 2 * 1.125)))  # values + metadata
        n_dense = max(1, math.ceil(rotate / (Wd.numel() * 2)))
        dense_ws = [Wd] + [Wd.clone() for _ in range(n_dense - 1)]
        packs = [packed] + [PackedLinear(PackedWeight.from_pattern(Wd.clone(), "2:4")) for _ in range(n_sp - 1)]
        metas = {(lay, ss): meta_words(idx, lay, ss) for lay in LAYOUTS for ss in (True, False)}
        for N in tokens:
            x = torch.randn(N, K, device=dev, dtype=torch.float16)
            want = F.linear(x.float(), Wd.float())
            row = dict(shape=f"{M}x{K}", tokens=N)

            def timed(fns):
                warm_up(fns, dev)
                calls = max(len(fns), 200 - 200 % len(fns))
                return round(time_graph(fns, dev, calls, 5)["seconds"] * 1e6, 2)

            row["dense_us"] = timed([lambda w=w: F.linear(x, w) for w in dense_ws])
            row["packed_us"] = timed([lambda m=m: m(x) for m in packs])
            for name, mod in mods.items():
                selsplit = "-DSP_SELSPLIT=0" not in variants[name]
                own = "-DSP_OWNMETA=1" in variants[name]  # the kernel reads the package's own meta
                for target in targets:
                    S = max(1, min(K // 64, round(sms * target / (M // 16))))
                    ws = torch.zeros(S, M, 8 * (1 if N <= 8 else 2 if N <= 16 else 4), device=dev, dtype=torch.float32)
                    cnt = torch.zeros(M // 16, device=dev, dtype=torch.int32)
                    for lay in (["own"] if own else LAYOUTS):
                        meta = packed.packed.meta if own else metas[(lay, selsplit)]
                        got = mod.linear(x, vals, meta, None, ws, cnt, S).float()
                        err = float((got - want).abs().max() / want.abs().max())
                        key = f"{name}_w{target}_{lay}"
                        row[f"{key}_err"] = err
                        if err > 1e-2:
                            continue
                        copies = [(vals.clone(), meta.clone()) for _ in range(n_sp - 1)]
                        fns = [lambda v=v, m=m: mod.linear(x, v, m, None, ws, cnt, S)
                               for v, m in [(vals, meta), *copies]]
                        row[f"{key}_us"] = timed(fns)
                        row[f"{key}_S"] = S
                        del copies
            nbytes = vals.numel() * 2 * 1.125  # values + 2 bits a 16-bit kept value (1/8 of the value bytes)
            best = min((v for k, v in row.items() if k.endswith("_us") and k not in ("dense_us", "packed_us")),
                       default=None)
            if best:
                row["best_x_dense"] = round(row["dense_us"] / best, 3)
                row["best_of_copy"] = round(nbytes / (best * 1e-6) / copy_bps, 3)
            row["packed_x_dense"] = round(row["dense_us"] / row["packed_us"], 3)
            print(row, flush=True)
            rows.append(row)
        del dense_ws, packs, metas
        torch.cuda.empty_cache()
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, commit=git_commit(), variants=variants,
               copy_GBps=copy_bps / 1e9, timing="GPU time a call, CUDA-graph replay, weights rotated over 4x L2",
               rows=rows)
    path = os.path.join(os.environ.get("OUT", "/tmp"), "sp24_lab.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
