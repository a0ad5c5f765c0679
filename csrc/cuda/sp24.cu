// sp24_linear on the GPU: y = x Wᵀ + bias for a 2:4 W on the sparse tensor
// cores (mma.sp m16n8k32, fp16 / bf16 in, fp32 accumulation), 1-16 tokens a
// launch (from 17: the block-tiled kernel of sp24_tiled.cuh, one launch). Measured first in benchmarks/lab/sp24_lab.cu
// (1.29-1.65x dense F.linear at 1-8 tokens on an H100; docs/performance.md).
//
// The values are read as stored (each row's kept values in column order): lane
// (g, t) of a warp loads 16 bytes of row g and of row g + 8 an iteration, the 8
// kept values of columns [64 i + 16 t, 64 i + 16 t + 16). A sum over k does not
// depend on the order of k, so the tensor cores get a permuted k: in iteration
// i, step s (two m16n8k32 steps an iteration), virtual group q (4 columns) is
// column group 16 i + 4 (q % 4) + 2 s + q / 4 (sp24_group, csrc/sp24.h). In that
// order a lane's A registers are words of its two loads, its B registers words of
// two 16-byte loads of x (shared with the next lane: x_words), and its metadata one word an iteration
// (sp_meta, built once a weight by s3sparse.sparse.sp24.sp24_meta_words). Unless the caller vouches
// for sp_meta (checked: PackedLinear, for the metadata it built), every word is checked and one that is
// not valid metadata (a group's two columns not p0 < p1) turns its tile's outputs into NaN. Either way
// a corrupt sp_meta never reads out of bounds: it only picks columns inside a group.
//
// A warp computes one 16-row tile over a slice of K (S slices a tile, chosen so
// that the grid holds about kWarpsPerSm warps an SM: the weight streams from
// memory once, and a decode call is bound by how many loads are in flight).
// With 2, 4 or 8 slices a tile (K up to about 4096), all of a tile's slices run in one
// block and the warp of slice 0 sums them from shared memory (lab, H100: the
// 1024-wide layers of a 0.6B model 0.8-1.0x -> 1.0-1.37x dense, 4096x4096 at one
// token 1.65 -> 1.97x; benchmarks/results/sp24-ext-patches-h100.txt). With more,
// the last warp of a tile to finish sums the slices' partial tiles (an fp32
// workspace, in slice order: the result does not depend on which warp finishes
// last). Either way it adds the bias and rounds once. The per-tile counters reset themselves
// (the last warp writes 0), so consecutive launches on a stream share one
// zeroed buffer; a launch under graph capture gets its own (tile_counters).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "cuda/launch.cuh"
#include "cuda/mma.cuh"
#include "cuda/packed_common.cuh"
#include "sp24.h"

