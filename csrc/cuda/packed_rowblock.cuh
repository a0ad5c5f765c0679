// The row-block decode kernel of packed_linear: 1 to 16 tokens a launch on
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
// the meta field; warp shuffles reduce them at the end (the FMA form: 1-2
// tokens, and fp32 or runs of 8 up to 8 tokens). From 3 tokens, 16-bit values in
// runs of 16 take the tensor-core form (mma_group): the same stream, but the dot
// products of 8 sets x 16 tokens an mma, so the time no longer grows with the
// tokens (H100, 2560x9728: 26-32 us at 4-16 tokens against the FMA form's 31-54
// at 4-8; benchmarks/results/packed-rowblock-lab-mma-h100-*). A block owns one
// row group (R sets, G R rows), so bad data or a layout the fast form does not
// take stays inside the block. The tensor-core form's warps' sums meet in a
// fixed order (a tree in shared memory: the same bits every call); the FMA
// form's (a set's warps) and the general form's by shared atomic adds, so
// there, with more than two addends a sum, the last bits of a result may
// differ from call to call.
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>

#include "cuda/launch.cuh"
#include "cuda/mma.cuh"
#include "cuda/packed_common.cuh"
#include "packed.h"

namespace s3sparse {
namespace packed_cuda {
namespace rowblock {

// Lab knobs (benchmarks/lab/packed_mma_lab.py --kernel=rowblock); the package takes the defaults.
#ifndef S3_LAB_ROWBLOCK_MMA_MIN
#define S3_LAB_ROWBLOCK_MMA_MIN 3  // the tensor-core form from this many tokens
#endif
#ifndef S3_LAB_ROWBLOCK_MMA_WARPS
#define S3_LAB_ROWBLOCK_MMA_WARPS 16  // its warps a block, at most
#endif
#ifndef S3_LAB_ROWBLOCK_MMA_PAIRS  // two runs a step by 16-byte loads and a lane exchange (H100, 2048-5120 x
#define S3_LAB_ROWBLOCK_MMA_PAIRS 1   // 9728, 4-16 tokens: 2-10 % faster than one run a step by 8-byte loads)
#endif
#ifndef S3_LAB_ROWBLOCK_DIAG  // the tensor-core form with steps left out (wrong results; lab variants
#define S3_LAB_ROWBLOCK_DIAG 0   // named diag*): bit 1 no x loads, 2 no meta loads, 4 no mmas (PAIRS: bit 2 only)
#endif
#ifdef S3_LAB_ROWBLOCK_MMA_STAGED
#error "S3_LAB_ROWBLOCK_MMA_STAGED: the staged form was removed (timed slower; docs/performance.md, thirteenth session)"
#endif
#ifndef S3_LAB_ROWBLOCK_DIAG_SPLIT  // the tensor-core form's row group split over this many blocks by run
#define S3_LAB_ROWBLOCK_DIAG_SPLIT 1   // columns, each writing its part alone (wrong results; the grid's cost)
#endif
#ifndef S3_LAB_ROWBLOCK_TREE  // the tensor-core form's warps summed by a tree in shared memory (0: shared
#define S3_LAB_ROWBLOCK_TREE 1   // fp32 atomics, the form before 2026-12-07)
#endif
#ifndef S3_LAB_ROWBLOCK_MMA_UNROLL  // its steps a warp has in flight
#define S3_LAB_ROWBLOCK_MMA_UNROLL (S3_LAB_ROWBLOCK_MMA_PAIRS ? 2 : 4)
#endif

constexpr int kMaxG = 4;          // rows a set
constexpr int kMaxR = 16;         // sets a row group (a warp each, at least)
constexpr int kMaxThreads = 512;  // a block (so 128 registers a thread: no spills at 8 tokens)
constexpr int kMaxTokens = 8;     // tokens a launch of the FMA form (the caller slices larger batches)
constexpr int kMmaTokens = 16;    // of the tensor-core form (16-bit values, B = 16)
constexpr int kUnroll = 2;        // runs a lane has in flight
static_assert(32 * S3_LAB_ROWBLOCK_MMA_WARPS <= kMaxThreads, "S3_LAB_ROWBLOCK_MMA_WARPS: at most kMaxThreads / 32");
static_assert(S3_LAB_ROWBLOCK_DIAG_SPLIT >= 1 && (S3_LAB_ROWBLOCK_DIAG_SPLIT == 1 || !S3_LAB_ROWBLOCK_MMA_PAIRS),
              "S3_LAB_ROWBLOCK_DIAG_SPLIT: >= 1, and not with PAIRS (whose loop does not split)");

struct RowblockPlan {
  int32_t M = 0, K = 0, N = 0;    // W (M, K), x (N, K)
  int32_t G = 0, R = 0;           // rows a set, sets a group (group rows G R)
  int32_t per_row = 0;            // runs (scopes) a set: K / B
  int32_t warps_per_set = 1;
  int bits = 0, per_word = 0;     // meta fields
  uint32_t field_mask = 0;
  int32_t scope_cols = 0;         // scope_shape[1]: scopes a group (R K / B)
  FastDivmod word_div;            // by per_word (the tensor-core form's field reads)
};

// Meta field s (< 2^30) for the tensor-core forms: its word by FastDivmod, not a 64-bit division.
__device__ __forceinline__ uint32_t mma_field(const RowblockPlan& p, const int32_t* __restrict__ meta, uint32_t s) {
  const uint32_t word = p.word_div.div(s);
  const int shift = static_cast<int>(s - word * p.per_word) * p.bits;
  if constexpr ((S3_LAB_ROWBLOCK_DIAG & 2) != 0) return (word >> shift) & p.field_mask;  // (no load)
  return (static_cast<uint32_t>(ldg(meta + word)) >> shift) & p.field_mask;
}

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
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t >= p.N) break;
        const uint4* xw = reinterpret_cast<const uint4*>(x + int64_t(t) * p.K + int64_t(c) * B);
        const float d = run_dot<T, B>(v[u], xw);
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

// A tensor-core form's sums into the block's: acc[k][i] = D_k[g][2t], D_k[g][2t + 1], D_k[g + 8][2t],
// D_k[g + 8][2t + 1], i.e. token g / g + 8 of set 8 i + 2t (+ 1), row k; sums[(k R + r) 16 + token].
// The warps' sums meet in a fixed order, a tree over the warps through shared memory (the upper half
// of the warps stores, the lower half adds, ceil(log2(nwarps)) rounds), then warp 0 stores the totals: the
// result does not depend on which warp finishes first, and no shared fp32 atomics, which are
// compare-and-swap loops on sm_90 and took 16-way contention here (every warp adds into the same
// 16 x G R sums). All the block's threads call it (it has barriers).
template <int TILES>
__device__ __forceinline__ void reduce_mma_sums(const RowblockPlan& p, float (&acc)[kMaxG][TILES][4], int warp,
                                                int nwarps, int lane, float* sums) {
#if S3_LAB_ROWBLOCK_TREE
  __shared__ float stage[kMaxThreads / 64][kMaxG * TILES * 4][32];  // [warp - half][fragment][lane]
  // op(this lane's fragment (k, i, j), its slot (k TILES + i) 4 + j) for every row k < G.
  auto each_fragment = [&](auto&& op) {
#pragma unroll
    for (int k = 0; k < kMaxG; ++k) {
      if (k >= p.G) break;
#pragma unroll
      for (int i = 0; i < TILES; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) op(acc[k][i][j], (k * TILES + i) * 4 + j);
    }
  };
  int span = 1;
  while (span < nwarps) span *= 2;
  for (int half = span / 2; half >= 1; half /= 2) {
    if (warp >= half && warp < nwarps)  // (warp < 2 half: the warps above were added last round)
      each_fragment([&](float& a, int f) { stage[warp - half][f][lane] = a; });
    __syncthreads();
    if (warp < half && warp + half < nwarps) each_fragment([&](float& a, int f) { a += stage[warp][f][lane]; });
    __syncthreads();
    nwarps = half;
  }
  if (warp != 0) return;
#endif
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int k = 0; k < kMaxG; ++k) {
    if (k >= p.G) break;
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = 8 * i + 2 * t + (j & 1), token = g + 8 * (j >> 1);
        if (r < p.R && token < p.N) {
          float* sum = &sums[(k * p.R + r) * 16 + token];
          if constexpr (S3_LAB_ROWBLOCK_TREE) *sum = acc[k][i][j];  // (each (k, r, token) once, from warp 0)
          else atomicAdd(sum, acc[k][i][j]);
        }
      }
    }
  }
}

