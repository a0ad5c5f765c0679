// The stream decode kernel of packed_linear: 1 to 8 tokens, a row_group
// promise, a fixed number of values a scope and a short code table (every
// reference pattern). Format: csrc/packed.h; semantics: s3sparse/reference.py.
//
// Why a second decode kernel: at a few tokens the layer is memory-bound, so a
// kernel must stream the packed bytes at close to copy bandwidth with only a
// few instructions per kept value. This one is specialised at compile time on
// the values a scope (P = nnz * B) and the tokens (NT), and at plan time on the
// scope grid inside a row group:
//   - a chunk is C consecutive scopes of one run (C * P values, one or more
//     16-byte loads), its C meta fields taken from one or two words;
//   - a scope's origin is stepped from the chunk's (one divmod a chunk), and
//     each of its values is placed by one shared-memory entry of the code
//     table (row and column offsets of every kept element of every code);
//   - x is staged once per thread block in shared memory as (K, NT), so one
//     load gives a value's NT tokens;
//   - products accumulate in fp32 registers; with one row a group (2:4, 4:8,
//     coupled 2:4) a warp owns a row and reduces by shuffles, otherwise a block
//     owns a group and flushes into shared row sums when the row changes.
// Bad data is never read or written through (the element is skipped, its rows
// become NaN and the status word gets the CPU kernel's bits).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

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

// Launches the stream kernel for y (N, M) = x2 (N, K) W^T (+ bias), or returns
// false without launching anything when it does not apply (the caller then
// takes the general decode kernels). Instantiated for at::Half, at::BFloat16
// and float in packed_stream_<dtype>.cu.
// Calls f.template operator()<P, ROW1>() with the plan's values a scope as a
// compile-time constant (plan_stream_geometry admits these P only).
template <typename F>
void dispatch_values_a_scope(int64_t P, bool row1, F&& f) {
  switch (P) {
    case 1: f.template operator()<1, true>(); break;
    case 2: f.template operator()<2, true>(); break;
    case 4: row1 ? f.template operator()<4, true>() : f.template operator()<4, false>(); break;
    case 8: row1 ? f.template operator()<8, true>() : f.template operator()<8, false>(); break;
    default: f.template operator()<16, false>(); break;
  }
}

template <typename T>
bool launch_packed_stream(const PackedGeometry& g, int64_t N, const at::Tensor& values, const at::Tensor& meta,
                          const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                          const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                          at::Tensor& y, int* status, cudaStream_t stream);

#ifdef S3SPARSE_PACKED_STREAM_IMPL
namespace stream {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kLoadsInFlight = 4;  // 16-byte value loads in flight per thread

// Lab knobs of the span kernel (benchmarks/lab/packed_mma_lab.py --kernel=span
// builds it with them; the package never sets them): S3_LAB_SPAN_LOADS=n loads
// in flight a lane, S3_LAB_SPAN_WARPS_PER_SM=n the warps an SM (24; 32 caps the
// registers at 64), and the diagnostics (wrong results) S3_LAB_SPAN_NO_ROWS (no
// row work: the prologue, the sums and the stores), S3_LAB_SPAN_NO_X (x read
// as 1 instead of a shared load), S3_LAB_SPAN_NO_TABLE (a value's x slot is
// its index in the chunk: no offset-table load), S3_LAB_SPAN_NO_STAGE (x not
// staged, in both row kernels' prologue), S3_LAB_SPAN_EMPTY (the kernel returns
// at once: the launch alone).
#ifdef S3_LAB_SPAN_LOADS
constexpr int kSpanLoads = S3_LAB_SPAN_LOADS;
#else
constexpr int kSpanLoads = kLoadsInFlight;
#endif
constexpr int kMaxStreamTokens = 8;
constexpr int64_t kMaxSmem = 200 * 1024;

// Scopes a chunk: 16 bytes of values, or one scope when a scope is more.
template <typename T, int P>
constexpr int chunk_scopes() {
  return P * static_cast<int>(sizeof(T)) >= 16 ? 1 : 16 / (P * static_cast<int>(sizeof(T)));
}

struct StreamPlan {
  PackedGeometry g;           // for the origin of a group (scope_base, once a group)
  int32_t M = 0, K = 0, N = 0, R = 0;
  int32_t groups = 0;         // M / R
  int32_t Sg = 0;             // scopes a group
  int32_t n_codes = 0;        // rows of the code table
  int32_t bits = 0, per_word = 0;
  uint32_t field_mask = 0;
  int32_t bad_code = 0;       // status bit of a field >= n_codes
  // In-group scope j -> flat offset (j / n1) * s0 + (j % n1) * s1 from the
  // group's origin; s1 also as (rows, cols), cols in [0, K).
  int32_t n1 = 1, s0 = 0, s1 = 0, s1_r = 0, s1_c = 0;
  FastDivmod div_n1, div_K, div_per_word;
  bool origin_affine = false;  // group q's origin is q * origin_step (block_off holds the view's offset)
  int32_t origin_step = 0;
  bool x_vec = false;         // x staged with 16-byte loads
  int32_t smem_entry = 0, smem_col = 0, smem_row = 0, smem_sums = 0, smem_total = 0;  // byte offsets; x first
  int32_t n_sub = 0;          // subsets entries (0 without subsets)
  int32_t smem_format = -1;   // byte offset of the format's copy (copy_format), or -1: read from global memory
  // Span path (span_row): 16-bit values, one row a group, chunk c of a row at
  // columns [c L, c L + L), L a multiple of 16; 0 = not planned.
  int32_t span_L = 0;
  int32_t goff_rows = 0;      // rows of the slot-offset table: every field value (2^bits)
  uint32_t used_mask = 0;     // the bits of a meta word that hold fields
  int32_t used_bits = 0;      // per_word * bits
  int32_t smem_goff = 0, smem_hits = 0;  // byte offsets: slot offsets (C, goff_rows, P) int32; tiling hits (L) int32
  int32_t nm_kind = 0;        // NmKind: the n:m path (nm_rows) is planned for this format
  bool dependent = false;     // launched as a programmatic dependent (launch_as_dependent)
};

// The format's index tensors (subsets, block_off, elem_off): in shared memory
// once copy_format has run, so the code tables cost one global round trip (the
// copy, issued before a kernel's first big loads) instead of a chain of them.
struct FormatPtrs {
  const int32_t* subsets;
  const int64_t* block_off;
  const int64_t* elem_off;
};

// Bytes of the format's shared copy: subsets (int32, padded to 8 bytes), then
// block_off and elem_off (int64); 0 when too large to be worth a copy.
inline int64_t format_copy_bytes(const StreamPlan& p) {
  const int64_t bytes = ceil_div(4 * int64_t(p.n_sub), 8) * 8 + 8 * (p.g.G + p.g.B);
  return bytes <= 8 * 1024 ? bytes : 0;
}

constexpr int kFormatRegs = 2;  // format elements a thread holds between issue and store

struct FormatLoads {
  int64_t v[kFormatRegs];
};

// Element i of the format: subsets, then block_off, then elem_off.
__device__ __forceinline__ int64_t format_elem(const StreamPlan& p, const int32_t* __restrict__ subsets,
                                               const int64_t* __restrict__ block_off,
                                               const int64_t* __restrict__ elem_off, int32_t i) {
  if (i < p.n_sub) return ldg(subsets + i);
  i -= p.n_sub;
  return i < p.g.G ? ldg(block_off + i) : ldg(elem_off + (i - p.g.G));
}

__device__ __forceinline__ int32_t format_size(const StreamPlan& p) {
  return p.smem_format < 0 ? 0 : p.n_sub + static_cast<int32_t>(p.g.G + p.g.B);
}

// Issues the loads of the thread's first format elements (into registers).
__device__ __forceinline__ void format_issue(const StreamPlan& p, const int32_t* __restrict__ subsets,
                                             const int64_t* __restrict__ block_off,
                                             const int64_t* __restrict__ elem_off, FormatLoads& f) {
  const int32_t n = format_size(p);
#pragma unroll
  for (int u = 0; u < kFormatRegs; ++u) {
    const int32_t i = static_cast<int32_t>(threadIdx.x) + u * static_cast<int32_t>(blockDim.x);
    f.v[u] = i < n ? format_elem(p, subsets, block_off, elem_off, i) : 0;
  }
}

// Stores the issued elements (and copies the rest) into shared memory and
// returns where the format is to be read: shared (after the caller's
// barrier), or the global tensors when the plan has no copy.
__device__ __forceinline__ FormatPtrs format_finish(const StreamPlan& p, unsigned char* smem,
                                                    const int32_t* __restrict__ subsets,
                                                    const int64_t* __restrict__ block_off,
                                                    const int64_t* __restrict__ elem_off, const FormatLoads& f) {
  if (p.smem_format < 0) return FormatPtrs{subsets, block_off, elem_off};
  int32_t* s_sub = reinterpret_cast<int32_t*>(smem + p.smem_format);
  int64_t* s_off = reinterpret_cast<int64_t*>(smem + p.smem_format + (4 * p.n_sub + 7) / 8 * 8);
  const int32_t n = format_size(p);
  auto put = [&](int32_t i, int64_t v) {
    if (i < p.n_sub) {
      s_sub[i] = static_cast<int32_t>(v);
    } else {
      s_off[i - p.n_sub] = v;
    }
  };
#pragma unroll
  for (int u = 0; u < kFormatRegs; ++u) {
    const int32_t i = static_cast<int32_t>(threadIdx.x) + u * static_cast<int32_t>(blockDim.x);
    if (i < n) put(i, f.v[u]);
  }
  for (int32_t i = static_cast<int32_t>(threadIdx.x) + kFormatRegs * static_cast<int32_t>(blockDim.x); i < n;
       i += static_cast<int32_t>(blockDim.x)) {
    put(i, format_elem(p, subsets, block_off, elem_off, i));
  }
  return FormatPtrs{subsets != nullptr ? s_sub : nullptr, s_off, s_off + p.g.G};
}

// x is staged in fp32 for 1 and 2 tokens (no conversion a value), in T above.
template <typename T, int NT>
using XType = std::conditional_t<(NT <= 2), float, T>;

// Column k of x lives in shared slot k + k / 16: threads of a warp read x
// 16 columns apart (a chunk is 16 columns on every reference pattern), which
// without the padding column would put all 32 of them on one or two banks
// (ncu on the H200: L1/shared at 81-90 % of its throughput, DRAM at 8-16 %).
__device__ __forceinline__ int32_t x_slot(int32_t k) { return k + (k >> 4); }

// x (N, K) into shared (slots, NT), tokens >= N as zeros.
template <typename T, int NT>
__device__ __forceinline__ void stage_x(const StreamPlan& p, const T* __restrict__ x, XType<T, NT>* xs) {
  using XT = XType<T, NT>;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const int32_t K = p.K;
  if (p.x_vec) {
    // Token by token, so no division a vector (it was a fifth of the span
    // kernel's instructions at 1 token: ncu on the H200).
    constexpr int V = 16 / sizeof(T);
    const int32_t per_row = K / V;
#pragma unroll 1
    for (int n = 0; n < NT; ++n) {
      const uint4* xrow = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(n) * K);
      for (int32_t j0 = tid; j0 < per_row; j0 += nt * 4) {
        uint4 raw[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int32_t j = j0 + u * nt;
          raw[u] = (j < per_row && n < p.N) ? ldg(xrow + j) : uint4{0u, 0u, 0u, 0u};
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int32_t j = j0 + u * nt;
          if (j < per_row) {
            T v[V];
            std::memcpy(v, &raw[u], 16);
#pragma unroll
            for (int e = 0; e < V; ++e) xs[x_slot(j * V + e) * NT + n] = static_cast<XT>(v[e]);
          }
        }
      }
    }
  } else {
    for (int32_t i = tid; i < K * NT; i += nt) {
      const int32_t k = i / NT, n = i - k * NT;
      xs[x_slot(k) * NT + n] = n < p.N ? static_cast<XT>(x[static_cast<int64_t>(n) * K + k]) : XT(0.f);
    }
  }
}

