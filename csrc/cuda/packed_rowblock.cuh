// The row-block decode kernel of packed_linear: 1 to 8 tokens a launch on
// patterns whose scope is G rows, R apart, sharing one run of B consecutive
// columns, of which one row keeps the run (block16-rows: G = 2, R = 8,
// B = 16; any G <= 4, R <= 16, B = 8 or 16). Format: csrc/packed.h;
// semantics: s3sparse/reference.py.
//
// Why its own kernel: such a weight is, per set of G rows (rows r, r + R, ...),
// one contiguous run of K values, each B-run going to the row its meta field
// names. The general decode path (the stream kernel's group mode) places every
// value through tables and sums rows in shared memory, and runs at 12-22 % of
// the copy bandwidth on an H100 (benchmarks/results/packed-cuda-h100-dfc845b.txt).
// Here a warp streams a set's runs with 16-byte loads (a warp reads 32
// consecutive runs, 1 KiB at B = 16, fp16), takes a run's dot products with
// the tokens' x (16-byte loads from L1/L2: x is a few KiB and read by every
// warp), and adds them into the G rows' fp32 sums in registers, selected by
// the meta field; warp shuffles reduce them at the end. A block owns one row
// group (R sets, G R rows), so bad data or a layout the fast form does not
// take stays inside the block.
//
// The host sees only the integers (scope grid, strides, G, B, row_group); it
// cannot read block_off and elem_off without a sync. So every block checks
// them (G + B entries): block_off[k] = k R K and elem_off[e] = e is the fast
// form; anything else takes the general form in the same block (each element
// placed through block_off / elem_off and checked, shared fp32 sums: slow,
// exact). Bad data is never read or written through: a meta field >= G, an
// offset outside W or a row outside the block's group is skipped, the group's
// rows become NaN and the status word (when there is one) gets the CPU
// kernel's bits.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>

#include "cuda/launch.cuh"
#include "cuda/packed_common.cuh"
#include "packed.h"

namespace s3sparse {
namespace packed_cuda {
namespace rowblock {

#ifndef S3_LAB_ROWBLOCK_CVT_ONCE
#define S3_LAB_ROWBLOCK_CVT_ONCE 0  // lab knob (benchmarks/lab/packed_mma_lab.py --kernel=rowblock); the package: 0
#endif

constexpr int kMaxG = 4;          // rows a set
constexpr int kMaxR = 16;         // sets a row group (a warp each, at least)
constexpr int kMaxThreads = 512;  // a block (so 128 registers a thread: no spills at 8 tokens)
constexpr int kMaxTokens = 8;     // tokens a launch (the caller slices larger batches)
constexpr int kUnroll = 2;        // runs a lane has in flight

struct RowblockPlan {
  int32_t M = 0, K = 0, N = 0;    // W (M, K), x (N, K)
  int32_t G = 0, R = 0;           // rows a set, sets a group (group rows G R)
  int32_t per_row = 0;            // runs (scopes) a set: K / B
  int32_t warps_per_set = 1;
  int bits = 0, per_word = 0;     // meta fields
  uint32_t field_mask = 0;
  int32_t scope_cols = 0;         // scope_shape[1]: scopes a group (R K / B)
};

// 16-byte words of T a run of B elements spans.
template <typename T, int B>
constexpr int run_words() { return B * static_cast<int>(sizeof(T)) / 16; }

// sum_e v[e] x[e] over one run, v and x as 16-byte words of T, in fp32.
template <typename T, int B>
__device__ __forceinline__ float run_dot(const uint4 (&v)[run_words<T, B>()], const uint4* __restrict__ xw) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < run_words<T, B>(); ++w) {
    const uint4 xv = ldg(xw + w);
    const T* a = reinterpret_cast<const T*>(&v[w]);
    const T* b = reinterpret_cast<const T*>(&xv);
#pragma unroll
    for (int e = 0; e < kPer; ++e) s = fmaf(to_float(a[e]), to_float(b[e]), s);
  }
  return s;
}

// The same with the run's values already in fp32 (lab knob S3_LAB_ROWBLOCK_CVT_ONCE: each value
// converted once a run instead of once a token; not yet timed).
template <typename T, int B>
__device__ __forceinline__ float run_dot_f(const float (&vf)[B], const uint4* __restrict__ xw) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < run_words<T, B>(); ++w) {
    const uint4 xv = ldg(xw + w);
    const T* b = reinterpret_cast<const T*>(&xv);
#pragma unroll
    for (int e = 0; e < kPer; ++e) s = fmaf(vf[w * kPer + e], to_float(b[e]), s);
  }
  return s;
}