namespace s3sparse {
namespace packed_cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kWarpsPerSm = 16;     // lab, H100: 8 an SM 7-49 % slower, 24 slower too
constexpr int64_t kLaunchTokens = 16;  // two tiles of 8 tokens a launch; more: sp24_tiled.cuh
// From this many tokens x is read by 16-byte loads (x_words): at 5-8 tokens 3-20 % faster than 4-byte loads,
// at 1 token 0-3 % slower (they take registers: U = 5 iterations in flight, not 8). Lab, H100:
// benchmarks/results/sp24-ext-variants-h100.txt.
constexpr int64_t kWideXTokens = 5;
// Slices of K a tile are at most ceil(K / (64 kMinIters)): a warp takes about kMinIters iterations or more. On the
// small layers of a 0.6B model (K = 1024) one iteration a warp (S = 16) spent more on the split-K
// reduction than it saved: 4 iterations a warp were 10-28 % faster (8 slower again); larger layers
// keep their S (same lab run).
constexpr int64_t kMinIters = 4;

// 16 bytes streamed (read once: no L1 allocation).
__device__ __forceinline__ uint4 ld_stream16(const uint4* p) {
#if defined(__CUDA_ARCH__)
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
#else
  return *p;
#endif
}

// A partial written by another warp of the grid (L2, not a stale L1 line).
__device__ __forceinline__ float ld_partial(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// Nonzero iff a nibble of the metadata word e is not two columns p0 < p1 (a corrupt sp_meta: the
// instruction's result would be undefined). Per nibble d = (p1 + 4) - p0 lies in 1..7, so no borrow
// crosses nibbles, and p0 < p1 iff d >= 5: bit 2 and one of bits 0, 1.
__device__ __forceinline__ uint32_t bad_nibbles(uint32_t e) {
  const uint32_t p0 = e & 0x33333333u, p1 = (e >> 2) & 0x33333333u;
  const uint32_t d = (p1 | 0x44444444u) - p0;
  return ((d >> 2) & (d | (d >> 1)) & 0x11111111u) ^ 0x11111111u;
}

// x of an iteration (64 columns), for one tile of 8 tokens. Whatever the column order, lanes t = 2p, 2p + 1
// (the two halves of a 4-column group of each step's B registers) need, of token g, the columns
// [16 p, 16 p + 16) and [16 p + 32, 16 p + 48): each loads 16 bytes of each span (the even lane the first
// 8 columns, the odd lane the last 8; one 16-byte load, where 4-byte loads of each word took 4 times as many
// L1 wavefronts, which bound the 16-token calls), then the pair swap the words the other needs.
__device__ __forceinline__ int x_base_wide(int t) { return 16 * (t >> 1) + 8 * (t & 1); }

// The 4-byte form (one tile of tokens: fewer registers, and with one token only the lanes of token 0 load):
// x offset (elements) of a lane's raw x word j (step j / 4) from its base, by column order (csrc/sp24.h):
//  0 (2:4): B register j % 4 itself, virtual k 2 t + 8 (j % 4) of the step (base 16 (t / 2) + 2 (t % 2));
//  2 (coupled 2:4): the same registers, the 4-column groups of each 16 taken in the order 0, 2, 1, 3;
//  1 (4:8, pairs): virtual groups are the even and the odd columns of each 8; words (j % 4) / 2 = 0, 1 are
//    8 bytes of x 32 columns apart (base 16 (t / 2) + 4 (t % 2)), which give the even and the odd
//    registers by byte permutes (x_registers).
template <int kOrder>
__device__ __forceinline__ constexpr int x_offset(int j) {
  const int s = j / 4, r = j % 4;
  if constexpr (kOrder == 1) return 8 * s + (r >= 2 ? 32 : 0) + 2 * (r % 2);
  if constexpr (kOrder == 2) return 4 * s + (r & 1 ? 32 : 0) + (r >= 2 ? 8 : 0);
  return 8 * s + (r & 1 ? 32 : 0) + (r >= 2 ? 4 : 0);
}
template <int kOrder>
__device__ __forceinline__ constexpr int x_base_words(int t) {
  return 16 * (t >> 1) + (kOrder == 1 ? 4 : 2) * (t & 1);
}

// A lane's 8 raw x words of a step pair from its two 16-byte loads (span A: columns [0, 16) of its pair's,
// span B: [32, 48)), by column order (csrc/sp24.h). Words of a span: w0..w7, 2 columns each; the even lane
// loaded w0..w3, the odd w4..w7.
//  0 (2:4) and 2 (coupled): a lane takes word t % 2 of each 4-column group (w0 w2 w4 w6 / w1 w3 w5 w7);
//    in the step order, 0: groups A0 B0 A1 B1 | A2 B2 A3 B3; 2: A0 B0 A2 B2 | A1 B1 A3 B3.
//  1 (4:8): the even lane takes w0 w1 w4 w5, the odd w2 w3 w6 w7; step order A0 A1 B0 B1 | A2 A3 B2 B3 (then
//    byte permutes, x_registers).
template <int kOrder>
__device__ __forceinline__ void x_words(uint32_t (&xb)[8], const uint32_t (&loaded)[8], bool odd) {
  uint32_t mine[2][4];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const uint4 v = make_uint4(loaded[4 * c], loaded[4 * c + 1], loaded[4 * c + 2], loaded[4 * c + 3]);
    uint32_t keep0, keep1, send0, send1;
    if constexpr (kOrder == 1) {
      keep0 = odd ? v.z : v.x, keep1 = odd ? v.w : v.y, send0 = odd ? v.x : v.z, send1 = odd ? v.y : v.w;
    } else {
      keep0 = odd ? v.y : v.x, keep1 = odd ? v.w : v.z, send0 = odd ? v.x : v.y, send1 = odd ? v.z : v.w;
    }
    const uint32_t got0 = __shfl_xor_sync(0xffffffffu, send0, 1), got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
    mine[c][0] = odd ? got0 : keep0, mine[c][1] = odd ? got1 : keep1;
    mine[c][2] = odd ? keep0 : got0, mine[c][3] = odd ? keep1 : got1;
  }
  const uint32_t(&A)[4] = mine[0];
  const uint32_t(&B)[4] = mine[1];
  if constexpr (kOrder == 0) {
    xb[0] = A[0], xb[1] = B[0], xb[2] = A[1], xb[3] = B[1], xb[4] = A[2], xb[5] = B[2], xb[6] = A[3], xb[7] = B[3];
  } else if constexpr (kOrder == 2) {
    xb[0] = A[0], xb[1] = B[0], xb[2] = A[2], xb[3] = B[2], xb[4] = A[1], xb[5] = B[1], xb[6] = A[3], xb[7] = B[3];
  } else {
    xb[0] = A[0], xb[1] = A[1], xb[2] = B[0], xb[3] = B[1], xb[4] = A[2], xb[5] = A[3], xb[6] = B[2], xb[7] = B[3];
  }
}

// A step's 4 B registers from its 4 raw x words (order 1: even columns from the low halves, odd from
// the high halves of the two 4-byte words of each 8-byte span).
template <int kOrder>
__device__ __forceinline__ void x_registers(uint32_t (&b)[4], const uint32_t* raw) {
  if constexpr (kOrder == 1) {
    b[0] = __byte_perm(raw[0], raw[1], 0x5410);
    b[1] = __byte_perm(raw[2], raw[3], 0x5410);
    b[2] = __byte_perm(raw[0], raw[1], 0x7632);
    b[3] = __byte_perm(raw[2], raw[3], 0x7632);
  } else {
    b[0] = raw[0], b[1] = raw[1], b[2] = raw[2], b[3] = raw[3];
  }
}

// A lane's 16 bytes of a row, as the 4 words of virtual groups 4 t' .. 4 t' + 3: as stored for 2:4; for
// orders 1 and 2 the stored quads (kept blocks of 2) [a0 a1 b0 b1] become [a0 b0], [a1 b1].
template <int kOrder>
__device__ __forceinline__ uint4 value_words(uint4 v) {
  if constexpr (kOrder == 0) {
    return v;
  } else {
    return make_uint4(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.x, v.y, 0x7632), __byte_perm(v.z, v.w, 0x5410),
                      __byte_perm(v.z, v.w, 0x7632));
  }
}