// The code tables in shared memory.
//   entry (n_codes, P) int2: (col, row) offset of value v of a scope with code
//     c from the scope's origin, col in [0, K); a bad subset entry gets an
//     out-of-range row (the element is then skipped as bad);
//   col (n_codes, P) int32: the col offsets alone (the fast path);
//   row (n_codes) int32: the row offset shared by all of a code's values, or
//     kRowClamp when they differ or one is bad (then the checked path); an
//     entry of a bad subsets entry has row kRowBadEntry;
//   cmax: the largest col offset of any code.
struct CodeTables {
  int2* entry;
  int32_t* col;
  int32_t* row;
  int32_t* cmax;
};

// Fills the tables; returns the status bits of subsets.
template <int P>
__device__ __forceinline__ int build_code_tables(const StreamPlan& p, const int32_t* __restrict__ subsets,
                                                 const int64_t* __restrict__ block_off,
                                                 const int64_t* __restrict__ elem_off, const CodeTables& t) {
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const int32_t B = static_cast<int32_t>(p.g.B), nnz = static_cast<int32_t>(p.g.nnz), G = static_cast<int32_t>(p.g.G);
  int bad = 0;
  int32_t cmax = 0;
  for (int32_t i = tid; i < p.n_codes * P; i += nt) {
    const int32_t code = i / P, v = i - code * P, j = v / B, e = v - j * B;
    const int32_t k = subsets != nullptr ? subsets[code * nnz + j] : code;
    int32_t row = kRowBadEntry, col = 0;
    if (k >= 0 && k < G) {
      split_offset(block_off[k] + elem_off[e], p.g.K, &row, &col);
    } else {
      bad |= kPackedBadIndex;
    }
    t.entry[i] = int2{col, row};
    t.col[i] = col;
    cmax = std::max(cmax, col);
  }
  if (cmax > 0) atomicMax(t.cmax, cmax);
  __syncthreads();
  for (int32_t c = tid; c < p.n_codes; c += nt) {
    const int32_t r0 = t.entry[c * P].y;
    bool same = r0 != kRowClamp && r0 != kRowBadEntry;
    for (int v = 1; v < P; ++v) same = same && t.entry[c * P + v].y == r0;
    t.row[c] = same ? r0 : kRowClamp;
  }
  return bad;
}

// build_code_tables by the whole block, its status bits into *table_bad
// (shared); starts after and ends with a barrier.
template <int P>
__device__ __forceinline__ void block_code_tables(const StreamPlan& p, const int32_t* __restrict__ subsets,
                                                  const int64_t* __restrict__ block_off,
                                                  const int64_t* __restrict__ elem_off, const CodeTables& t,
                                                  int* table_bad) {
  const int tb = build_code_tables<P>(p, subsets, block_off, elem_off, t);
  if (tb) atomicOr(table_bad, tb);
  __syncthreads();
}

// The NT tokens of one x slot, at its address, as floats.
template <typename XT, int NT>
__device__ __forceinline__ void load_x_at(const XT* at, float (&out)[NT]) {
  XT v[NT];
  if constexpr (NT * sizeof(XT) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(at);
    std::memcpy(v, &raw, 16);
  } else if constexpr (NT * sizeof(XT) == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(at);
    std::memcpy(v, &raw, 8);
  } else if constexpr (NT * sizeof(XT) == 4) {
    const uint32_t raw = *reinterpret_cast<const uint32_t*>(at);
    std::memcpy(v, &raw, 4);
  } else {
#pragma unroll
    for (int n = 0; n < NT; ++n) v[n] = at[n];
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) out[n] = to_float(v[n]);
}

// The same by slot index, and by column (x_slot of it).
template <typename XT, int NT>
__device__ __forceinline__ void load_x_slot(const XT* xs, int32_t col, float (&out)[NT]) {
  load_x_at<XT, NT>(xs + col * NT, out);
}

template <typename XT, int NT>
__device__ __forceinline__ void load_xs(const XT* xs, int32_t col, float (&out)[NT]) {
  load_x_slot<XT, NT>(xs, x_slot(col), out);
}

// The P col offsets of a code (vector shared loads where they fit).
template <int P>
__device__ __forceinline__ void load_cols(const int32_t* col, uint32_t code, int32_t (&out)[P]) {
  const int32_t* src = col + code * P;
  if constexpr (P % 4 == 0) {
#pragma unroll
    for (int v = 0; v < P; v += 4) {
      const int4 c = *reinterpret_cast<const int4*>(src + v);
      out[v] = c.x;
      out[v + 1] = c.y;
      out[v + 2] = c.z;
      out[v + 3] = c.w;
    }
  } else if constexpr (P == 2) {
    const int2 c = *reinterpret_cast<const int2*>(src);
    out[0] = c.x;
    out[1] = c.y;
  } else {
#pragma unroll
    for (int v = 0; v < P; ++v) out[v] = src[v];
  }
}

// The running dot products of one thread: acc for row `cur`, flushed into the
// group's shared (R, NT) sums when the row changes (not with ROW1: one row).
template <int NT, bool ROW1>
struct RowAcc {
  float acc[NT];
  int32_t cur;
  __device__ __forceinline__ void flush(float* sums, int32_t row_lo) {
    if (!ROW1 && cur >= 0) {
#pragma unroll
      for (int n = 0; n < NT; ++n) atomicAdd(&sums[(cur - row_lo) * NT + n], acc[n]);
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n] = 0.f;
  }
};

