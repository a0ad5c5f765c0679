"""How fast can a kernel read packed values in a given order? Load-only kernels.

The packed decode kernels read the values of a 2560 x 9728 2:4 layer (2560 rows
of 9728 bytes, 24.9 MB in fp16) in different orders; this times kernels that
only load those bytes in each order (and fold them with XOR so the loads stay),
against a flat grid-stride read and dense ``F.linear`` of the same layer, by
CUDA-graph replay. It tells a kernel's access pattern apart from its arithmetic:

- ``flat``: the buffer as one array of 16-byte words, grid-stride, 4 in flight;
- ``rowwarp``: a warp a row, lanes striding over the row's 16-byte chunks
  (the stream kernel's order), U chunks in flight a lane;
- ``tile16xW``: a warp step of 16 rows x (64 W) bytes, lane (g, t) loading
  rows g and g + 8 at W consecutive chunks (the tensor-core kernel's order
  for W = 1), D steps in flight;
- ``colown``: lanes own fixed 16-byte columns and walk down the rows, a warp
  a 512-byte column band, U rows in flight.

Run on the GPU machine: ``python3 benchmarks/lab/load_patterns.py`` (about 60 s
of build); prints one line a case, writes $OUT/load_patterns.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_timing import graph_us  # noqa: E402

CUDA = r"""
#include <torch/extension.h>
#include <cuda_runtime.h>
#include <ATen/cuda/CUDAContext.h>