// The fast form for set q (rows row0 + k R, k < G) by the calling warp share
// (lane l of share h takes runs c = h 32 + l, + 32 warps_per_set, ...): fp32
// sums in registers, reduced over the warp, added into sums[k R + r][t].
// Returns whether a meta field was >= G (that run skipped).
template <typename T, int B, int NT>
__device__ bool fast_set(const RowblockPlan& p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                         const T* __restrict__ x, int64_t q, int r, int share, int lane, float* sums) {
  constexpr int kW = run_words<T, B>();
  float acc[kMaxG][NT];
#pragma unroll
  for (int k = 0; k < kMaxG; ++k)
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[k][t] = 0.f;
  bool bad = false;
  const int64_t s0 = q * p.per_row;  // the set's first scope: its runs are consecutive scopes
  const int step = 32 * p.warps_per_set;
  for (int c0 = share * 32 + lane; c0 < p.per_row; c0 += kUnroll * step) {
    uint4 v[kUnroll][kW];
    uint32_t field[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // the loads first, so kUnroll runs are in flight
      const int c = c0 + u * step;
      if (c < p.per_row) {
        const uint4* src = reinterpret_cast<const uint4*>(values + (s0 + c) * B);
#pragma unroll
        for (int w = 0; w < kW; ++w) v[u][w] = ldg(src + w);
        const int64_t f = s0 + c;
        field[u] = (static_cast<uint32_t>(ldg(meta + f / p.per_word)) >> ((f % p.per_word) * p.bits)) & p.field_mask;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * step;
      if (c >= p.per_row) continue;
      if (field[u] >= static_cast<uint32_t>(p.G)) {
        bad = true;
        continue;
      }
#if S3_LAB_ROWBLOCK_CVT_ONCE
      float vf[B];
#pragma unroll
      for (int w = 0; w < kW; ++w) {
        const T* a = reinterpret_cast<const T*>(&v[u][w]);
#pragma unroll
        for (int e = 0; e < 16 / static_cast<int>(sizeof(T)); ++e) vf[w * (16 / static_cast<int>(sizeof(T))) + e] = to_float(a[e]);
      }
#endif
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t >= p.N) break;
        const uint4* xw = reinterpret_cast<const uint4*>(x + int64_t(t) * p.K + int64_t(c) * B);
#if S3_LAB_ROWBLOCK_CVT_ONCE
        const float d = run_dot_f<T, B>(vf, xw);
#else
        const float d = run_dot<T, B>(v[u], xw);
#endif
#pragma unroll
        for (int k = 0; k < kMaxG; ++k) acc[k][t] += field[u] == static_cast<uint32_t>(k) ? d : 0.f;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kMaxG; ++k) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      float s = acc[k][t];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
      if (lane == 0 && k < p.G && t < p.N) atomicAdd(&sums[(k * p.R + r) * NT + t], s);
    }
  }
  return bad;
}