// The tensor-core form of the fast form (16-bit T, B = 16, up to 16 tokens): the
// warp takes one run column c of 8 sets a step as an mma, D (tokens x 8 sets) +=
// A (x: 16 tokens x the run's 16 columns) B (the 8 sets' runs at c), once for each
// row k of the sets with B masked to the sets whose run c goes to row k, so D_k
// sums row k's dot products on the tensor cores (the per-token FMAs of fast_set
// are what made its time grow with the tokens). A run's 16 columns enter the mma
// in the order that gives lane (g, t) elements 4t..4t+3 as its k = 2t, 2t+1,
// 2t+8, 2t+9 (mma.cuh's layouts). The default (PAIRS) takes two run columns a
// step, 2w and 2w + 1 for warp w of nwarps, then 2w + 2 nwarps, ...: a 16-byte load
// a lane and one lane exchange give each lane its elements of both runs (below);
// PAIRS = 0 takes one column a step (w, w + nwarps, ...) by one 8-byte load of the
// set's run and one of each token's x. The warps' sums meet in sums[(k R + r) 16 +
// token] (reduce_mma_sums). Returns whether a meta field was >= G.
template <typename T, int TILES>
__device__ bool mma_group(const RowblockPlan& p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                          const T* __restrict__ x, int64_t grp, int warp, int nwarps, int lane, float* sums) {
  constexpr bool kBF16 = std::is_same_v<T, at::BFloat16>;
  constexpr int kU = S3_LAB_ROWBLOCK_MMA_UNROLL;
  const int g = lane / 4, t = lane % 4;
  float acc[kMaxG][TILES][4];
#pragma unroll
  for (int k = 0; k < kMaxG; ++k)
#pragma unroll
    for (int i = 0; i < TILES; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[k][i][j] = 0.f;
  // A's rows g and g + 8: tokens g and g + 8 (zero past N). B's column g of tile i: set 8 i + g (zero past R).
  const bool lo = g < p.N, hi = g + 8 < p.N;
  const T* x_lo = x + int64_t(lo ? g : 0) * p.K + 4 * t;
  const T* x_hi = x + int64_t(hi ? g + 8 : 0) * p.K + 4 * t;
  int64_t scope0[TILES];
  bool has_set[TILES];
#pragma unroll
  for (int i = 0; i < TILES; ++i) {
    has_set[i] = 8 * i + g < p.R;
    scope0[i] = (grp * p.R + (has_set[i] ? 8 * i + g : 0)) * p.per_row;
  }
  bool bad = false;
#if S3_LAB_ROWBLOCK_MMA_PAIRS
  // Two run columns (c, c + 1) a step: lane (g, t) loads 16 bytes, half t & 1 of run c + (t >> 1), so
  // a set's 4 lanes read 64 contiguous bytes; one exchange with lane t ^ 2 gives every lane 4 elements
  // of each run, elements o..o+3 with o = 8 (t & 1) + 4 (t >> 1) (the same offsets for x).
  const int o = 8 * (t & 1) + 4 * (t >> 1);
  const bool first = t < 2;
  for (int c0 = 2 * warp; c0 < p.per_row; c0 += 2 * kU * nwarps) {
    uint2 xa[kU][2][2];  // [step][run][token lo / hi]
    uint4 w[kU][TILES];
    uint32_t field[kU][TILES][2];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int c = c0 + 2 * u * nwarps;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool live = c + h < p.per_row;
        xa[u][h][0] = live && lo ? ldg(reinterpret_cast<const uint2*>(x_lo - 4 * t + int64_t(c + h) * 16 + o)) : make_uint2(0, 0);
        xa[u][h][1] = live && hi ? ldg(reinterpret_cast<const uint2*>(x_hi - 4 * t + int64_t(c + h) * 16 + o)) : make_uint2(0, 0);
      }
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        w[u][i] = make_uint4(0, 0, 0, 0);
        field[u][i][0] = field[u][i][1] = 0;
        if (has_set[i] && c < p.per_row) {
          const int64_t s = scope0[i] + c;
          if (c + (t >> 1) < p.per_row)
            w[u][i] = ldg(reinterpret_cast<const uint4*>(values + (s + (t >> 1)) * 16 + 8 * (t & 1)));
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (c + h >= p.per_row) break;
            field[u][i][h] = mma_field(p, meta, static_cast<uint32_t>(s + h));
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int c = c0 + 2 * u * nwarps;
      if (c >= p.per_row) break;  // (warp-uniform)
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        const uint32_t send0 = first ? w[u][i].z : w[u][i].x, send1 = first ? w[u][i].w : w[u][i].y;
        const uint32_t got0 = __shfl_xor_sync(0xFFFFFFFFu, send0, 2), got1 = __shfl_xor_sync(0xFFFFFFFFu, send1, 2);
        const uint2 run_w[2] = {first ? make_uint2(w[u][i].x, w[u][i].y) : make_uint2(got0, got1),
                                first ? make_uint2(got0, got1) : make_uint2(w[u][i].z, w[u][i].w)};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (c + h >= p.per_row) break;  // (warp-uniform)
          const uint32_t a[4] = {xa[u][h][0].x, xa[u][h][1].x, xa[u][h][0].y, xa[u][h][1].y};
          bad |= field[u][i][h] >= static_cast<uint32_t>(p.G);
#pragma unroll
          for (int k = 0; k < kMaxG; ++k) {
            if (k >= p.G) break;  // (uniform)
            const bool mine = field[u][i][h] == static_cast<uint32_t>(k);
            const uint32_t b[2] = {mine ? run_w[h].x : 0u, mine ? run_w[h].y : 0u};
            mma_16816<kBF16>(acc[k][i], a, b);
          }
        }
      }
    }
  }