// kCheck: a tile any of whose lanes saw a bad metadata word becomes NaN, whole (a lane's word covers rows g and
// g + 8), so corrupt metadata never passes as numbers. A warp collective.
template <bool kCheck, int NT>
__device__ __forceinline__ void poison_bad_tile(float (&d)[NT][4], uint32_t bad) {
  if (kCheck && __ballot_sync(0xffffffffu, bad != 0u) != 0u) {
    const float nan = __uint_as_float(0x7fc00000u);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = nan;
  }
}

// A warp's finished 16-row tile d over a tile of 8 NT tokens from n0 (d[nt]: (row g, token n0 + 8 nt + 2t),
// (g, + 1), (g + 8, n0 + 8 nt + 2t), (g + 8, + 1)). With S > 1 slices of K its partial goes to the workspace
// [S][token tiles][M][8 NT] and the last warp of the tile to arrive (counters [token tiles][tiles]) sums the S
// partials in slice order, so the result does not depend on which warp finishes last, and resets its counter
// for the next launch on the stream; then the bias, one rounding, y. tt / ntt: this token tile / their number
// (the decode kernel has one, from token 0).
template <typename T, int NT>
__device__ __forceinline__ void sp24_finish_tile(float (&d)[NT][4], int tile, int lane, const T* __restrict__ bias,
                                            T* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt, int M,
                                            int N, int S, int slice, int n0, int tt, int ntt) {
  constexpr int BN = 8 * NT;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = tile * 16 + g, r1 = r0 + 8;
  if (S > 1) {
    const auto part = [&](int sl) { return ws + ((static_cast<int64_t>(sl) * ntt + tt) * M + tile * 16) * BN; };
    float* wp = part(slice);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = 8 * nt + 2 * t;
      wp[g * BN + n] = d[nt][0];
      wp[g * BN + n + 1] = d[nt][1];
      wp[(g + 8) * BN + n] = d[nt][2];
      wp[(g + 8) * BN + n + 1] = d[nt][3];
    }
    int* c = cnt + static_cast<int64_t>(tt) * (M / 16) + tile;
    __threadfence();  // (release: this slice's partial before the count)
    __syncwarp();
    int arrived = 0;
    if (lane == 0) {
      arrived = atomicAdd(c, 1);
      __threadfence();  // (acquire: the other slices' partials after the count)
    }
    arrived = __shfl_sync(0xffffffffu, arrived, 0);
    if (arrived != S - 1) return;
    __syncwarp();
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = 0.f;
    for (int sl = 0; sl < S; ++sl) {
      const float* p = part(sl);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = 8 * nt + 2 * t;
        d[nt][0] += ld_partial(p + g * BN + n);
        d[nt][1] += ld_partial(p + g * BN + n + 1);
        d[nt][2] += ld_partial(p + (g + 8) * BN + n);
        d[nt][3] += ld_partial(p + (g + 8) * BN + n + 1);
      }
    }
    if (lane == 0) *c = 0;  // ready for the next launch on this stream
  }
  const float b0 = bias != nullptr ? to_float(bias[r0]) : 0.f;
  const float b1 = bias != nullptr ? to_float(bias[r1]) : 0.f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int na = n0 + 8 * nt + 2 * t, nb = na + 1;
    if (na < N) {
      y[static_cast<int64_t>(na) * M + r0] = static_cast<T>(d[nt][0] + b0);
      y[static_cast<int64_t>(na) * M + r1] = static_cast<T>(d[nt][2] + b1);
    }
    if (nb < N) {
      y[static_cast<int64_t>(nb) * M + r0] = static_cast<T>(d[nt][1] + b0);
      y[static_cast<int64_t>(nb) * M + r1] = static_cast<T>(d[nt][3] + b1);
    }
  }
}