__device__ __forceinline__ uint4 ld(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

__global__ void flat_kernel(const uint4* __restrict__ a, int64_t n, uint32_t* out) {
  uint32_t acc = 0;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 v0 = ld(a + i), v1 = ld(a + i + stride), v2 = ld(a + i + 2 * stride), v3 = ld(a + i + 3 * stride);
    acc ^= fold(v0) ^ fold(v1) ^ fold(v2) ^ fold(v3);
  }
  for (; i < n; i += stride) acc ^= fold(ld(a + i));
  out[(int64_t)blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// rows x chunks (16-byte) buffer
template <int U>
__global__ void rowwarp_kernel(const uint4* __restrict__ a, int rows, int chunks, uint32_t* out) {
  const int lane = threadIdx.x & 31;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nwarps = (gridDim.x * blockDim.x) >> 5;
  uint32_t acc = 0;
  for (int r = warp; r < rows; r += nwarps) {
    const uint4* row = a + (int64_t)r * chunks;
    for (int c = lane; c < chunks; c += 32 * U) {
      uint4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) v[u] = (c + 32 * u < chunks) ? ld(row + c + 32 * u) : uint4{0, 0, 0, 0};
#pragma unroll
      for (int u = 0; u < U; ++u) acc ^= fold(v[u]);
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// warp step: 16 rows x (4 W) chunks; lane (g, t): rows g, g+8, chunks t W .. t W + W - 1.
// Tiles of 16 rows; the warps of the grid take (tile, K-run) pairs: each warp a tile's
// K split into `splits` runs.
template <int W, int D>
__global__ void tile_kernel(const uint4* __restrict__ a, int rows, int chunks, int splits, uint32_t* out) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nwarps = (gridDim.x * blockDim.x) >> 5;
  const int step_chunks = 4 * W;
  const int steps = (chunks + step_chunks - 1) / step_chunks;
  const int per = (steps + splits - 1) / splits;
  const int units = rows / 16 * splits;
  uint32_t acc = 0;
  for (int u0 = warp; u0 < units; u0 += nwarps) {
    const int tile = u0 / splits, sp = u0 % splits;
    const int s0 = sp * per, s1 = min(steps, s0 + per);
    const uint4* r0 = a + (int64_t)(tile * 16 + g) * chunks;
    const uint4* r1 = r0 + (int64_t)8 * chunks;
    for (int s = s0; s < s1; s += D) {
      uint4 v[D][2][W];
#pragma unroll
      for (int d = 0; d < D; ++d)
#pragma unroll
        for (int w = 0; w < W; ++w) {
          const int c = (s + d) * step_chunks + t * W + w;
          const bool ok = s + d < s1 && c < chunks;
          v[d][0][w] = ok ? ld(r0 + c) : uint4{0, 0, 0, 0};
          v[d][1][w] = ok ? ld(r1 + c) : uint4{0, 0, 0, 0};
        }
#pragma unroll
      for (int d = 0; d < D; ++d)
#pragma unroll
        for (int w = 0; w < W; ++w) acc ^= fold(v[d][0][w]) ^ fold(v[d][1][w]);
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// lanes own fixed chunk columns; a warp owns a band of 32 chunks and a range of rows.
template <int U>
__global__ void colown_kernel(const uint4* __restrict__ a, int rows, int chunks, int row_split, uint32_t* out) {
  const int lane = threadIdx.x & 31;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nwarps = (gridDim.x * blockDim.x) >> 5;
  const int bands = (chunks + 31) / 32;
  const int per = (rows + row_split - 1) / row_split;
  uint32_t acc = 0;
  for (int u0 = warp; u0 < bands * row_split; u0 += nwarps) {
    const int band = u0 % bands, rs = u0 / bands;
    const int c = band * 32 + lane;
    const int r0 = rs * per, r1 = min(rows, r0 + per);
    if (c < chunks) {
      for (int r = r0; r < r1; r += U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = r + u < r1 ? ld(a + (int64_t)(r + u) * chunks + c) : uint4{0, 0, 0, 0};
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= fold(v[u]);
      }
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

torch::Tensor run(torch::Tensor buf, torch::Tensor out, std::string kind, int64_t rows, int64_t chunks,
                  int64_t blocks, int64_t threads, int64_t a1, int64_t a2, int64_t a3) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const uint4* a = reinterpret_cast<const uint4*>(buf.data_ptr());
  uint32_t* o = reinterpret_cast<uint32_t*>(out.data_ptr());
  if (kind == "flat") {
    flat_kernel<<<blocks, threads, 0, stream>>>(a, rows * chunks, o);
  } else if (kind == "rowwarp") {
    if (a1 == 1) rowwarp_kernel<1><<<blocks, threads, 0, stream>>>(a, rows, chunks, o);
    else if (a1 == 2) rowwarp_kernel<2><<<blocks, threads, 0, stream>>>(a, rows, chunks, o);
    else if (a1 == 4) rowwarp_kernel<4><<<blocks, threads, 0, stream>>>(a, rows, chunks, o);
    else rowwarp_kernel<8><<<blocks, threads, 0, stream>>>(a, rows, chunks, o);
  } else if (kind == "tile") {
#define TILE(W, D) if (a1 == W && a2 == D) tile_kernel<W, D><<<blocks, threads, 0, stream>>>(a, rows, chunks, a3, o);
    TILE(1, 1) TILE(1, 2) TILE(1, 3) TILE(1, 4) TILE(2, 1) TILE(2, 2) TILE(4, 1) TILE(4, 2)
  } else if (kind == "colown") {
    if (a1 == 2) colown_kernel<2><<<blocks, threads, 0, stream>>>(a, rows, chunks, a2, o);
    else if (a1 == 4) colown_kernel<4><<<blocks, threads, 0, stream>>>(a, rows, chunks, a2, o);
    else colown_kernel<8><<<blocks, threads, 0, stream>>>(a, rows, chunks, a2, o);
  }
  return out;
}
"""

CPP = ("torch::Tensor run(torch::Tensor buf, torch::Tensor out, std::string kind, int64_t rows, int64_t chunks,"
       " int64_t blocks, int64_t threads, int64_t a1, int64_t a2, int64_t a3);")


def main() -> None:
    mod = load_inline("load_patterns", cpp_sources=CPP, cuda_sources=CUDA, functions=["run"],
                      extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"], verbose=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows_out = []
    for M, Kb in [(2560, 9728), (9728, 2560), (4096, 4096)]:  # rows, bytes a row (2:4 fp16 of M x K)
        chunks = Kb // 16
        buf = torch.randint(0, 2**31, (M * Kb // 4,), dtype=torch.int32, device="cuda")
        out = torch.zeros(sms * 2048, dtype=torch.int32, device="cuda")
        Wd = torch.randn(M, Kb, device="cuda", dtype=torch.float16)  # dense of the same M x K
        x = torch.randn(1, Kb, device="cuda", dtype=torch.float16)
        dense = graph_us(lambda: torch.nn.functional.linear(x, Wd))
        copy_src = torch.empty(M * Kb // 2, dtype=torch.float16, device="cuda")
        copy_dst = torch.empty_like(copy_src)
        copy = graph_us(lambda: copy_dst.copy_(copy_src))
        mb = M * Kb / 1e6
        print(f"{M}x{Kb}B ({mb:.1f} MB): dense F.linear of {M}x{Kb} fp16 {dense:.1f} us "
              f"({2 * mb / dense:.2f} TB/s), copy of {mb:.1f} MB {copy:.1f} us ({2 * mb / copy:.2f} TB/s r+w)")
        cases = []
        for bps in [1, 2, 4, 8]:
            for threads in [256, 512]:
                if bps * threads > 2048:
                    continue
                cases.append(("flat", bps, threads, 0, 0, 0))
                for u in [1, 2, 4, 8]:
                    cases.append(("rowwarp", bps, threads, u, 0, 0))
                for w, d in [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (4, 1), (4, 2)]:
                    for splits in [1, 8]:
                        cases.append(("tile", bps, threads, w, d, splits))
                for u in [2, 4, 8]:
                    for rs in [1, 4, 16]:
                        cases.append(("colown", bps, threads, u, rs, 0))
        for kind, bps, threads, a1, a2, a3 in cases:
            us = graph_us(lambda: mod.run(buf, out, kind, M, chunks, bps * sms, threads, a1, a2, a3))
            row = dict(shape=f"{M}x{Kb}B", kind=kind, blocks_per_sm=bps, threads=threads, a1=a1, a2=a2, a3=a3,
                       us=round(us, 2), tb_s=round(mb / us, 3), dense_us=round(dense, 2), copy_us=round(copy, 2))
            rows_out.append(row)
        best = {}
        for r in rows_out:
            if r["shape"] != f"{M}x{Kb}B":
                continue
            k = r["kind"]
            if k not in best or r["us"] < best[k]["us"]:
                best[k] = r
        for k, r in best.items():
            print(f"  best {k:8s} {r['us']:6.2f} us {r['tb_s']:.2f} TB/s  (bps {r['blocks_per_sm']}, threads "
                  f"{r['threads']}, a {r['a1']},{r['a2']},{r['a3']})", flush=True)
        for r in rows_out:
            if r["shape"] == f"{M}x{Kb}B" and r["kind"] in ("tile",) and r["blocks_per_sm"] == 2 and r["threads"] == 256:
                print(f"  tile W{r['a1']} D{r['a2']} splits {r['a3']}: {r['us']:.2f} us")
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, timing="CUDA-graph replay, 50 calls",
               rows=rows_out)
    path = os.path.join(os.environ.get("OUT", "/tmp"), "load_patterns.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
