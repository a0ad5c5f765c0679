"""Time a packed_linear kernel alone, in variants: the tensor-core kernel (csrc/cuda/packed_mma.cuh,
the default), with --kernel=span the decode kernels of csrc/cuda/packed_stream.cuh (span path), or
with --kernel=rowblock the row-block kernel of csrc/cuda/packed_rowblock.cuh on block16-rows (beside the
installed package's packed_linear, ``package_us``).

A wheel build takes about 5 minutes on the GPU machine; this builds only the
kernel (benchmarks/lab/packed_lab.cu, one extension a variant, in
parallel: about 90 s) and times each variant against dense F.linear by
CUDA-graph replay (50 calls a graph, best of 5), fp16, span patterns, 1-16
tokens. A variant is a list of extra nvcc flags that the kernel reads: add a
knob to the kernel under #ifdef to try a change, or to leave a step out and
take the difference (name such variants diag*: their results are not checked).
Run from the repository root on the GPU machine, with s3sparse installed
(``bash benchmarks/device_packed.sh build``)::

    PYTHONPATH=$PWD python3 benchmarks/lab/packed_mma_lab.py [NAME=-DFLAG,-DFLAG ...]

The knobs of the register-direct kernel (csrc/cuda/packed_mma.cuh, "Lab knobs"):
S3_LAB_DEPTH=n, S3_LAB_MIN_BLOCKS=n, and the diagnostics S3_LAB_NO_META,
S3_LAB_NO_EXPAND, S3_LAB_NO_MMA, S3_LAB_NO_BARRIER. The set that takes its time apart
(``bash benchmarks/device_packed.sh build lab`` runs it)::

    diag_nometa=-DS3_LAB_NO_META diag_noexpand=-DS3_LAB_NO_EXPAND diag_nomma=-DS3_LAB_NO_MMA \
    diag_bare=-DS3_LAB_NO_EXPAND,-DS3_LAB_NO_MMA diag_nobarrier=-DS3_LAB_NO_BARRIER \
    depth2=-DS3_LAB_DEPTH=2 depth4=-DS3_LAB_DEPTH=4 min1=-DS3_LAB_MIN_BLOCKS=1

The span kernel's knobs (csrc/cuda/packed_stream.cuh, "Lab knobs of the span kernel"):
S3_LAB_SPAN_LOADS=n, S3_LAB_SPAN_WARPS_PER_SM=n, and the diagnostics S3_LAB_SPAN_NO_ROWS,
S3_LAB_SPAN_NO_X, S3_LAB_SPAN_NO_TABLE; of its n:m path (2:4, 4:8, coupled 2:4 at 1-2
tokens), S3_LAB_NM_OFF (the span path instead) and S3_LAB_NM_PIPELINE=U (batches of U
loads, each issued before the previous batch is computed; default 2, 0: a batch of
kSpanLoads loads, then its compute); it is timed at 1, 2, 4 and 8
tokens::

    PYTHONPATH=$PWD python3 benchmarks/lab/packed_mma_lab.py --kernel=span diag_norows=-DS3_LAB_SPAN_NO_ROWS ...

The row-block kernel's knobs (csrc/cuda/packed_rowblock.cuh, top): S3_LAB_ROWBLOCK_MMA_MIN=n (its
tensor-core form from n tokens; 1 times that form at 1-2 tokens too), S3_LAB_ROWBLOCK_MMA_WARPS=n,
S3_LAB_ROWBLOCK_MMA_UNROLL=n, S3_LAB_ROWBLOCK_MMA_PAIRS=0/1 (two runs a step by 16-byte loads; the
default), S3_LAB_ROWBLOCK_TREE=0/1 (the warps' sums by a tree in shared memory, the default, or by shared
atomics), and the diagnostics S3_LAB_ROWBLOCK_DIAG=bits (1 no x loads, 2 no meta loads, 4 no mmas; with
PAIRS only bit 2 acts) and S3_LAB_ROWBLOCK_DIAG_SPLIT=S (a row group over S blocks, each writing its
share alone; needs -DS3_LAB_ROWBLOCK_MMA_PAIRS=0): the grid's cost, wrong results; name such variants
diag*; it is timed at 1, 2, 4, 8 and 16 tokens beside ``package_us``, the installed
package's packed_linear (whatever path that wheel takes)::

    PYTHONPATH=$PWD python3 benchmarks/lab/packed_mma_lab.py --kernel=rowblock u2=-DS3_LAB_ROWBLOCK_MMA_UNROLL=2 ...

LAB_SHAPES="2048x9728,2560x9728,5120x9728" times other shapes (default 2560x9728, 4096x4096, 9728x2560):
block16-rows has one block a 16-row group, so 2048, 2560 and 5120 rows give 128, 160 and 320 blocks for an
H100's 132 SMs. Prints one line a case and writes $OUT/packed_<kernel>_lab.json (else /tmp).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils.cpp_extension import load

REPO = os.getcwd()
sys.path.insert(0, REPO)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_timing import graph_us  # noqa: E402
from s3sparse import ops, patterns  # noqa: E402
from s3sparse.sparse import PackedWeight  # noqa: E402


# kernel -> (nvcc flags of benchmarks/lab/packed_lab.cu, token counts timed)
KERNELS = {"mma": ([], [1, 4, 8, 16]), "span": (["-DS3_LAB_SPAN"], [1, 2, 4, 8]),
           "rowblock": (["-DS3_LAB_ROWBLOCK"], [1, 2, 4, 8, 16])}


def build(kernel: str, name: str, flags: list[str]):
    """The kernel built with `flags` as the extension lab_<kernel>_<name>."""
    directory = f"/tmp/packed_{kernel}_lab/{name}"
    os.makedirs(directory, exist_ok=True)
    cuda_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-gencode=arch=compute_90,code=sm_90",
                  *KERNELS[kernel][0], *flags]
    return load(name=f"lab_{kernel}_{name}", sources=[f"{REPO}/benchmarks/lab/packed_lab.cu"],
                extra_include_paths=[f"{REPO}/csrc"], extra_cuda_cflags=cuda_flags, extra_cflags=["-std=c++20"],
                build_directory=directory, verbose=False)


def main() -> None:
    variants = {"base": []}
    kernel = "mma"
    for arg in sys.argv[1:]:
        if arg.startswith("--kernel="):
            kernel = arg.split("=", 1)[1]
            if kernel not in KERNELS:
                raise SystemExit(f"--kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
            continue
        name, _, flags = arg.partition("=")
        variants[name] = [f for f in flags.split(",") if f]
    t0 = time.time()
    with cf.ThreadPoolExecutor(8) as pool:
        mods = dict(zip(variants, pool.map(lambda kv: build(kernel, *kv), variants.items())))
    print(f"built {len(mods)} variants in {time.time() - t0:.0f} s", flush=True)
    rows = []
    # LAB_SHAPES="2048x9728,2560x9728,5120x9728" picks the shapes (MxK, comma-separated).
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in
              os.environ.get("LAB_SHAPES", "2560x9728,4096x4096,9728x2560").split(",") if sh.strip()]
    for M, K in shapes:
        for pattern in ["block16"] if kernel == "rowblock" else ["24", "48", "coupled24"]:
            W = torch.nn.Parameter(torch.randn(M, K, device="cuda", dtype=torch.float16))
            scope, nnz = patterns.by_name(pattern, W)
            scope.hard_threshold(nnz=nnz)
            p = PackedWeight.from_scope(scope, nnz)
            Wd = W.detach()
            for N in KERNELS[kernel][1]:
                x = torch.randn(N, K, device="cuda", dtype=torch.float16)
                row = dict(shape=f"{M}x{K}", pattern=pattern, tokens=N,
                           dense_us=round(graph_us(lambda: torch.nn.functional.linear(x, Wd)), 1))
                args = (x, p.values, p.meta, p.subsets, p.block_off, p.elem_off, list(p.scope_shape),
                        list(p.scope_stride), p.meta_bits, M, p.row_group)
                if kernel == "rowblock":  # the installed package's packed_linear (the wheel's own path)
                    row["package_us"] = round(graph_us(lambda: ops.packed_linear(*args, None, True)), 1)
                want = torch.nn.functional.linear(x.float(), Wd.float())
                for name, mod in mods.items():
                    got = mod.linear(*args).float()
                    if not name.startswith("diag"):
                        row[f"{name}_rel_err"] = float((got - want).abs().max() / want.abs().max())
                    row[f"{name}_us"] = round(graph_us(lambda: mod.linear(*args)), 1)
                print(row, flush=True)
                rows.append(row)
    commit = os.environ.get("S3SPARSE_GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, commit=commit, kernel=kernel,
               variants=variants, timing="GPU time a call, CUDA-graph replay", rows=rows)
    path = os.path.join(os.environ.get("OUT", "/tmp"), f"packed_{kernel}_lab.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