#else
  // (DIAG_SPLIT: this block's share of the run columns, [c_begin, c_end); else all of them)
  constexpr int kSplit = S3_LAB_ROWBLOCK_DIAG_SPLIT;
  const int part = kSplit > 1 ? static_cast<int>(blockIdx.x % kSplit) : 0;
  const int c_begin = kSplit > 1 ? p.per_row * part / kSplit : 0;
  const int c_end = kSplit > 1 ? p.per_row * (part + 1) / kSplit : p.per_row;
  for (int c0 = c_begin + warp; c0 < c_end; c0 += kU * nwarps) {
    uint2 xa[kU][2], w[kU][TILES];
    uint32_t field[kU][TILES];
#pragma unroll
    for (int u = 0; u < kU; ++u) {  // the loads first, so kU steps are in flight
      const int c = c0 + u * nwarps;
      const bool live = c < c_end;
      xa[u][0] = live && lo ? ldg(reinterpret_cast<const uint2*>(x_lo + int64_t(c) * 16)) : make_uint2(0, 0);
      xa[u][1] = live && hi ? ldg(reinterpret_cast<const uint2*>(x_hi + int64_t(c) * 16)) : make_uint2(0, 0);
      if constexpr ((S3_LAB_ROWBLOCK_DIAG & 1) != 0) xa[u][0] = xa[u][1] = make_uint2(c, c);
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        w[u][i] = make_uint2(0, 0);
        field[u][i] = 0;
        if (live && has_set[i]) {
          const int64_t s = scope0[i] + c;
          w[u][i] = ldg(reinterpret_cast<const uint2*>(values + s * 16 + 4 * t));
          field[u][i] = mma_field(p, meta, static_cast<uint32_t>(s));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (c0 + u * nwarps >= c_end) break;  // (warp-uniform)
      const uint32_t a[4] = {xa[u][0].x, xa[u][1].x, xa[u][0].y, xa[u][1].y};
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        bad |= field[u][i] >= static_cast<uint32_t>(p.G);  // (masked out of every row below)
#pragma unroll
        for (int k = 0; k < kMaxG; ++k) {
          if (k >= p.G) break;  // (uniform)
          const bool mine = field[u][i] == static_cast<uint32_t>(k);
          const uint32_t b[2] = {mine ? w[u][i].x : 0u, mine ? w[u][i].y : 0u};
          if constexpr ((S3_LAB_ROWBLOCK_DIAG & 4) != 0) {
            acc[k][i][0] += static_cast<float>(a[0] ^ a[1] ^ a[2] ^ a[3] ^ b[0] ^ b[1]);
          } else {
            mma_16816<kBF16>(acc[k][i], a, b);
          }
        }
      }
    }
  }