// NT tiles of 8 tokens (N <= 8 NT), U iterations of loads in flight a warp, kCheck: check every
// metadata word (a bad one makes the tile's outputs NaN). (2 blocks an SM: kWarpsPerSm; U = 8 at one
// tile of tokens was 6-18 % faster than 4 on an H100, at 124 registers:
// benchmarks/results/sp24-lab-variants-h100.txt; with the check it spills, so calls that check, checked =
// false, get U = 4, and the byte permutes of orders 1 and 2 U = 5.) kWideX: x by 16-byte loads shared with
// the next lane (x_words), else by 4-byte loads (x_offset).
template <typename T, int NT, int U, bool kCheck, int kOrder, bool kWideX>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kWarpsPerSm / kWarpsPerBlock)
    sp24_linear_kernel(const uint4* __restrict__ vals, const uint32_t* __restrict__ meta, const T* __restrict__ x,
                       const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
                       int M, int K, int N, int S, bool in_block, bool dependent) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int tiles = M / 16;
  int tile, slice;
  bool active = true;
  if (in_block) {  // (the S slices of a tile in one block: S = 2, 4 or 8)
    tile = static_cast<int>(blockIdx.x) * (kWarpsPerBlock / S) + warp / S, slice = warp % S;
    active = tile < tiles;  // (inactive warps still meet the block's barrier)
    if (!active) tile = 0;
  } else {
    const int gw = static_cast<int>(blockIdx.x) * kWarpsPerBlock + warp;
    if (gw >= tiles * S) return;
    tile = gw / S, slice = gw % S;
  }
  const int iters = K / 64;
  const int it0 = static_cast<int>(static_cast<int64_t>(iters) * slice / S);
  const int it1 = active ? static_cast<int>(static_cast<int64_t>(iters) * (slice + 1) / S) : it0;
  const int g = lane >> 2, t = lane & 3;
  const int64_t row_vecs = K / 16;  // 16-byte vectors a row of values
  const uint4* v0 = vals + static_cast<int64_t>(tile * 16 + g) * row_vecs + t;
  const uint4* v1 = v0 + 8 * row_vecs;
  // Launched as a programmatic dependent (`dependent`, launch_as_dependent) the kernel runs from here while the
  // previous kernel ends: the next may start as this one's blocks leave; the first U iterations' values are asked
  // into L2 (a prefetch brings nothing into this kernel, so an unfinished writer of them is harmless); then it
  // waits for the previous kernel before reading anything. Launched plainly, trigger and wait are no-ops.
  grid_dependency_trigger();
  if (dependent) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (it0 + u < it1) {
        prefetch_l2(v0 + 4 * static_cast<int64_t>(it0 + u));
        prefetch_l2(v1 + 4 * static_cast<int64_t>(it0 + u));
      }
    }
  }
  grid_dependency_wait();
  const uint32_t* mp = meta + static_cast<int64_t>(tile) * iters * 32 + lane;
  bool x_on[NT];
  const T* xp[NT];
  float d[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    x_on[nt] = 8 * nt + g < N;
    xp[nt] = x + static_cast<int64_t>(x_on[nt] ? 8 * nt + g : 0) * K + (kWideX ? x_base_wide(t) : x_base_words<kOrder>(t));
    d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = 0.f;
  }
  uint32_t bad = 0;  // kCheck: a corrupt metadata word seen: this warp's partial becomes NaN
  for (int it = it0; it < it1; it += U) {
    uint4 a[U], b[U];
    uint32_t e[U], xr[U][NT][8];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // (all loads of U iterations first: they are what the time is)
      const int i = it + u;
      const bool on = i < it1;
      a[u] = on ? ld_stream16(v0 + 4 * static_cast<int64_t>(i)) : make_uint4(0, 0, 0, 0);
      b[u] = on ? ld_stream16(v1 + 4 * static_cast<int64_t>(i)) : make_uint4(0, 0, 0, 0);
      e[u] = on ? ldg(mp + static_cast<int64_t>(i) * 32) : 0x44444444u;  // (off: valid words, zero values)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if constexpr (kWideX) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const uint4 v = on && x_on[nt] ? ldg(reinterpret_cast<const uint4*>(xp[nt] + 64 * i + 32 * c))
                                           : make_uint4(0, 0, 0, 0);
            xr[u][nt][4 * c] = v.x, xr[u][nt][4 * c + 1] = v.y, xr[u][nt][4 * c + 2] = v.z, xr[u][nt][4 * c + 3] = v.w;
          }
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            xr[u][nt][j] = on && x_on[nt] ? ldg(reinterpret_cast<const uint32_t*>(xp[nt] + 64 * i + x_offset<kOrder>(j))) : 0u;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4 va = value_words<kOrder>(a[u]), vb = value_words<kOrder>(b[u]);
      const uint32_t a0[4] = {va.x, vb.x, va.y, vb.y};
      const uint32_t a1[4] = {va.z, vb.z, va.w, vb.w};
      if constexpr (kCheck) bad |= bad_nibbles(e[u]);  // (here, not beside the loads: no registers to spare there)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t xb[8], b0[4], b1[4];
        if constexpr (kWideX) {
          x_words<kOrder>(xb, xr[u][nt], (t & 1) != 0);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) xb[j] = xr[u][nt][j];
        }
        x_registers<kOrder>(b0, xb);
        x_registers<kOrder>(b1, xb + 4);
        mma_sp_16832<kBf16, 0>(d[nt], a0, b0, e[u]);
        mma_sp_16832<kBf16, 1>(d[nt], a1, b1, e[u]);
      }
    }
  }
  poison_bad_tile<kCheck, NT>(d, bad);
  if (in_block) {
    // The tile's slices sum in shared memory, in slice order, by the warp of slice 0.
    __shared__ float4 red[kWarpsPerBlock][32][NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) red[warp][lane][nt] = make_float4(d[nt][0], d[nt][1], d[nt][2], d[nt][3]);
    __syncthreads();
    if (!active || slice != 0) return;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = 0.f;
    for (int sl = 0; sl < S; ++sl) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float4 p = red[warp + sl][lane][nt];
        d[nt][0] += p.x, d[nt][1] += p.y, d[nt][2] += p.z, d[nt][3] += p.w;
      }
    }
  }
  sp24_finish_tile<T, NT>(d, tile, lane, bias, y, ws, cnt, M, N, in_block ? 1 : S, slice, 0, 0, 1);
}