// The general form for row group grp: every element of every scope of the
// group placed through block_off / elem_off and checked; block-wide.
template <typename T, int B, int NT>
__device__ int general_group(const RowblockPlan& p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                             const int64_t* __restrict__ block_off, const int64_t* __restrict__ elem_off,
                             const T* __restrict__ x, int64_t grp, float* sums) {
  int bad = 0;
  const int64_t rows = int64_t(p.G) * p.R;
  const int64_t row0 = grp * rows;
  const int64_t scopes = int64_t(p.R) * p.per_row;
  const int64_t s_first = grp * scopes;
  for (int64_t i = threadIdx.x; i < scopes * B; i += blockDim.x) {
    const int64_t s = s_first + i / B;
    const int e = static_cast<int>(i % B);
    const uint32_t k = packed_field(meta, s, p.bits, p.per_word);
    if (k >= static_cast<uint32_t>(p.G)) {
      bad |= kPackedBadIndex;
      continue;
    }
    // The scope's origin: grid (M / rows, scope_cols), strides (rows K, B).
    const int64_t j = s % p.scope_cols;
    const int64_t base = (s / p.scope_cols) * rows * p.K + j * B;
    const int64_t f = base + ldg(block_off + k) + ldg(elem_off + e);
    if (f < 0 || f >= int64_t(p.M) * p.K) {
      bad |= kPackedBadOffset;
      continue;
    }
    const int64_t row = f / p.K, col = f % p.K;
    if (row < row0 || row >= row0 + rows) {
      bad |= kPackedBadGroup;
      continue;
    }
    const float v = to_float(values[s * B + e]);
    for (int t = 0; t < NT && t < p.N; ++t)
      atomicAdd(&sums[(row - row0) * NT + t], v * to_float(x[int64_t(t) * p.K + col]));
  }
  return bad;
}

// One block a row group: R sets of warps_per_set warps each.
template <typename T, int B, int NT>
__global__ void __launch_bounds__(kMaxThreads)
packed_rowblock_kernel(const RowblockPlan p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                       const int64_t* __restrict__ block_off, const int64_t* __restrict__ elem_off,
                       const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int* status) {
  __shared__ float sums[kMaxG * kMaxR * NT];
  __shared__ int fast, bad;
  const int64_t grp = blockIdx.x;
  const int rows = p.G * p.R;
  if (threadIdx.x == 0) {
    bool canonical = true;
    for (int k = 0; k < p.G; ++k) canonical &= ldg(block_off + k) == int64_t(k) * p.R * p.K;
    for (int e = 0; e < B; ++e) canonical &= ldg(elem_off + e) == e;
    fast = canonical;
    bad = 0;
  }
  for (int i = threadIdx.x; i < rows * NT; i += blockDim.x) sums[i] = 0.f;
  __syncthreads();
  int my_bad = 0;
  if (fast) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = warp / p.warps_per_set, share = warp % p.warps_per_set;
    if (fast_set<T, B, NT>(p, values, meta, x, grp * p.R + r, r, share, lane, sums)) my_bad = kPackedBadIndex;
  } else {
    my_bad = general_group<T, B, NT>(p, values, meta, block_off, elem_off, x, grp, sums);
  }
  if (my_bad) atomicOr(&bad, my_bad);
  __syncthreads();
  // sums[(k R + r) NT + t] is row grp G R + k R + r of token t.
  for (int i = threadIdx.x; i < rows * p.N; i += blockDim.x) {
    const int t = i / rows, local = i % rows;
    const int64_t row = grp * rows + local;
    float s = sums[local * NT + t];
    if (bias != nullptr) s += to_float(bias[row]);
    y[int64_t(t) * p.M + row] = static_cast<T>(bad ? NAN : s);
  }
  if (threadIdx.x == 0 && bad && status != nullptr) atomicOr(status, bad);
}

}  // namespace rowblock

// Whether S3SPARSE_PACKED_ROWBLOCK=0 turned the kernel off (read once; for
// benchmarks that compare it with the general decode path).
inline bool rowblock_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("S3SPARSE_PACKED_ROWBLOCK");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

// The sets a row group (R) when the geometry's integers are the kernel's (see the top), else 0. Host
// only and cheap: packed_linear asks before it allocates anything for this path.
inline int64_t rowblock_sets(const PackedGeometry& g) {
  using namespace rowblock;
  if (!rowblock_enabled() || g.nnz != 1 || g.ndim != 2 || g.G < 2 || g.G > kMaxG || !(g.B == 8 || g.B == 16))
    return 0;
  if (g.K == 0 || g.M == 0 || g.K % g.B != 0 || (g.scope_shape[1] * g.B) % g.K != 0) return 0;
  const int64_t R = g.scope_shape[1] * g.B / g.K;
  const int64_t rows = g.G * R;
  if (R < 1 || R > kMaxR || g.row_group != rows || g.scope_shape[0] * rows != g.M) return 0;
  if (g.scope_stride[0] != rows * g.K || g.scope_stride[1] != g.B || g.M * g.K >= kInt32Safe) return 0;
  return R;
}