// One scope through every check: bad codes, offsets outside W or the group,
// columns that wrap into the next row. Returns status bits.
template <typename T, typename XT, int P, int NT, bool ROW1>
__device__ __forceinline__ int scope_checked(const StreamPlan& p, const T* vals, uint32_t code, int32_t rb, int32_t cb,
                                          const int2* entry, const XT* xs, RowAcc<NT, ROW1>& ra, float* sums,
                                          int32_t row_lo) {
  if (code >= static_cast<uint32_t>(p.n_codes)) return p.bad_code;
  int bad = 0;
  for (int v = 0; v < P; ++v) {
    const int2 o = entry[code * P + v];
    int32_t col = cb + o.x;
    int32_t row = rb + o.y;
    if (col >= p.K) {
      col -= p.K;
      ++row;
    }
    if (row != ra.cur) {
      if (ROW1 || static_cast<uint32_t>(row - row_lo) >= static_cast<uint32_t>(p.R)) {
        bad |= (row < 0 || row >= p.M) ? kPackedBadOffset : kPackedBadGroup;
        continue;
      }
      ra.flush(sums, row_lo);
      ra.cur = row;
    }
    float xv[NT];
    load_xs<XT, NT>(xs, col, xv);
    const float w = to_float(vals[v]);
#pragma unroll
    for (int n = 0; n < NT; ++n) ra.acc[n] += w * xv[n];
  }
  return bad;
}

// The origin (rb, cb), cb in [0, K), of scope j0 of the group whose origin is
// `origin`: the in-group grid's two dims, one division by K.
__device__ __forceinline__ void scope_origin(const StreamPlan& p, int32_t origin, uint32_t j0, int32_t* rb,
                                             int32_t* cb) {
  const uint32_t jr = p.div_n1.div(j0);
  const int32_t local = static_cast<int32_t>(jr) * p.s0 + static_cast<int32_t>(j0 - jr * p.n1) * p.s1;
  const uint32_t flat = static_cast<uint32_t>(origin + local);
  *rb = static_cast<int32_t>(p.div_K.div(flat));
  *cb = static_cast<int32_t>(flat) - *rb * p.K;
}

// The next scope of a chunk: one step of s1 along the run, wrapping past column K.
__device__ __forceinline__ void next_scope(const StreamPlan& p, int32_t* rb, int32_t* cb) {
  *cb += p.s1_c;
  *rb += p.s1_r;
  if (*cb >= p.K) {
    *cb -= p.K;
    ++*rb;
  }
}