// Zeroed counters for launches under graph capture: one arena a device, made (and synced, once) by an
// eager launch, handed out in slices that are never handed out again: a graph may be replayed at any
// time, and its launches leave their slice zero. Without an arena, or once it is spent, a captured
// launch gets a fresh zeroed buffer (a memset node in the graph: about a microsecond a launch).
constexpr int64_t kArenaCounters = int64_t(1) << 20;  // 4 MiB: the launches of several decode graphs
struct CounterArena {
  at::Tensor counters;
  int64_t used = 0;
};
std::mutex& arena_mutex() {
  static std::mutex mu;
  return mu;
}
std::map<int, CounterArena>& arenas() {
  static auto* a = new std::map<int, CounterArena>();  // (never destroyed: freeing CUDA memory at exit crashes)
  return *a;
}

// At least `tiles` zeroed int32 counters for a launch on `stream`. Launches on
// one stream run one after another and each leaves its counters zero, so a
// stream keeps one buffer (never shared between streams, which may run at
// once); a captured launch gets counters of its own (above).
at::Tensor tile_counters(int64_t tiles, const at::Tensor& like, cudaStream_t stream) {
  const auto opts = like.options().dtype(at::kInt);
  const int device = static_cast<int>(like.get_device());
  const std::lock_guard<std::mutex> lock(arena_mutex());
  if (stream_capturing(stream)) {
    auto it = arenas().find(device);
    if (it == arenas().end() || it->second.used + tiles > it->second.counters.numel()) return at::zeros({tiles}, opts);
    at::Tensor slice = it->second.counters.narrow(0, it->second.used, tiles);
    it->second.used += tiles;
    return slice;
  }
  if (arenas().find(device) == arenas().end()) {
    arenas()[device].counters = at::zeros({kArenaCounters}, opts);
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));  // (zero before any graph, whatever its stream, uses it)
  }
  static auto* per_stream = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  at::Tensor& c = (*per_stream)[{device, stream}];
  if (!c.defined() || c.numel() < tiles) c = at::zeros({std::max<int64_t>(tiles, 64)}, opts);
  return c;
}

