"""The package's sp24_linear kernel (csrc/cuda/sp24.cu, the CPU kernel and the schemas) built alone as a
torch extension (about a minute, against a full wheel's seven), registered as ``torch.ops.s3lab.*``,
then checked and timed on a GPU: a quick way to verify a change of that kernel on the device.

    PYTHONPATH=$PWD python benchmarks/lab/sp24_ext.py      (after benchmarks/device_packed.sh build)

1. Against fp32 ``F.linear`` of the pruned weight: 2:4, 4:8 and coupled 2:4 (column orders 0-2), fp16
   and bf16, 96x320 and 128x2048, 1 / 5 / 16 / 17 / 33 / 64 / 65 / 130 tokens (SP_CHECK_TOKENS), with a bias, both kernel forms (``checked`` False and True); and a
   corrupt metadata word (unchecked: its tile NaN, the rest right).
2. GPU time a call by CUDA-graph replay, every call on its own copy of the weight (over 4x L2), dense
   against sp24 (vouched form), shapes 2560x9728, 9728x2560, 4096x4096, tokens SP_TOKENS (default
   "1 4 8 16"), patterns SP_PATTERNS (default all three), shapes SP_SHAPES (default those three). Writes $OUT/sp24_ext.json (else /tmp).
3. Variants: SP24_VARIANTS="base= cand=@benchmarks/lab/x.patch" builds the source once a variant (with its
   defines, as torch.ops.s3lab_<name>), checks each and times them side by side.
The weights are pruned and their metadata built on the CPU by the installed s3sparse (a CPU-only build will do:
``SKBUILD_CMAKE_DEFINE=S3SPARSE_CUDA=OFF``, about a minute on 16 cores, against the full wheel's four).
"""

from __future__ import annotations

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
from s3sparse.patterns import parse_pattern  # noqa: E402
from s3sparse.sparse import PackedWeight  # noqa: E402
from s3sparse.sparse.sp24 import COLUMN_ORDERS, sp24_meta_words  # noqa: E402


def variants() -> dict:
    """SP24_VARIANTS="name=-DFLAG,-DFLAG2 other= cand=@benchmarks/lab/x.patch" -> {name: [flags]}; default one
    build of the source as is. An item "@file" is a patch (git diff of csrc/) applied to a copy of csrc/ for that
    variant alone."""
    spec = os.environ.get("SP24_VARIANTS", "").split()
    if not spec:
        return {"": []}
    return {name: [f for f in flags.split(",") if f] for name, _, flags in (v.partition("=") for v in spec)}


def namespace(variant: str) -> str:
    return f"s3lab_{variant}" if variant else "s3lab"


def source_root(ns: str, patches: list) -> str:
    """The repository, or a copy of its csrc/ with the patches applied (a candidate change, timed beside the source)."""
    if not patches:
        return REPO
    import shutil
    import subprocess

    root = f"/tmp/{ns}_src"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(f"{REPO}/csrc", f"{root}/csrc")
    for patch in patches:
        subprocess.run(["git", "apply", os.path.join(REPO, patch)], cwd=root, check=True)
    return root


def build(variant: str, defines: list) -> None:
    ns = namespace(variant)
    root = source_root(ns, [d[1:] for d in defines if d.startswith("@")])
    flags = [f"-Ds3sparse={ns}", f"-I{root}/csrc", *[d for d in defines if not d.startswith("@")]]
    path = f"/tmp/{ns}_sp24"
    os.makedirs(path, exist_ok=True)
    load(name=f"{ns}_sp24", sources=[f"{root}/csrc/ops.cpp", f"{root}/csrc/cpu/sp24.cpp", f"{root}/csrc/cuda/sp24.cu"],
         extra_cflags=["-O2", "-std=c++20", *flags],
         extra_cuda_cflags=["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-gencode=arch=compute_90,code=sm_90", *flags],
         build_directory=path, is_python_module=False, verbose=False)