// One thread's share of group q: chunks rank, rank + team, ... A scope takes
// the fast path (its code's col offsets, no per-value checks) when its code
// is valid, its values share one row inside the group (with ROW1: row q) and
// the chunk cannot wrap past column K; otherwise scope_checked. Returns status bits.
template <typename T, int P, int NT, bool ROW1>
__device__ __forceinline__ int stream_group(const StreamPlan& p, const T* __restrict__ values,
                                            const int32_t* __restrict__ meta, const CodeTables& t,
                                            const XType<T, NT>* xs, int32_t q, int32_t rank, int32_t team,
                                            RowAcc<NT, ROW1>& ra, float* sums) {
  using XT = XType<T, NT>;
  constexpr int C = chunk_scopes<T, P>();
  constexpr int CP = C * P;
  constexpr int NV = CP * static_cast<int>(sizeof(T)) / 16;
  static_assert(NV >= 1 && NV * 16 == CP * static_cast<int>(sizeof(T)), "a chunk is whole 16-byte vectors");
  constexpr int kUnroll = NV >= kLoadsInFlight ? 1 : kLoadsInFlight / NV;  // chunks in flight
  const int32_t K = p.K;
  const int32_t row_lo = q * p.R;
  const uint32_t s_first = static_cast<uint32_t>(q) * static_cast<uint32_t>(p.Sg);
  const int32_t origin = p.origin_affine ? q * p.origin_step
                                         : static_cast<int32_t>(p.g.scope_base(static_cast<int64_t>(s_first)));
  const int32_t chunks = p.Sg / C;
  // A chunk whose origin column is below this cannot wrap (nor can its scopes).
  const int32_t no_wrap_below = p.s1_r == 0 ? K - (C - 1) * p.s1_c - *t.cmax : 0;
  const uint4* vbase = reinterpret_cast<const uint4*>(values) + static_cast<int64_t>(s_first) / C * NV;
  int bad = 0;
  if (ROW1) ra.cur = row_lo;
  for (int32_t c = rank; c < chunks; c += team * kUnroll) {
    uint4 raw[kUnroll][NV];
    uint32_t w0[kUnroll], w1[kUnroll], slot[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int32_t cu = c + u * team;
      if (cu < chunks) {
#pragma unroll
        for (int v = 0; v < NV; ++v) raw[u][v] = ldg(vbase + static_cast<int64_t>(cu) * NV + v);
        const uint32_t f = s_first + static_cast<uint32_t>(cu) * C;  // the chunk's first meta field
        const uint32_t word = p.div_per_word.div(f);
        slot[u] = f - word * static_cast<uint32_t>(p.per_word);
        w0[u] = static_cast<uint32_t>(ldg(meta + word));
        w1[u] = (C > 1 && slot[u] + C > static_cast<uint32_t>(p.per_word)) ? static_cast<uint32_t>(ldg(meta + word + 1))
                                                                            : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int32_t cu = c + u * team;
      if (cu >= chunks) continue;
      T vals[CP];
      std::memcpy(vals, raw[u], CP * sizeof(T));
      int32_t rb, cb;  // the chunk's first scope origin
      scope_origin(p, origin, static_cast<uint32_t>(cu) * C, &rb, &cb);
      const bool no_wrap = cb < no_wrap_below;
#pragma unroll
      for (int k = 0; k < C; ++k) {
        if (k > 0) next_scope(p, &rb, &cb);
        const uint32_t sl = slot[u] + k;
        const uint32_t word = sl < static_cast<uint32_t>(p.per_word) ? w0[u] : w1[u];
        const uint32_t sh = (sl < static_cast<uint32_t>(p.per_word) ? sl : sl - p.per_word) * p.bits;
        const uint32_t code = p.bits >= 32 ? word : (word >> sh) & p.field_mask;
        const bool known = code < static_cast<uint32_t>(p.n_codes);
        const int32_t row = rb + (known ? t.row[code] : kRowClamp);
        const bool fast =
            no_wrap && known && (ROW1 ? row == ra.cur : static_cast<uint32_t>(row - row_lo) < static_cast<uint32_t>(p.R));
        if (fast) {
          if (!ROW1 && row != ra.cur) {
            ra.flush(sums, row_lo);
            ra.cur = row;
          }
          int32_t cols[P];
          load_cols<P>(t.col, code, cols);
#pragma unroll
          for (int v = 0; v < P; ++v) {
            float xv[NT];
            load_xs<XT, NT>(xs, cb + cols[v], xv);
            const float w = to_float(vals[k * P + v]);
#pragma unroll
            for (int n = 0; n < NT; ++n) ra.acc[n] += w * xv[n];
          }
        } else {
          bad |= scope_checked<T, XT, P, NT, ROW1>(p, vals + k * P, code, rb, cb, t.entry, xs, ra, sums, row_lo);
        }
      }
    }
  }
  if (!ROW1) ra.flush(sums, row_lo);
  return bad;
}

// Does every chunk tile its span? (Each of the C scopes' G * B elements at a
// distinct column of [0, L) of the chunk's row.) Block-wide; ends with a barrier.
__device__ inline bool spans_tile(const StreamPlan& p, int32_t L, const int64_t* __restrict__ block_off,
                                  const int64_t* __restrict__ elem_off, int C, int32_t* hits, int* span_bad) {
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const int32_t G = static_cast<int32_t>(p.g.G), B = static_cast<int32_t>(p.g.B);
  for (int i = tid; i < L; i += nt) hits[i] = 0;
  __syncthreads();
  for (int32_t i = tid; i < C * G * B; i += nt) {
    const int32_t k = i / (G * B), b = (i / B) % G, el = i % B;
    int32_t row = 0, col = 0;
    split_offset(block_off[b] + elem_off[el], p.g.K, &row, &col);
    const int32_t pos = k * p.s1_c + col;
    if (row != 0 || pos < 0 || pos >= L) {
      atomicOr(span_bad, 1);
    } else {
      atomicAdd(&hits[pos], 1);
    }
  }
  __syncthreads();
  for (int i = tid; i < L; i += nt) {
    if (hits[i] != 1) atomicOr(span_bad, 1);
  }
  __syncthreads();
  return *span_bad == 0;
}

// The span path's table: for scope k of a chunk and every field value c, the
// byte offsets of the x slots of the code's P values from the chunk's first
// slot (column c L is slot c (L + L / 16), L a multiple of 16; a slot is
// slot_bytes), so a value's x costs one add and one shared load; 0 for codes
// outside the table (a lane remembers its largest code, so they are still
// reported). Block-wide, after the code tables (with no bad entry) and
// spans_tile; ends with a barrier.
template <int P>
__device__ inline void build_span_offsets(const StreamPlan& p, const CodeTables& t, int C, int32_t slot_bytes,
                                          int32_t* goff) {
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const int32_t n = C * p.goff_rows * P;
  for (int32_t i = tid; i < n; i += nt) {
    const int32_t v = i % P, code = (i / P) % p.goff_rows, k = i / (P * p.goff_rows);
    int32_t off = 0;
    if (code < p.n_codes) {
      const int32_t pos = k * p.s1_c + t.col[code * P + v];
      off = (pos + pos / 16) * slot_bytes;
    }
    goff[i] = off;
  }
  __syncthreads();
}

// Row q on the span path, by one warp: lane l takes the row's chunks l, l + 32,
// ... (one 16-byte load each, kLoadsInFlight of them in flight). A chunk's C
// fields come out of its one or two meta words with a 64-bit shift, each
// field's value slots from one vector load of the offset table, and each
// value costs one shared load of x, a conversion and NT FMAs: no per-scope
// origin, wrap or row checks (the block checked the tiling and the tables).
// Returns whether a field was outside the code table (the row is then bad).
template <typename T, int P, int NT>
__device__ __forceinline__ bool span_row(const StreamPlan& p, const T* __restrict__ values,
                                         const int32_t* __restrict__ meta, const int32_t* goff,
                                         const XType<T, NT>* xs, int32_t q, int lane, float (&acc)[NT]) {
  using XT = XType<T, NT>;
  constexpr int C = chunk_scopes<T, P>();
  static_assert(C * P * sizeof(T) == 16, "the span path takes one 16-byte chunk of 16-bit values");
  constexpr int U = kSpanLoads;
  const int32_t row_chunks = p.K / p.span_L;
  const int32_t chunk_slots = p.span_L + p.span_L / 16;
  const uint4* vrow = reinterpret_cast<const uint4*>(values) + static_cast<int64_t>(q) * row_chunks;
  const uint32_t f_row = static_cast<uint32_t>(q) * static_cast<uint32_t>(row_chunks) * C;
  const uint32_t per_word = static_cast<uint32_t>(p.per_word);
  uint32_t max_code = 0;
  const int32_t chunk_bytes = chunk_slots * NT * static_cast<int32_t>(sizeof(XT));
  const unsigned char* xbytes = reinterpret_cast<const unsigned char*>(xs);
  // Scopes alternate between two sums at 1-2 tokens (else one chain of
  // dependent FMAs a lane); more tokens are independent chains already.
  constexpr int A = NT <= 2 ? 2 : 1;
  float sums[A][NT] = {};
  for (int32_t c0 = lane; c0 < row_chunks; c0 += 32 * U) {
    uint4 raw[U];
    uint32_t w0[U], w1[U], slot[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t c = c0 + 32 * u;
      if (c < row_chunks) {
        raw[u] = ldg(vrow + c);
        const uint32_t f = f_row + static_cast<uint32_t>(c) * C;
        const uint32_t word = p.div_per_word.div(f);
        slot[u] = f - word * per_word;
        w0[u] = static_cast<uint32_t>(ldg(meta + word));
        w1[u] = slot[u] + C > per_word ? static_cast<uint32_t>(ldg(meta + word + 1)) : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t c = c0 + 32 * u;
      if (c >= row_chunks) continue;
      const uint64_t both = (static_cast<uint64_t>(w1[u]) << p.used_bits) | (w0[u] & p.used_mask);
      const uint32_t fields = static_cast<uint32_t>(both >> (slot[u] * p.bits));
      T vals[C * P];
      std::memcpy(vals, &raw[u], 16);
      const unsigned char* xc = xbytes + c * chunk_bytes;
#pragma unroll
      for (int k = 0; k < C; ++k) {
        const uint32_t code = (fields >> (k * p.bits)) & p.field_mask;
        max_code = code > max_code ? code : max_code;
        int32_t offs[P];
#ifdef S3_LAB_SPAN_NO_TABLE
#pragma unroll
        for (int v = 0; v < P; ++v) offs[v] = (k * P + v) * NT * static_cast<int32_t>(sizeof(XT));
#else
        load_cols<P>(goff + k * p.goff_rows * P, code, offs);
#endif
#pragma unroll
        for (int v = 0; v < P; ++v) {
          float xv[NT];
#ifdef S3_LAB_SPAN_NO_X
#pragma unroll
          for (int n = 0; n < NT; ++n) xv[n] = 1.f + static_cast<float>(offs[v] & 1);
#else
          load_x_at<XT, NT>(reinterpret_cast<const XT*>(xc + offs[v]), xv);
#endif
          const float w = to_float(vals[k * P + v]);
#pragma unroll
          for (int n = 0; n < NT; ++n) sums[k % A][n] += w * xv[n];
        }
      }
    }
  }
#pragma unroll
  for (int a = 0; a < A; ++a) {
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n] += sums[a][n];
  }
  return max_code >= static_cast<uint32_t>(p.n_codes);
}

template <typename T>
__device__ __forceinline__ T stream_out(float v, bool bad, const T* __restrict__ bias, int32_t row) {
  return static_cast<T>(bad ? NAN : (bias != nullptr ? v + to_float(bias[row]) : v));
}

// The start of both row kernels: the format's loads, then x's (both in
// flight together), then the code tables. Ends after a barrier; returns the
// tables' status bits (also raised in status). The caller zeroes its table_bad
// and cmax before (the first barrier here orders that).
template <typename T, int P, int NT>
__device__ __forceinline__ int stream_prologue(const StreamPlan& p, const int32_t* __restrict__ subsets,
                                               const int64_t* __restrict__ block_off,
                                               const int64_t* __restrict__ elem_off, const T* __restrict__ x,
                                               int* __restrict__ status, unsigned char* smem, XType<T, NT>* xs,
                                               const CodeTables& t, int* table_bad, FormatPtrs* fmt) {
  FormatLoads fl;
  format_issue(p, subsets, block_off, elem_off, fl);
#ifndef S3_LAB_SPAN_NO_STAGE
  stage_x<T, NT>(p, x, xs);
#endif
  *fmt = format_finish(p, smem, subsets, block_off, elem_off, fl);
  __syncthreads();
  const int tb = build_code_tables<P>(p, fmt->subsets, fmt->block_off, fmt->elem_off, t);
  if (tb) atomicOr(table_bad, tb);
  __syncthreads();
  const int tbad = *table_bad;
  if (tbad && threadIdx.x == 0 && status != nullptr) atomicOr(status, tbad);
  return tbad;
}

// The end of a warp's row q: the lanes' sums reduced, a bad row's status
// raised, and lane 0 writing y (NaN when the row or the tables were bad).
template <typename T, int NT>
__device__ __forceinline__ void finish_row(const StreamPlan& p, float (&acc)[NT], int bad, int tbad, int lane,
                                           int32_t q, const T* __restrict__ bias, T* __restrict__ y,
                                           int* __restrict__ status) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    for (int off = 16; off > 0; off /= 2) acc[n] += __shfl_down_sync(0xffffffffu, acc[n], off);
  }
  const unsigned any = __ballot_sync(0xffffffffu, bad != 0);
  if (bad && status != nullptr) atomicOr(status, bad);
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      if (n < p.N) y[static_cast<int64_t>(n) * p.M + q] = stream_out<T>(acc[n], any != 0 || tbad != 0, bias, q);
    }
  }
}