// The operands every sp24 kernel takes, as raw pointers (the workspace and counters null without a
// global split-K epilogue); `launch(kernel, extra...)` passes them in the kernels' order.
template <typename T>
struct Sp24Operands {
  const uint4* values;
  const uint32_t* meta;
  const T* x;
  const T* bias;
  T* y;
  float* ws;
  int* counters;
  int M, K, N, S;

  Sp24Operands(const at::Tensor& xs, const at::Tensor& vals, const at::Tensor& sp_meta,
               const std::optional<at::Tensor>& b, at::Tensor& ys, int64_t m, int64_t k, int64_t s,
               const at::Tensor& workspace, const at::Tensor& cnt)
      : values(reinterpret_cast<const uint4*>(vals.const_data_ptr())),
        meta(reinterpret_cast<const uint32_t*>(sp_meta.const_data_ptr<int32_t>())),
        x(xs.const_data_ptr<T>()),
        bias(b.has_value() ? b->const_data_ptr<T>() : nullptr),
        y(ys.mutable_data_ptr<T>()),
        ws(workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr),
        counters(cnt.defined() ? cnt.mutable_data_ptr<int>() : nullptr),
        M(static_cast<int>(m)),
        K(static_cast<int>(k)),
        N(static_cast<int>(xs.size(0))),
        S(static_cast<int>(s)) {}

  // dependent: a programmatic dependent launch (launch.cuh), for kernels that call grid_dependency_wait first.
  template <typename Kernel, typename... Extra>
  void launch(Kernel kernel, dim3 grid, int threads, int64_t smem, cudaStream_t stream, bool dependent,
              Extra... extra) const {
    launch_maybe_dependent(kernel, grid, dim3(static_cast<unsigned>(threads)), smem, stream, dependent, values, meta,
                           x, bias, y, ws, counters, M, K, N, S, extra...);
  }
};