#endif
  reduce_mma_sums<TILES>(p, acc, warp, nwarps, lane, sums);
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

// One block a row group: R sets of warps_per_set warps each (the FMA form), or
// warps sharing the group's run columns (TILES > 0: the tensor-core form, TILES
// tiles of 8 sets, NT = 16).
template <typename T, int B, int NT, int TILES>
__global__ void __launch_bounds__(kMaxThreads)
packed_rowblock_kernel(const RowblockPlan p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                       const int64_t* __restrict__ block_off, const int64_t* __restrict__ elem_off,
                       const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int* status) {
  __shared__ float sums[kMaxG * kMaxR * NT];
  __shared__ int fast, bad;
  const int64_t grp = TILES > 0 ? blockIdx.x / S3_LAB_ROWBLOCK_DIAG_SPLIT : blockIdx.x;
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
    if constexpr (TILES > 0) {
      if (mma_group<T, TILES>(p, values, meta, x, grp, warp, blockDim.x / 32, lane, sums)) my_bad = kPackedBadIndex;
    } else {
      const int r = warp / p.warps_per_set, share = warp % p.warps_per_set;
      if (fast_set<T, B, NT>(p, values, meta, x, grp * p.R + r, r, share, lane, sums)) my_bad = kPackedBadIndex;
    }
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

// Whether the tensor-core form takes such a weight (16-bit values in runs of 16, sm_80+), and so the
// most tokens one launch takes: its 16, else the FMA form's 8.
inline bool rowblock_has_mma_form(const PackedGeometry& g, at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) && g.B == 16 && device_has_mma();
}
inline int64_t rowblock_tokens(const PackedGeometry& g, at::ScalarType dtype) {
  return rowblock_has_mma_form(g, dtype) ? rowblock::kMmaTokens : rowblock::kMaxTokens;
}