// Two blocks an SM (64 registers a thread): enough warps to cover the memory
// latency, and rows spread evenly over the SMs.
template <typename T, int P, int NT, bool ROW1>
__global__ void __launch_bounds__(kThreads, 2)
packed_stream_kernel(const StreamPlan p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                     const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                     const int64_t* __restrict__ elem_off, const T* __restrict__ x, const T* __restrict__ bias,
                     T* __restrict__ y, int* __restrict__ status) {
  using XT = XType<T, NT>;
  S3_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int table_bad, group_bad;
  __shared__ int32_t cmax;
  XT* xs = reinterpret_cast<XT*>(smem);
  const CodeTables t{reinterpret_cast<int2*>(smem + p.smem_entry), reinterpret_cast<int32_t*>(smem + p.smem_col),
                     reinterpret_cast<int32_t*>(smem + p.smem_row), &cmax};
  float* sums = reinterpret_cast<float*>(smem + p.smem_sums);
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) {
    table_bad = 0;
    group_bad = 0;
    cmax = 0;
  }
  if (!ROW1) {
    for (int i = tid; i < p.R * NT; i += blockDim.x) sums[i] = 0.f;
  }
  FormatPtrs fmt;
  const int tbad = stream_prologue<T, P, NT>(p, subsets, block_off, elem_off, x, status, smem, xs, t, &table_bad, &fmt);
  (void)fmt;

  if constexpr (ROW1) {
    // A warp a row: rows warp * gridDim.x + blockIdx.x, + kWarps * gridDim.x,
    // ... (consecutive blocks first, so rows spread evenly over the SMs).
    const int lane = tid % 32, warp = tid / 32;
    const int32_t step = kWarps * static_cast<int32_t>(gridDim.x);
    for (int32_t q = warp * static_cast<int32_t>(gridDim.x) + static_cast<int32_t>(blockIdx.x); q < p.groups;
         q += step) {
      RowAcc<NT, true> ra;
      ra.flush(nullptr, 0);
      const int bad = stream_group<T, P, NT, true>(p, values, meta, t, xs, q, lane, 32, ra, nullptr);
      finish_row<T, NT>(p, ra.acc, bad, tbad, lane, q, bias, y, status);
    }
  } else {
    // A block a group: groups blockIdx.x, + gridDim.x, ...
    for (int32_t q = static_cast<int32_t>(blockIdx.x); q < p.groups; q += static_cast<int32_t>(gridDim.x)) {
      RowAcc<NT, false> ra;
      ra.cur = -1;
      ra.flush(sums, 0);
      const int bad = stream_group<T, P, NT, false>(p, values, meta, t, xs, q, tid, kThreads, ra, sums);
      if (bad) atomicOr(&group_bad, bad);
      __syncthreads();
      const int gbad = group_bad;
      if (gbad && tid == 0 && status != nullptr) atomicOr(status, gbad);
      const int32_t row_lo = q * p.R;
      for (int i = tid; i < p.R * p.N; i += kThreads) {
        const int32_t r = i / p.N, n = i - r * p.N;
        y[static_cast<int64_t>(n) * p.M + row_lo + r] =
            stream_out<T>(sums[r * NT + n], gbad != 0 || tbad != 0, bias, row_lo + r);
      }
      __syncthreads();
      for (int i = tid; i < p.R * NT; i += kThreads) sums[i] = 0.f;
      if (tid == 0) group_bad = 0;
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------ n:m fast path
// 2:4, 4:8 and coupled 2:4 exactly as PackedWeight.from_scope packs them (the
// lexicographic 2-of-4 code table, canonical block_off / elem_off) take a
// path of the span kernel with no prologue: no x staging, no tables, no
// barrier. A lane reads a chunk's 16 columns of x (two 16-byte loads a token,
// L1 hits: every warp of an SM reads the same x) and selects each kept
// value's x in registers with one byte permute by its code. A warp verifies
// the tables while it streams its first row (their loads overlap the row's)
// and the kernel falls back to the span path when they are not canonical.
enum NmKind : int32_t { kNmNone = 0, kNm24 = 1, kNmPairs48 = 2, kNmCoupled24 = 3 };

// Code c of the lexicographic 2-of-4 table -> its kept blocks b0 | b1 << 2,
// nibble c (codes 6 and 7 are bad: the row is then NaN).
constexpr uint32_t kTwoOfFour = 0x00ED9C84u;
constexpr int32_t kNmCodes = 6;

__device__ __forceinline__ uint32_t nm_kept(uint32_t code) { return (kTwoOfFour >> (4 * code)) & 0xFu; }

// The byte-permute selector taking halves b0 and b1 of (w1:w0) into the low
// and high half of a word: bytes 2 b0, 2 b0 + 1, 2 b1, 2 b1 + 1.
__device__ __forceinline__ uint32_t nm_pair_selector(uint32_t code) {
  const uint32_t kept = nm_kept(code);
  return ((kept & 3u) | ((kept & 12u) << 6)) * 0x22u + 0x1010u;
}

// The two 16-bit values of a word as floats.
template <typename T>
__device__ __forceinline__ void word_floats(uint32_t w, float* lo, float* hi) {
  *lo = to_float(T(static_cast<uint16_t>(w & 0xFFFFu), T::from_bits()));
  *hi = to_float(T(static_cast<uint16_t>(w >> 16), T::from_bits()));
}

// What this lane checks of the tables (lanes 0-11: subsets, 12-15: block_off,
// 16-17: elem_off), as (found, wanted); the loads are issued here, compared later.
struct NmCheck {
  int64_t found = 0, want = 0;
};
__device__ __forceinline__ NmCheck nm_check_issue(int32_t kind, int32_t B, const int32_t* __restrict__ subsets,
                                                  const int64_t* __restrict__ block_off,
                                                  const int64_t* __restrict__ elem_off, int lane) {
  NmCheck c;
  if (lane < 2 * kNmCodes) {
    c.found = ldg(subsets + lane);
    c.want = (nm_kept(static_cast<uint32_t>(lane / 2)) >> (2 * (lane % 2))) & 3u;
  } else if (lane < 2 * kNmCodes + 4) {
    c.found = ldg(block_off + (lane - 2 * kNmCodes));
    c.want = (kind == kNmPairs48 ? 2 : 1) * (lane - 2 * kNmCodes);
  } else if (lane < 2 * kNmCodes + 4 + B) {
    const int e = lane - 2 * kNmCodes - 4;
    c.found = ldg(elem_off + e);
    c.want = e * (kind == kNmCoupled24 ? 8 : 1);
  }
  return c;
}

// One chunk (16 columns) of a row: its values' words v, its fields, x's words
// (NT tokens, 8 words of 16-bit pairs each). Scopes alternate between A sums.
template <typename T, int KIND, int NT, int A>
__device__ __forceinline__ void nm_chunk(const uint32_t (&v)[4], uint32_t fields, const uint32_t (&xw)[NT][8],
                                         float (&sums)[A][NT], uint32_t* max_code) {
  constexpr int C = KIND == kNm24 ? 4 : 2;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t code = (fields >> (3 * k)) & 7u;
    *max_code = code > *max_code ? code : *max_code;
    if constexpr (KIND == kNm24) {
      // Scope k: columns 4k..4k+3 (x words 2k, 2k+1), values word k.
      const uint32_t sel = nm_pair_selector(code);
      float w0, w1;
      word_floats<T>(v[k], &w0, &w1);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        float x0, x1;
        word_floats<T>(__byte_perm(xw[n][2 * k], xw[n][2 * k + 1], sel), &x0, &x1);
        sums[k % A][n] += w0 * x0 + w1 * x1;
      }
    } else if constexpr (KIND == kNmPairs48) {
      // Scope k: columns 8k..8k+7, block b = x word 4k + b; values words 2k, 2k+1.
      const uint32_t kept = nm_kept(code);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint32_t b = j == 0 ? (kept & 3u) : (kept >> 2);
        float w0, w1;
        word_floats<T>(v[2 * k + j], &w0, &w1);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const uint32_t lo = (b & 1u) ? xw[n][4 * k + 1] : xw[n][4 * k];
          const uint32_t hi = (b & 1u) ? xw[n][4 * k + 3] : xw[n][4 * k + 2];
          float x0, x1;
          word_floats<T>((b & 2u) ? hi : lo, &x0, &x1);
          sums[k % A][n] += w0 * x0 + w1 * x1;
        }
      }
    } else {
      // Coupled: scope k's pairs (4k + b, 4k + b + 8); values words 2k (block
      // b0: both elements), 2k + 1 (block b1).
      const uint32_t sel = nm_pair_selector(code);
      float a0, a1, c0, c1;
      word_floats<T>(v[2 * k], &a0, &a1);
      word_floats<T>(v[2 * k + 1], &c0, &c1);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        float lo0, lo1, hi0, hi1;
        word_floats<T>(__byte_perm(xw[n][2 * k], xw[n][2 * k + 1], sel), &lo0, &lo1);
        word_floats<T>(__byte_perm(xw[n][2 * k + 4], xw[n][2 * k + 5], sel), &hi0, &hi1);
        sums[k % A][n] += a0 * lo0 + a1 * hi0 + c0 * lo1 + c1 * hi1;
      }
    }
  }
}

// A warp's batch of the n:m path: lane l's chunks base + l + 32 u of row q
// (u < U), their 16-byte values and meta words. Each batch of U = 2 chunks is
// issued before the previous one is computed, also across a warp's rows (two
// batches a lane in flight). Measured on an H100 (ae2de13, the span lab,
// benchmarks/results/packed-span-lab-nm-pipe-h100.*): at 1-2 tokens as fast
// as or up to 8% faster than 99077ae's form (a batch of kSpanLoads loads, then
// its compute; lab knob S3_LAB_NM_PIPELINE=0), U = 3 no better, U = 4 slower.
#ifndef S3_LAB_NM_PIPELINE
#define S3_LAB_NM_PIPELINE 2
#endif
#if S3_LAB_NM_PIPELINE > 0
constexpr int kNmLoads = S3_LAB_NM_PIPELINE;
constexpr bool kNmPrefetch = true;
#else
constexpr int kNmLoads = kSpanLoads;
constexpr bool kNmPrefetch = false;
#endif
template <int U>
struct NmBatch {
  uint4 raw[U];
  uint32_t w0[U], w1[U];
  uint32_t slot[U];  // the chunk's first field within w0
};