template <typename T>
void launch_sp24(const at::Tensor& xs, const at::Tensor& values, const at::Tensor& sp_meta,
                 const std::optional<at::Tensor>& bias, at::Tensor& ys, int64_t M, int64_t K, bool checked,
                 int64_t order, cudaStream_t stream) {
  const int64_t n = xs.size(0);
  const int nt = n <= 8 ? 1 : 2;
  const int64_t tiles = M / 16, iters = K / 64;
  const int64_t want = std::llround(static_cast<double>(multiprocessors()) * kWarpsPerSm / static_cast<double>(tiles));
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>(want, (iters + kMinIters - 1) / kMinIters));
  // 2, 4 or 8 slices: all of a tile's in one block, summed in shared memory: no workspace, no counters,
  // no fences. Other counts keep the global split-K epilogue (rounding 3 up to 4 on 9728x2560 measured
  // 1.29-1.16x dense against 1.41-1.30x at 1-16 tokens on an H100: packed-sp24-on-h100-5934764.txt).
  const bool in_block = S > 1 && S <= kWarpsPerBlock && kWarpsPerBlock % S == 0;
  const bool global = S > 1 && !in_block;
  at::Tensor ws = global ? at::empty({S, M, 8 * nt}, values.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor cnt = global ? tile_counters(tiles, values, stream) : at::Tensor();
  const int64_t blocks_wide = in_block ? (tiles + kWarpsPerBlock / S - 1) / (kWarpsPerBlock / S)
                                       : (tiles * S + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int blocks = static_cast<int>(blocks_wide);
  const Sp24Operands<T> args(xs, values, sp_meta, bias, ys, M, K, S, ws, cnt);
  const auto launch = [&](auto kernel) {
    const bool dependent = launch_as_dependent();
    args.launch(kernel, dim3(blocks), kWarpsPerBlock * 32, 0, stream, dependent, in_block, dependent);
  };
  const auto by_tokens = [&](auto order_tag) {
    constexpr int O = decltype(order_tag)::value;
    if (nt == 1) {
      // (the byte permutes of orders 1 and 2 take registers: from 6 iterations in flight they spill)
      if (n < kWideXTokens) {
        checked ? launch(sp24_linear_kernel<T, 1, O == 0 ? 8 : 5, false, O, false>)
                : launch(sp24_linear_kernel<T, 1, 4, true, O, false>);
      } else {
        checked ? launch(sp24_linear_kernel<T, 1, 5, false, O, true>) : launch(sp24_linear_kernel<T, 1, 4, true, O, true>);
      }
    } else {
      checked ? launch(sp24_linear_kernel<T, 2, 2, false, O, true>) : launch(sp24_linear_kernel<T, 2, 2, true, O, true>);
    }
  };
  if (order == 0) {
    by_tokens(std::integral_constant<int, 0>{});
  } else if (order == 1) {
    by_tokens(std::integral_constant<int, 1>{});
  } else {
    by_tokens(std::integral_constant<int, 2>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace packed_cuda
}  // namespace s3sparse

#include "cuda/sp24_tiled.cuh"

namespace s3sparse {
namespace packed_cuda {
namespace {

at::Tensor sp24_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& sp_meta,
                            int64_t out_features, const std::optional<at::Tensor>& bias_arg, bool checked,
                            int64_t column_order) {
  constexpr const char* op = "s3sparse.sp24_linear";
  const Sp24Geometry g = check_sp24_linear(x, values, sp_meta, out_features, bias_arg, column_order, op);
  const std::optional<at::Tensor> bias = contiguous_bias(bias_arg);  // (the kernels index bias[row])
  S3_CHECK_VALUE(g.M * g.K / 2 < kInt32Safe && g.K < kInt32Safe, op, ": a weight of ", g.M, "x", g.K,
                 " is beyond this kernel's 32-bit indexing; use packed_linear");
  S3_CHECK_VALUE(reinterpret_cast<uintptr_t>(values.const_data_ptr()) % 16 == 0, op,
                 ": `values` must start on a 16-byte boundary (the kernel reads 16-byte vectors); pass "
                 "values.clone()");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(g.M);
  at::Tensor y = at::empty({g.N, g.M}, x.options());
  if (g.N == 0) return y.view(out_sizes);
  at::Tensor x2 = x.reshape({g.N, g.K}).contiguous();
  if (reinterpret_cast<uintptr_t>(x2.const_data_ptr()) % 16 != 0) x2 = x2.clone();  // (16-byte loads of x)
  const bool half = x.scalar_type() == at::kHalf;
  if (g.N > kLaunchTokens) {  // (x staged in shared memory, one launch: sp24_tiled.cuh)
    half ? launch_sp24_tiled<at::Half>(x2, values, sp_meta, bias, y, g.M, g.K, checked, column_order, stream)
         : launch_sp24_tiled<at::BFloat16>(x2, values, sp_meta, bias, y, g.M, g.K, checked, column_order, stream);
  } else {
    half ? launch_sp24<at::Half>(x2, values, sp_meta, bias, y, g.M, g.K, checked, column_order, stream)
         : launch_sp24<at::BFloat16>(x2, values, sp_meta, bias, y, g.M, g.K, checked, column_order, stream);
  }
  return y.view(out_sizes);
}

}  // namespace
}  // namespace packed_cuda

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) { m.impl("sp24_linear", &packed_cuda::sp24_linear_cuda); }

}  // namespace s3sparse