// Launches the row-block kernel for y (N, M) = x2 (N, K) W^T (+ bias), 1 <= N
// <= rowblock_tokens, or returns false without launching when the geometry is
// not one it takes (the caller then takes another path). x2 contiguous.
template <typename T>
bool launch_packed_rowblock(const PackedGeometry& g, int64_t N, const at::Tensor& values, const at::Tensor& meta,
                            const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                            const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                            at::Tensor& y, int* status, cudaStream_t stream) {
  using namespace rowblock;
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    constexpr bool k16bit = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;
    const int64_t R = rowblock_sets(g);
    const int64_t rows = g.G * R;
    const bool mma = N >= S3_LAB_ROWBLOCK_MMA_MIN && rowblock_has_mma_form(g, values.scalar_type());
    if (R == 0 || N < 1 || N > (mma ? kMmaTokens : kMaxTokens) || subsets.has_value() ||
        (g.B * int64_t(sizeof(T))) % 16 != 0)
      return false;
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
    p.word_div = FastDivmod(static_cast<uint32_t>(g.per_word));
    p.field_mask = g.meta_bits >= 32 ? 0xFFFFFFFFu : ((1u << g.meta_bits) - 1u);
    int threads = 0;
    if (mma) {
      // Warps sharing the group's run columns, each with at least 20 runs: on an H100 (fp16 block16-rows,
      // 4-16 tokens) 9728x2560 (160 runs a set) ran 8-14 % faster with 8 warps than with 16, 2560x9728
      // (608) 10-12 % slower, 4096x4096 (256) the same (benchmarks/results/packed-rowblock-lab-mma-h100-*).
      const int64_t per_warp = 20;
      threads = static_cast<int>(32 * std::clamp<int64_t>(p.per_row / per_warp, 1, S3_LAB_ROWBLOCK_MMA_WARPS));
    } else {
      // Warps a set: enough that a lane has a few runs of a long row, at most kMaxThreads a block.
      int64_t wps = 1;
      while (wps * 2 * 32 * R <= kMaxThreads && p.per_row >= wps * 2 * 32 * 4) wps *= 2;
      p.warps_per_set = static_cast<int32_t>(wps);
      threads = static_cast<int>(R * wps * 32);
    }
    const unsigned blocks = static_cast<unsigned>(g.M / rows * (mma ? S3_LAB_ROWBLOCK_DIAG_SPLIT : 1));
    const T* b = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
    auto go = [&](auto kernel) {
      S3_LAUNCH(blocks, threads, 0, stream, kernel)(p, values.const_data_ptr<T>(), meta.const_data_ptr<int32_t>(),
                                                      block_off.const_data_ptr<int64_t>(),
                                                      elem_off.const_data_ptr<int64_t>(), x2.const_data_ptr<T>(), b,
                                                      y.mutable_data_ptr<T>(), status);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if constexpr (k16bit) {
      if (mma) {
        if (R <= 8) go(packed_rowblock_kernel<T, 16, kMmaTokens, 1>);
        else go(packed_rowblock_kernel<T, 16, kMmaTokens, 2>);
        return true;
      }
    }
    const int nt = N == 1 ? 1 : N == 2 ? 2 : N <= 4 ? 4 : 8;
    if (g.B == 16) {
      if constexpr (16 * sizeof(T) % 16 == 0) {
        if (nt == 1) go(packed_rowblock_kernel<T, 16, 1, 0>);
        else if (nt == 2) go(packed_rowblock_kernel<T, 16, 2, 0>);
        else if (nt == 4) go(packed_rowblock_kernel<T, 16, 4, 0>);
        else go(packed_rowblock_kernel<T, 16, 8, 0>);
      }
    } else {
      if constexpr (8 * sizeof(T) % 16 == 0) {
        if (nt == 1) go(packed_rowblock_kernel<T, 8, 1, 0>);
        else if (nt == 2) go(packed_rowblock_kernel<T, 8, 2, 0>);
        else if (nt == 4) go(packed_rowblock_kernel<T, 8, 4, 0>);
        else go(packed_rowblock_kernel<T, 8, 8, 0>);
      }
    }
    return true;
  }
}

}  // namespace packed_cuda
}  // namespace s3sparse