template <int C, int U>
__device__ __forceinline__ void nm_load(const StreamPlan& p, const uint4* __restrict__ values,
                                        const int32_t* __restrict__ meta, int32_t row_chunks, int32_t q, int32_t base,
                                        int lane, NmBatch<U>& b) {
  const uint4* vrow = values + static_cast<int64_t>(q) * row_chunks;
  const uint32_t f_row = static_cast<uint32_t>(q) * static_cast<uint32_t>(row_chunks) * C;
  const uint32_t per_word = static_cast<uint32_t>(p.per_word);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int32_t c = base + lane + 32 * u;
    if (c < row_chunks) {
      b.raw[u] = ldg(vrow + c);
      const uint32_t f = f_row + static_cast<uint32_t>(c) * C;
      const uint32_t word = p.div_per_word.div(f);
      b.slot[u] = f - word * per_word;
      b.w0[u] = static_cast<uint32_t>(ldg(meta + word));
      b.w1[u] = b.slot[u] + C > per_word ? static_cast<uint32_t>(ldg(meta + word + 1)) : 0u;
    }
  }
}

template <typename T, int KIND, int NT, int A, int U>
__device__ __forceinline__ void nm_compute(const StreamPlan& p, const T* __restrict__ x, int32_t row_chunks,
                                           int32_t base, int lane, const NmBatch<U>& b, float (&sums)[A][NT],
                                           uint32_t* max_code) {
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const int32_t x_row = p.K / 8;  // uint4s a token
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int32_t c = base + lane + 32 * u;
    if (c >= row_chunks) continue;
    const uint64_t both = (static_cast<uint64_t>(b.w1[u]) << p.used_bits) | (b.w0[u] & p.used_mask);
    const uint32_t fields = static_cast<uint32_t>(both >> (b.slot[u] * p.bits));
    uint32_t xw[NT][8];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      uint4 lo{0u, 0u, 0u, 0u}, hi{0u, 0u, 0u, 0u};
      if (n < p.N) {
        lo = ldg(xv + static_cast<int64_t>(n) * x_row + 2 * c);
        hi = ldg(xv + static_cast<int64_t>(n) * x_row + 2 * c + 1);
      }
      std::memcpy(&xw[n][0], &lo, 16);
      std::memcpy(&xw[n][4], &hi, 16);
    }
    uint32_t v[4];
    std::memcpy(v, &b.raw[u], 16);
    nm_chunk<T, KIND, NT, A>(v, fields, xw, sums, max_code);
  }
}

// The n:m path of the span kernel: the rows of this warp (the span kernel's
// order) as one stream of batches (with kNmPrefetch, each batch's loads
// issued before the previous batch is computed, also across rows), with the
// tables checked before the first row is written. Returns false, having written nothing,
// when they are not canonical (the same answer in every warp: the caller
// then takes the span path).
template <typename T, int KIND, int NT, int U>
__device__ __forceinline__ bool nm_rows_of(const StreamPlan& p, const T* __restrict__ values,
                                           const int32_t* __restrict__ meta, const NmCheck& check,
                                           const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                           int* __restrict__ status) {
  constexpr int C = KIND == kNm24 ? 4 : 2;
  constexpr int A = NT <= 2 ? 2 : 1;  // scopes alternate between two sums at 1-2 tokens
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int32_t step = static_cast<int32_t>(blockDim.x / 32 * gridDim.x);
  const int32_t row_chunks = p.K / 16;
  const uint4* v16 = reinterpret_cast<const uint4*>(values);
  int32_t q = warp * static_cast<int32_t>(gridDim.x) + static_cast<int32_t>(blockIdx.x);
  bool decided = false;
  auto decide = [&]() { return __ballot_sync(0xffffffffu, check.found == check.want) == 0xffffffffu; };
  if (q >= p.groups) return decide();
  int32_t base = 0;
  NmBatch<U> cur;
  nm_load<C, U>(p, v16, meta, row_chunks, q, base, lane, cur);
  float sums[A][NT] = {};
  uint32_t max_code = 0;
  while (true) {
    int32_t nq = q, nbase = base + 32 * U;
    if (nbase >= row_chunks) {
      nq = q + step;
      nbase = 0;
    }
    const bool more = nq < p.groups;
    NmBatch<U> nxt;
    if constexpr (kNmPrefetch) {
      if (more) nm_load<C, U>(p, v16, meta, row_chunks, nq, nbase, lane, nxt);
    }
    nm_compute<T, KIND, NT, A, U>(p, x, row_chunks, base, lane, cur, sums, &max_code);
    if (nq != q) {
      if (!decided) {
        if (!decide()) return false;
        decided = true;
      }
      float acc[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[n] = 0.f;
#pragma unroll
        for (int a = 0; a < A; ++a) acc[n] += sums[a][n];
      }
      finish_row<T, NT>(p, acc, max_code >= static_cast<uint32_t>(kNmCodes) ? p.bad_code : 0, 0, lane, q, bias, y,
                        status);
#pragma unroll
      for (int a = 0; a < A; ++a) {
#pragma unroll
        for (int n = 0; n < NT; ++n) sums[a][n] = 0.f;
      }
      max_code = 0;
    }
    if (!more) break;
    q = nq;
    base = nbase;
    if constexpr (kNmPrefetch) {
      cur = nxt;
    } else {
      nm_load<C, U>(p, v16, meta, row_chunks, q, base, lane, cur);
    }
  }
  return true;
}

template <typename T, int P, int NT>
__device__ __forceinline__ bool nm_rows(const StreamPlan& p, const T* __restrict__ values,
                                        const int32_t* __restrict__ meta, const int32_t* __restrict__ subsets,
                                        const int64_t* __restrict__ block_off, const int64_t* __restrict__ elem_off,
                                        const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                        int* __restrict__ status) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const NmCheck check = nm_check_issue(p.nm_kind, static_cast<int32_t>(p.g.B), subsets, block_off, elem_off, lane);
  if constexpr (P == 2) {
    return nm_rows_of<T, kNm24, NT, kNmLoads>(p, values, meta, check, x, bias, y, status);
  } else {
    return p.nm_kind == kNmPairs48
               ? nm_rows_of<T, kNmPairs48, NT, kNmLoads>(p, values, meta, check, x, bias, y, status)
               : nm_rows_of<T, kNmCoupled24, NT, kNmLoads>(p, values, meta, check, x, bias, y, status);
  }
}

// The span kernel: the stream kernel's work for one row a group on 16-bit
// values, each row through span_row when the block finds the format as the
// host planned it (chunks that tile their spans, no bad table entry), else
// through stream_group. Its own kernel so the span path gets the registers it
// needs (inlined into packed_stream_kernel's 64, both paths spilled): up to
// 85 registers, 24 warps an SM, a warp a row. The block is 8 warps when three
// blocks' x fit an SM (1-2 tokens), else 12 (two blocks) or 24 (one), so
// wider x keeps the warps (4 tokens: 16 -> 24 warps).
#ifdef S3_LAB_SPAN_WARPS_PER_SM
constexpr int kSpanWarpsPerSM = S3_LAB_SPAN_WARPS_PER_SM;
#else
constexpr int kSpanWarpsPerSM = 24;
#endif
constexpr int kSpanMaxThreads = kSpanWarpsPerSM * 32;