// Launches the row-block kernel for y (N, M) = x2 (N, K) W^T (+ bias), 1 <= N
// <= kMaxTokens, or returns false without launching when the geometry is not
// one it takes (the caller then takes another path). x2 contiguous.
template <typename T>
bool launch_packed_rowblock(const PackedGeometry& g, int64_t N, const at::Tensor& values, const at::Tensor& meta,
                            const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                            const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                            at::Tensor& y, int* status, cudaStream_t stream) {
  using namespace rowblock;
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    const int64_t R = rowblock_sets(g);
    const int64_t rows = g.G * R;
    if (R == 0 || N < 1 || N > kMaxTokens || subsets.has_value() || (g.B * int64_t(sizeof(T))) % 16 != 0) return false;
    if (reinterpret_cast<uintptr_t>(values.const_data_ptr<T>()) % 16 != 0 ||
        reinterpret_cast<uintptr_t>(x2.const_data_ptr<T>()) % 16 != 0 || !x2.is_contiguous())
      return false;
    RowblockPlan p;
    p.M = static_cast<int32_t>(g.M);
    p.K = static_cast<int32_t>(g.K);
    p.N = static_cast<int32_t>(N);
    p.G = static_cast<int32_t>(g.G);
    p.R = static_cast<int32_t>(R);
    p.per_row = static_cast<int32_t>(g.K / g.B);
    p.scope_cols = static_cast<int32_t>(g.scope_shape[1]);
    p.bits = g.meta_bits;
    p.per_word = g.per_word;
    p.field_mask = g.meta_bits >= 32 ? 0xFFFFFFFFu : ((1u << g.meta_bits) - 1u);
    // Warps a set: enough that a lane has a few runs of a long row, at most kMaxThreads a block.
    int64_t wps = 1;
    while (wps * 2 * 32 * R <= kMaxThreads && p.per_row >= wps * 2 * 32 * 4) wps *= 2;
    p.warps_per_set = static_cast<int32_t>(wps);
    const unsigned blocks = static_cast<unsigned>(g.M / rows);
    const int threads = static_cast<int>(R * wps * 32);
    const T* b = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
    auto go = [&](auto kernel) {
      S3_LAUNCH(blocks, threads, 0, stream, kernel)(p, values.const_data_ptr<T>(), meta.const_data_ptr<int32_t>(),
                                                      block_off.const_data_ptr<int64_t>(),
                                                      elem_off.const_data_ptr<int64_t>(), x2.const_data_ptr<T>(), b,
                                                      y.mutable_data_ptr<T>(), status);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const int nt = N == 1 ? 1 : N == 2 ? 2 : N <= 4 ? 4 : 8;
    if (g.B == 16) {
      if constexpr (16 * sizeof(T) % 16 == 0) {
        if (nt == 1) go(packed_rowblock_kernel<T, 16, 1>);
        else if (nt == 2) go(packed_rowblock_kernel<T, 16, 2>);
        else if (nt == 4) go(packed_rowblock_kernel<T, 16, 4>);
        else go(packed_rowblock_kernel<T, 16, 8>);
      }
    } else {
      if constexpr (8 * sizeof(T) % 16 == 0) {
        if (nt == 1) go(packed_rowblock_kernel<T, 8, 1>);
        else if (nt == 2) go(packed_rowblock_kernel<T, 8, 2>);
        else if (nt == 4) go(packed_rowblock_kernel<T, 8, 4>);
        else go(packed_rowblock_kernel<T, 8, 8>);
      }
    }
    return true;
  }
}

}  // namespace packed_cuda
}  // namespace s3sparse