def build_all(vs: dict) -> None:
    """Compiles the variants at once (one process each), then loads them here (no rebuild)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(vs)) as pool:
        list(pool.map(build, vs.keys(), vs.values()))
    for name, defines in vs.items():
        build(name, defines)


def pruned(M: int, K: int, pattern: str, dtype, dev) -> tuple:
    """(W, values, metadata) on ``dev``, pruned and packed on the CPU (a CPU-only build of the package will do)."""
    W = torch.nn.Parameter(torch.randn(M, K, device=dev).to(dtype).cpu())
    with torch.no_grad():
        scope, nnz = parse_pattern(pattern).build(W)
        scope.hard_threshold(nnz=nnz)
    packed = PackedWeight.from_pattern(W.detach(), pattern)
    meta = sp24_meta_words(packed, COLUMN_ORDERS[pattern])
    return W.detach().to(dev), packed.values.to(dev), meta.to(dev)


def check(dev, variant: str) -> list:
    op = getattr(torch.ops, namespace(variant)).sp24_linear.default
    tokens = [int(v) for v in os.environ.get("SP_CHECK_TOKENS", "1 5 16 17 33 64 65 130").split()]
    failures = []
    for pattern, order in COLUMN_ORDERS.items():
        for dtype in (torch.float16, torch.bfloat16):
            for M, K in ((96, 320), (128, 2048)):  # (2048: the tiled kernel's slices of K)
                W, values, meta = pruned(M, K, pattern, dtype, dev)
                bias = torch.randn(M, device=dev).to(dtype)
                for n in tokens:
                    x = torch.randn(n, K, device=dev).to(dtype)
                    want = F.linear(x.float(), W.float(), bias.float())
                    for checked in (False, True):
                        got = op(x, values, meta, M, bias, checked, order).float()
                        err = float((got - want).abs().max() / want.abs().max())
                        ok = err < (1e-2 if dtype == torch.bfloat16 else 2e-3)
                        print(f"check {variant:8} {pattern:12} {str(dtype)[6:]:9} {M}x{K} tokens {n:3} checked {checked!s:5}: "
                              f"rel err {err:.2e}{'' if ok else '  FAILED'}", flush=True)
                        if not ok:
                            failures.append((variant, pattern, str(dtype), M, K, n, checked, err))
            W, values, meta = pruned(96, 320, pattern, dtype, dev)
            bad = meta.clone()
            bad[2, 1, 7] = 0  # tile 2: rows 32-47
            for n in (3, 40):  # (the decode and the tiled kernel)
                x = torch.randn(n, 320, device=dev).to(dtype)
                got = op(x, values, bad, 96, None, False, order).float()
                want = F.linear(x.float(), W.float())
                rest = torch.cat([got[:, :32], got[:, 48:]], 1) - torch.cat([want[:, :32], want[:, 48:]], 1)
                ok = bool(got[:, 32:48].isnan().all()) and float(rest.abs().max() / want.abs().max()) < 1e-2
                print(f"check {variant:8} {pattern:12} {str(dtype)[6:]:9} corrupt word, {n} tokens: "
                      f"{'its tile NaN, the rest right' if ok else 'FAILED'}")
                if not ok:
                    failures.append((variant, pattern, str(dtype), n, "corrupt"))
    return failures


def timings(dev, vs: dict) -> list:
    ops = {v: getattr(torch.ops, namespace(v)).sp24_linear.default for v in vs}
    rotate = 4 * l2_cache_bytes(dev)
    tokens = [int(v) for v in os.environ.get("SP_TOKENS", "1 4 8 16").split()]
    patterns = os.environ.get("SP_PATTERNS", " ".join(COLUMN_ORDERS)).split()
    rows = []
    shapes = os.environ.get("SP_SHAPES", "2560x9728 9728x2560 4096x4096").split()
    for M, K in [tuple(int(v) for v in shape.split("x")) for shape in shapes]:
        for pattern in patterns:
            order = COLUMN_ORDERS[pattern]
            W, values, meta = pruned(M, K, pattern, torch.float16, dev)
            n_sp = max(1, math.ceil(rotate / (values.numel() * 2 * 1.125)))
            n_dense = max(1, math.ceil(rotate / (W.numel() * 2)))
            dense = [W] + [W.clone() for _ in range(n_dense - 1)]
            sp = [(values, meta)] + [(values.clone(), meta.clone()) for _ in range(n_sp - 1)]
            for N in tokens:
                x = torch.randn(N, K, device=dev, dtype=torch.float16)

                def timed(fns):
                    warm_up(fns, dev)
                    calls = max(len(fns), 200 - 200 % len(fns))
                    return time_graph(fns, dev, calls, 5)["seconds"] * 1e6

                row = dict(shape=f"{M}x{K}", pattern=pattern, tokens=N)
                row["dense_us"] = timed([lambda w=w: F.linear(x, w) for w in dense])
                line = f"{row['shape']:>10} {pattern:12} {N:3} tokens: dense {row['dense_us']:6.2f} us"
                for v, op in ops.items():
                    us = timed([lambda v=v, m=m, op=op: op(x, v, m, M, None, True, order) for v, m in sp])
                    row[f"sp24{'_' + v if v else ''}_us"] = us
                    line += f", {v or 'sp24'} {us:6.2f} us ({row['dense_us'] / us:.2f}x)"
                print(line, flush=True)
                rows.append(row)
            del dense, sp
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    t0 = time.time()
    vs = variants()
    build_all(vs)
    print(f"built {len(vs)} in {time.time() - t0:.0f} s: {vs}", flush=True)
    dev = torch.device("cuda")
    failures = [f for v in vs for f in check(dev, v)]
    rows = timings(dev, vs)
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, commit=git_commit(), variants=vs,
               copy_GBps=copy_bandwidth(dev, 1 << 30, 5) / 1e9, failures=failures,
               timing="GPU time a call, CUDA-graph replay, weights rotated over 4x L2; sp24 vouched (checked=True)",
               rows=rows)
    path = os.path.join(os.environ.get("OUT", "/tmp"), "sp24_ext.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}; {len(failures)} check failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