template <typename T, int P, int NT>
__global__ void __launch_bounds__(kSpanMaxThreads, 1)
packed_span_kernel(const StreamPlan p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                   const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                   const int64_t* __restrict__ elem_off, const T* __restrict__ x, const T* __restrict__ bias,
                   T* __restrict__ y, int* __restrict__ status) {
  using XT = XType<T, NT>;
#ifdef S3_LAB_SPAN_EMPTY
  if (p.K > 0) return;
#endif
  // Launched as a programmatic dependent (p.dependent), the kernel runs from here while the previous kernel
  // ends: it lets the next one start as its own blocks leave, asks L2 for the start of its first row's values (a
  // prefetch brings nothing into this kernel, so a writer of W still running is harmless), then waits for the
  // previous kernel before it reads anything. Launched plainly, trigger and wait are no-ops.
  grid_dependency_trigger();
  if (p.dependent && p.nm_kind != kNmNone) {
    const int32_t q = static_cast<int32_t>(threadIdx.x) / 32 * static_cast<int32_t>(gridDim.x) +
                      static_cast<int32_t>(blockIdx.x);
    const int32_t row_chunks = p.K / 16;
    if (q < p.groups) {
      const uint4* vrow = reinterpret_cast<const uint4*>(values) + static_cast<int64_t>(q) * row_chunks;
      for (int32_t c = static_cast<int32_t>(threadIdx.x) % 32; c < row_chunks && c < 32 * 2 * kNmLoads; c += 32)
        prefetch_l2(vrow + c);
    }
  }
  grid_dependency_wait();
  if constexpr ((P == 2 || P == 4) && NT <= 2) {
    // All warps agree (the tables are the same), so a block leaves together.
    if (p.nm_kind != kNmNone && nm_rows<T, P, NT>(p, values, meta, subsets, block_off, elem_off, x, bias, y, status))
      return;
  }
  S3_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int table_bad, span_bad;
  __shared__ int32_t cmax;
  XT* xs = reinterpret_cast<XT*>(smem);
  const CodeTables t{reinterpret_cast<int2*>(smem + p.smem_entry), reinterpret_cast<int32_t*>(smem + p.smem_col),
                     reinterpret_cast<int32_t*>(smem + p.smem_row), &cmax};
  int32_t* goff = reinterpret_cast<int32_t*>(smem + p.smem_goff);
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) {
    table_bad = 0;
    span_bad = 0;
    cmax = 0;
  }
  FormatPtrs fmt;
  const int tbad = stream_prologue<T, P, NT>(p, subsets, block_off, elem_off, x, status, smem, xs, t, &table_bad, &fmt);
  constexpr int C = chunk_scopes<T, P>();
  bool span = false;
  if (tbad == 0) {
    span = spans_tile(p, p.span_L, fmt.block_off, fmt.elem_off, C, reinterpret_cast<int32_t*>(smem + p.smem_hits),
                      &span_bad);
    if (span) build_span_offsets<P>(p, t, C, static_cast<int32_t>(NT * sizeof(XT)), goff);
  }
  const int lane = tid % 32, warp = tid / 32;
  const int32_t step = static_cast<int32_t>(blockDim.x / 32 * gridDim.x);
  for (int32_t q = warp * static_cast<int32_t>(gridDim.x) + static_cast<int32_t>(blockIdx.x); q < p.groups;
       q += step) {
    RowAcc<NT, true> ra;
    ra.flush(nullptr, 0);
#ifdef S3_LAB_SPAN_NO_ROWS
    const int bad = 0;
#else
    const int bad = span ? (span_row<T, P, NT>(p, values, meta, goff, xs, q, lane, ra.acc) ? p.bad_code : 0)
                         : stream_group<T, P, NT, true>(p, values, meta, t, xs, q, lane, 32, ra, nullptr);
#endif
    finish_row<T, NT>(p, ra.acc, bad, tbad, lane, q, bias, y, status);
  }
}

// The in-group scope grid as at most two dims (n1 scopes a run, stride s1;
// runs at stride s0), or false. The group's Sg scopes are the trailing
// scope-grid dims (the outermost of them possibly split).
inline bool in_group_grid(const PackedGeometry& g, int64_t Sg, StreamPlan* p) {
  int64_t shape[2] = {1, 1}, stride[2] = {0, 0};
  int n = 0;
  int64_t prod = 1;
  int d = g.ndim - 1;
  // What is left of the scope grid outside a group: (size, stride) of its dims.
  int n_outer = 0;
  int64_t outer_stride = 0;
  for (; d >= 0 && prod < Sg; --d) {
    const int64_t size = g.scope_shape[d];
    if (size == 1) continue;
    if (n == 2) return false;
    if (prod * size <= Sg) {
      shape[n] = size;
      stride[n] = g.scope_stride[d];
      prod *= size;
    } else {
      if (Sg % prod != 0 || size % (Sg / prod) != 0) return false;
      const int64_t m = Sg / prod;
      shape[n] = m;
      stride[n] = g.scope_stride[d];
      prod = Sg;
      n_outer = 1;
      outer_stride = g.scope_stride[d] * m;
    }
    ++n;
  }
  if (prod != Sg) return false;
  for (; d >= 0; --d) {
    if (g.scope_shape[d] == 1) continue;
    ++n_outer;
    outer_stride = g.scope_stride[d];
  }
  // Group q's origin: q * origin_step when the groups form one grid dim, else
  // scope_base (a few divisions a group).
  p->origin_affine = n_outer <= 1 && outer_stride > -kInt32Safe && outer_stride < kInt32Safe;
  p->origin_step = static_cast<int32_t>(p->origin_affine ? outer_stride : 0);
  for (int i = 0; i < 2; ++i) {
    if (stride[i] <= -kInt32Safe || stride[i] >= kInt32Safe) return false;
  }
  p->n1 = static_cast<int32_t>(n == 0 ? 1 : shape[0]);
  p->s1 = static_cast<int32_t>(stride[0]);
  p->s0 = static_cast<int32_t>(n == 2 ? stride[1] : 0);
  const int64_t r = floor_div(stride[0], g.K);
  p->s1_r = static_cast<int32_t>(r);
  p->s1_c = static_cast<int32_t>(stride[0] - r * g.K);
  return true;
}

// Span geometry as far as the host can tell: the columns L of a chunk's span
// when there is one row a group, chunk c of a row lies at columns [c L, c L + L)
// (its scopes s1 apart in one run of the row) and a span is whole 16-byte
// words of T; else 0. The device checks the tiling itself (spans_tile).
template <typename T>
int64_t span_columns(const PackedGeometry& g, const StreamPlan& p) {
  const int64_t P = g.nnz * g.B;
  const int64_t C = P * static_cast<int64_t>(sizeof(T)) >= 16 ? 1 : 16 / (P * static_cast<int64_t>(sizeof(T)));
  const int64_t L = C * g.G * g.B;
  // A chunk is a whole run of the in-group grid (next chunk s0 on) or a part
  // of one (next chunk C * s1 on, runs back to back).
  const bool steps = p.n1 == C ? (p.Sg == C || p.s0 == L)
                               : (C * p.s1 == L && (p.n1 == p.Sg || p.s0 == int64_t(p.n1) * p.s1));
  const bool span = g.row_group == 1 && p.s1_r == 0 && steps && int64_t(p.Sg / C) * L == g.K && p.origin_affine &&
                    p.origin_step == g.K && (L * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  return span ? L : 0;
}

// Launches a packed_linear kernel of the common signature (plan, values, meta,
// subsets, block_off, elem_off, x, bias, y, status): the stream and tensor-core kernels.
template <typename T, typename Kernel, typename Plan>
void launch_linear_kernel(Kernel kernel, const Plan& plan, unsigned blocks, int threads, int64_t smem,
                          cudaStream_t stream, const at::Tensor& values, const at::Tensor& meta,
                          const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                          const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                          at::Tensor& y, int* status, bool dependent = false) {
  launch_maybe_dependent(kernel, dim3(blocks), dim3(static_cast<unsigned>(threads)), smem, stream, dependent, plan,
                         values.const_data_ptr<T>(), meta.const_data_ptr<int32_t>(),
                         subsets.has_value() ? subsets->const_data_ptr<int32_t>() : nullptr,
                         block_off.const_data_ptr<int64_t>(), elem_off.const_data_ptr<int64_t>(), x2.const_data_ptr<T>(),
                         bias.has_value() ? bias->const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int P, int NT, bool ROW1>
void launch_kernel(const StreamPlan& p, const at::Tensor& values, const at::Tensor& meta,
                   const std::optional<at::Tensor>& subsets, const at::Tensor& block_off, const at::Tensor& elem_off,
                   const at::Tensor& x2, const std::optional<at::Tensor>& bias, at::Tensor& y, int* status,
                   cudaStream_t stream) {
  if constexpr (ROW1 && sizeof(T) == 2 && chunk_scopes<T, P>() * P * sizeof(T) == 16) {
    if (p.span_L > 0) {
      auto kernel = packed_span_kernel<T, P, NT>;
      StreamPlan plan = p;
      plan.dependent = launch_as_dependent();
      allow_shared<packed_span_kernel<T, P, NT>>(p.smem_total);
      const int64_t per_sm =
          std::max<int64_t>(1, std::min<int64_t>(kSpanWarpsPerSM / 8, (220 * 1024) / (p.smem_total + 1024)));
      const int64_t warps = kSpanWarpsPerSM / per_sm;
      const int64_t want = ceil_div(int64_t(p.groups), warps);
      const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(want, multiprocessors() * per_sm)));
      launch_linear_kernel<T>(kernel, plan, blocks, static_cast<int>(warps * 32), p.smem_total, stream, values, meta,
                              subsets, block_off, elem_off, x2, bias, y, status, plan.dependent);
      return;
    }
  }
  auto kernel = packed_stream_kernel<T, P, NT, ROW1>;
  allow_shared<packed_stream_kernel<T, P, NT, ROW1>>(p.smem_total);
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(2, (220 * 1024) / (p.smem_total + 1024)));
  const int64_t slots = multiprocessors() * per_sm;
  const int64_t want = p.groups;  // ROW1: fewer rows a block, spread evenly over the SMs
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(want, slots)));
  launch_linear_kernel<T>(kernel, p, blocks, kThreads, p.smem_total, stream, values, meta, subsets, block_off, elem_off,
                          x2, bias, y, status);
}

template <typename T, int P, bool ROW1>
void launch_tokens(const StreamPlan& p, const at::Tensor& values, const at::Tensor& meta,
                   const std::optional<at::Tensor>& subsets, const at::Tensor& block_off, const at::Tensor& elem_off,
                   const at::Tensor& x2, const std::optional<at::Tensor>& bias, at::Tensor& y, int* status,
                   cudaStream_t stream) {
  if (p.N == 1) {
    launch_kernel<T, P, 1, ROW1>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else if (p.N == 2) {
    launch_kernel<T, P, 2, ROW1>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else if (p.N <= 4) {
    launch_kernel<T, P, 4, ROW1>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else {
    launch_kernel<T, P, 8, ROW1>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  }
}

// The n:m path of the span kernel (1-2 tokens; 4 tokens measured slower
// than the span path), unless S3SPARSE_PACKED_NM=0 (read once; for
// measurements against the span path).
inline bool nm_path_enabled() {
#ifdef S3_LAB_NM_OFF
  return false;  // lab knob: the span path, for comparison in one process
#endif
  static const bool enabled = [] {
    const char* env = std::getenv("S3SPARSE_PACKED_NM");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

// Token slots the kernel is compiled for (x is staged as (K, NT)).
inline int token_slots(int64_t N) { return N == 1 ? 1 : N == 2 ? 2 : N <= 4 ? 4 : 8; }

}  // namespace stream

// The plan of a stream-shaped kernel (the decode kernel here, the expansion of
// packed_expand.cuh) without its shared-memory layout, or false when the
// pattern is not one it takes: a row_group promise, P = nnz * B values a scope
// in {1, 2, 4, 8} (one row a group) or {4, 8, 16}, subsets or one index a
// scope, at most two in-group scope dims, 32-bit offsets, whole 16-byte chunks.
// Sets tables_bytes (the code tables).
template <typename T>
bool plan_stream_geometry(const PackedGeometry& g, const at::Tensor& values, const std::optional<at::Tensor>& subsets,
                          stream::StreamPlan* out, int64_t* tables_bytes) {
  using namespace stream;
  if (g.row_group <= 0 || g.M == 0 || g.K == 0) return false;
  const int64_t P = g.nnz * g.B;
  const bool row1 = g.row_group == 1;
  const bool p_ok = row1 ? (P == 1 || P == 2 || P == 4 || P == 8) : (P == 4 || P == 8 || P == 16);
  if (!p_ok) return false;
  if (!subsets.has_value() && g.nnz != 1) return false;  // one block index a scope, used as its code
  if (g.M * g.K >= kInt32Safe || g.S * P >= kInt32Safe || g.n_fields >= kInt32Safe) return false;
  if (g.M >= kRowClamp) return false;  // (a clamped row must stay outside W: K = 1 allows M up to 2^30)
  int64_t lo = 0, hi = 0;
  g.scope_base_range(&lo, &hi);
  if (lo < 0 || hi >= kInt32Safe) return false;
  const int64_t groups = g.M / g.row_group;
  if (groups == 0 || g.S % groups != 0) return false;
  const int64_t Sg = g.S / groups;
  StreamPlan p;
  p.g = g;
  if (!in_group_grid(g, Sg, &p)) return false;
  const int64_t C = P * static_cast<int64_t>(sizeof(T)) >= 16 ? 1 : 16 / (P * static_cast<int64_t>(sizeof(T)));
  if (Sg % C != 0 || p.n1 % C != 0) return false;
  if (reinterpret_cast<uintptr_t>(values.const_data_ptr<T>()) % 16 != 0) return false;
  p.n_codes = static_cast<int32_t>(subsets.has_value() ? g.n_codes : g.G);
  p.n_sub = static_cast<int32_t>(subsets.has_value() ? g.n_codes * g.nnz : 0);
  const int64_t entries = int64_t(p.n_codes) * P;
  *tables_bytes = 8 * entries + 4 * entries + ceil_div(4 * int64_t(p.n_codes), 16) * 16;
  if (*tables_bytes > 48 * 1024) return false;
  p.M = static_cast<int32_t>(g.M);
  p.K = static_cast<int32_t>(g.K);
  p.R = static_cast<int32_t>(g.row_group);
  p.groups = static_cast<int32_t>(groups);
  p.Sg = static_cast<int32_t>(Sg);
  p.bits = g.meta_bits;
  p.per_word = g.per_word;
  p.field_mask = g.meta_bits >= 32 ? 0xFFFFFFFFu : ((1u << g.meta_bits) - 1u);
  p.bad_code = subsets.has_value() ? kPackedBadCode : kPackedBadIndex;
  p.div_n1 = FastDivmod(static_cast<uint32_t>(p.n1));
  p.div_K = FastDivmod(static_cast<uint32_t>(g.K));
  p.div_per_word = FastDivmod(static_cast<uint32_t>(g.per_word));
  *out = p;
  return true;
}

template <typename T>
bool launch_packed_stream(const PackedGeometry& g, int64_t N, const at::Tensor& values, const at::Tensor& meta,
                          const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                          const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                          at::Tensor& y, int* status, cudaStream_t stream) {
  using namespace stream;
  if (N < 1 || N > kMaxStreamTokens) return false;
  StreamPlan p;
  int64_t tables_bytes = 0;
  if (!plan_stream_geometry<T>(g, values, subsets, &p, &tables_bytes)) return false;
  const int64_t P = g.nnz * g.B;
  const bool row1 = g.row_group == 1;
  const int64_t entries = int64_t(p.n_codes) * P;
  const int nt = token_slots(N);
  const int64_t x_elem = nt <= 2 ? 4 : static_cast<int64_t>(sizeof(T));  // XType
  const int64_t x_bytes = ceil_div((g.K + g.K / 16 + 1) * nt * x_elem, 16) * 16;  // x_slot padding
  const int64_t sums_bytes = row1 ? 0 : 4 * g.row_group * nt;
  if (x_bytes + tables_bytes + sums_bytes > kMaxSmem) return false;
  p.N = static_cast<int32_t>(N);
  p.x_vec = g.K % (16 / static_cast<int64_t>(sizeof(T))) == 0 &&
            reinterpret_cast<uintptr_t>(x2.const_data_ptr<T>()) % 16 == 0;
  p.smem_entry = static_cast<int32_t>(x_bytes);                        // int2 (n_codes, P)
  p.smem_col = static_cast<int32_t>(x_bytes + 8 * entries);             // int32 (n_codes, P), 16-byte aligned
  p.smem_row = static_cast<int32_t>(x_bytes + 12 * entries);            // int32 (n_codes)
  p.smem_sums = static_cast<int32_t>(x_bytes + tables_bytes);
  p.smem_total = static_cast<int32_t>(x_bytes + tables_bytes + sums_bytes);
  if (sizeof(T) == 2 && row1) {
    // The span path (span_row): a chunk's fields within 32 bits, an offset
    // table of at most 16 KiB.
    const int64_t L = span_columns<T>(g, p);
    const int64_t C = 16 / (P * static_cast<int64_t>(sizeof(T)));
    const int64_t rows = int64_t(1) << std::min<int64_t>(g.meta_bits, 30);
    const int64_t goff_bytes = C * rows * P * 4;
    const int64_t at = ceil_div(int64_t(p.smem_total), 16) * 16;
    if (L > 0 && L % 16 == 0 && C * g.meta_bits <= 32 && g.meta_bits < 32 && goff_bytes <= 16 * 1024 &&
        at + goff_bytes + 4 * L <= kMaxSmem) {
      p.span_L = static_cast<int32_t>(L);
      p.goff_rows = static_cast<int32_t>(rows);
      p.used_bits = g.per_word * g.meta_bits;
      p.used_mask = p.used_bits >= 32 ? 0xFFFFFFFFu : ((1u << p.used_bits) - 1u);
      p.smem_goff = static_cast<int32_t>(at);
      p.smem_hits = static_cast<int32_t>(at + goff_bytes);
      p.smem_total = static_cast<int32_t>(at + goff_bytes + 4 * L);
    }
  }
  if (p.span_L == 16 && N <= 2 && nm_path_enabled() && subsets.has_value() && g.n_codes == kNmCodes &&
      g.nnz == 2 && g.G == 4 && g.meta_bits == 3 && p.x_vec) {
    // The n:m path's kinds by the integers; the kernel checks the tables.
    if (P == 2 && g.B == 1 && p.s1_c == 4) p.nm_kind = kNm24;
    if (P == 4 && g.B == 2 && p.s1_c == 8) p.nm_kind = kNmPairs48;
    if (P == 4 && g.B == 2 && p.s1_c == 4) p.nm_kind = kNmCoupled24;
  }
  const int64_t format_bytes = format_copy_bytes(p);
  if (format_bytes > 0 && p.smem_total + format_bytes <= kMaxSmem) {
    p.smem_format = static_cast<int32_t>(ceil_div(int64_t(p.smem_total), 16) * 16);
    p.smem_total = static_cast<int32_t>(p.smem_format + format_bytes);
  }
  dispatch_values_a_scope(P, row1, [&]<int kP, bool kRow1>() {
    launch_tokens<T, kP, kRow1>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  });
  return true;
}
#endif  // S3SPARSE_PACKED_STREAM_IMPL

}  // namespace packed_cuda
}  // namespace s3sparse
