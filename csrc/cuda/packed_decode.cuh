// The general decode kernels of packed_linear (any pattern with a row_group promise, 1 to
// kMaxTokens tokens; format: csrc/packed.h, semantics: s3sparse/reference.py):
//   rowtile  small row groups: a block's groups decoded into a shared-memory tile of their rows,
//            then multiplied with the tokens (see the kernel);
//   gemv     large groups: one thread block per row group (or a share of one), streaming the
//            group's kept values once with 16-byte loads, decoding meta in registers,
//            accumulating a token's dot product in fp32 registers while consecutive elements
//            stay in one row and flushing it into the group's rows in shared memory; W is never
//            materialised. Split groups add their share into an fp32 workspace that
//   finalize turns into y = (fp32 workspace + bias) in the output dtype.
// The plan is host code here; the kernels and their launchers are compiled once a dtype, in
// packed_decode_<dtype>.cu (S3SPARSE_PACKED_DECODE_IMPL), so the build compiles them in parallel.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>

#include "cuda/launch.cuh"
#include "cuda/packed_common.cuh"
#include "packed.h"

namespace s3sparse {
namespace packed_cuda {
namespace decode {

constexpr int kThreads = 256;
constexpr int kMaxTokens = 16;  // up to this many tokens (rows of x)
constexpr int kUnroll = 4;      // 16-byte loads in flight per thread
// Everything the decode kernels need besides pointers (passed by value).
struct GemvPlan {
  PackedGeometry g;
  FastDivmod div_scope_shape[kMaxPackedScopeDims];
  FastDivmod div_P, div_B, div_K, div_per_word, div_spg;
  int32_t P = 0;                 // values per scope: nnz * B
  int32_t N = 0;                 // tokens
  int32_t R = 0;                 // rows per group
  int64_t scopes_per_group = 0;
  int64_t groups = 0;            // M / R
  // gemv kernel: a group's VEC-value chunks, split over gridDim.y blocks.
  int64_t chunks_per_group = 0;
  int64_t chunks_per_split = 0;
  bool split = false;            // groups split over several blocks (fp32 workspace)
  // rowtile kernel: groups per block (their rows decoded into shared memory).
  int32_t groups_per_block = 0;
  bool base_fast = false;        // every scope base in [0, 2^30): 32-bit divmod by K
  bool x_aligned = false;        // x's rows can be read as 16-byte vectors (with K % (16 / sizeof(T)) == 0)
  int64_t last_shape = 0;        // scope_shape[ndim - 1] (0 when ndim == 0)
  int32_t step_r = 0, step_c = 0;  // scope_stride[ndim - 1] as (rows, cols), cols in [0, K) (base_fast)
  // Shared-memory layout (bytes): the gemv sums (R * kMaxTokens floats) or the
  // rowtile tile, then the int32 tables.
  int32_t smem_ysum = 0, smem_boff = 0, smem_eoff = 0, smem_sub = 0, smem_ctab = 0, smem_total = 0;
  // rowtile with subset codes: a table of every code's P element offsets from
  // its scope's base, as (rows, cols) (one shared load a value).
  bool code_table = false;
};

constexpr int64_t kTileBytes = 64 * 1024;  // rowtile: shared memory for the decoded rows

// The decode plan, or false when the decode kernels do not apply (then W is
// expanded and multiplied by cuBLAS).
inline bool plan_decode(const PackedGeometry& g, int64_t N, const at::Tensor& values, GemvPlan* out) {
  if (g.row_group <= 0 || N < 1 || N > kMaxTokens || g.M == 0 || g.K == 0) return false;
  if (values.scalar_type() == at::kDouble) return false;
  if (g.M * g.K >= kInt32Safe || g.S * g.nnz * g.B >= kInt32Safe || g.S >= kInt32Safe) return false;
  if (g.G >= kInt32Safe || g.n_codes * g.nnz >= kInt32Safe) return false;
  if (g.M >= kRowClamp) return false;  // (a clamped row must stay outside W: K = 1 allows M up to 2^30)
  GemvPlan p;
  p.g = g;
  p.N = static_cast<int32_t>(N);
  p.R = static_cast<int32_t>(g.row_group);
  p.P = static_cast<int32_t>(g.nnz * g.B);
  if (p.P == 0) return false;
  p.groups = g.M / g.row_group;
  p.scopes_per_group = g.S / p.groups;
  p.div_P = FastDivmod(static_cast<uint32_t>(p.P));
  p.div_B = FastDivmod(static_cast<uint32_t>(g.B));
  p.div_K = FastDivmod(static_cast<uint32_t>(g.K));
  p.div_per_word = FastDivmod(static_cast<uint32_t>(g.per_word));
  p.div_spg = FastDivmod(static_cast<uint32_t>(std::max<int64_t>(1, p.scopes_per_group)));
  int64_t lo = 0, hi = 0;
  g.scope_base_range(&lo, &hi);
  p.base_fast = lo >= 0 && hi < kInt32Safe;
  for (int d = 0; d < g.ndim; ++d) {
    if (g.scope_shape[d] <= 0) return false;
    p.div_scope_shape[d] = FastDivmod(static_cast<uint32_t>(g.scope_shape[d]));
  }
  if (g.ndim > 0 && p.base_fast) {
    const int64_t st = g.scope_stride[g.ndim - 1];  // >= 0 here (base_fast)
    p.last_shape = g.scope_shape[g.ndim - 1];
    p.step_r = static_cast<int32_t>(st / g.K);
    p.step_c = static_cast<int32_t>(st % g.K);
  }
  const int64_t tables = 8 * g.G + 8 * g.B + 4 * g.n_codes * g.nnz;
  if (tables > 32 * 1024) return false;
  // rowtile when a group's rows fit the tile: as many groups a block as fit,
  // keeping at least two blocks per SM.
  const int64_t group_bytes = int64_t(g.row_group) * g.K * values.element_size();
  if (group_bytes <= kTileBytes) {
    const int64_t fit = std::min<int64_t>(kTileBytes / group_bytes, std::max<int64_t>(1, 64 / g.row_group));
    const int64_t spread = std::max<int64_t>(1, p.groups / (2 * multiprocessors()));
    p.groups_per_block = static_cast<int32_t>(std::max<int64_t>(1, std::min(fit, spread)));
    const int64_t tile = ceil_div(p.groups_per_block * group_bytes, 16) * 16;
    p.smem_ysum = static_cast<int32_t>(tile);
    p.smem_boff = static_cast<int32_t>(tile + ceil_div(p.groups_per_block * g.row_group * kMaxTokens * 4, 16) * 16);
  } else {
    p.smem_boff = static_cast<int32_t>(int64_t(g.row_group) * kMaxTokens * 4);
  }
  p.smem_eoff = p.smem_boff + static_cast<int32_t>(8 * g.G);
  p.smem_sub = p.smem_eoff + static_cast<int32_t>(8 * g.B);
  p.smem_ctab = p.smem_sub + static_cast<int32_t>(ceil_div(4 * g.n_codes * g.nnz, 16) * 16);
  p.code_table = p.groups_per_block > 0 && g.n_codes > 0 && g.n_codes * p.P <= 2048;
  p.smem_total = p.smem_ctab + (p.code_table ? static_cast<int32_t>(8 * g.n_codes * p.P) : 0);
  *out = p;
  return true;
}

// Launches the general decode kernels (rowtile or gemv, then finalize when groups are split) for
// y (N, M) = x2 (N, K) W^T (+ bias) with a plan from plan_decode. Instantiated for at::Half,
// at::BFloat16 and float in packed_decode_<dtype>.cu.
template <typename T>
void launch_decode(const GemvPlan& p, const at::Tensor& values, const at::Tensor& meta,
                   const std::optional<at::Tensor>& subsets, const at::Tensor& block_off, const at::Tensor& elem_off,
                   const at::Tensor& x2, const std::optional<at::Tensor>& bias, at::Tensor& y, int* status,
                   cudaStream_t stream);

#ifdef S3SPARSE_PACKED_DECODE_IMPL
template <typename T>
__device__ __forceinline__ float load_x(const T* p) {
  return to_float(*p);  // read-only and __restrict__: cached in L1
}

// Where the decode kernels keep their int32 tables in shared memory.
struct SharedTables {
  int32_t* boff;  // (G, 2): block_off as (row, col)
  int32_t* eoff;  // (B, 2): elem_off as (row, col)
  int32_t* sub;   // (n_codes, nnz): subsets, bad entries -1
};
__device__ __forceinline__ SharedTables shared_tables(unsigned char* smem, const GemvPlan& p) {
  return {reinterpret_cast<int32_t*>(smem + p.smem_boff), reinterpret_cast<int32_t*>(smem + p.smem_eoff),
          reinterpret_cast<int32_t*>(smem + p.smem_sub)};
}

// Fill the shared tables (block_off and elem_off as (row, col) pairs, subsets
// with bad entries as -1); returns the status bits of subsets. Ends with a barrier.
__device__ inline int load_tables(const GemvPlan& p, const int32_t* __restrict__ subsets,
                                  const int64_t* __restrict__ block_off, const int64_t* __restrict__ elem_off,
                                  int32_t* boff, int32_t* eoff, int32_t* sub, int32_t* ctab = nullptr) {
  const PackedGeometry& g = p.g;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  int bad = 0;
  for (int i = tid; i < g.G; i += nt) split_offset(block_off[i], g.K, &boff[2 * i], &boff[2 * i + 1]);
  for (int i = tid; i < g.B; i += nt) split_offset(elem_off[i], g.K, &eoff[2 * i], &eoff[2 * i + 1]);
  if (subsets != nullptr) {
    for (int64_t i = tid; i < g.n_codes * g.nnz; i += nt) {
      const int32_t k = subsets[i];
      const bool ok = k >= 0 && k < g.G;
      if (!ok) bad |= kPackedBadIndex;
      sub[i] = ok ? k : -1;
    }
    if (ctab != nullptr) {
      const int32_t P = p.P, B = static_cast<int32_t>(g.B);
      for (int64_t i = tid; i < g.n_codes * P; i += nt) {
        const int64_t code = i / P;
        const int32_t r = static_cast<int32_t>(i - code * P), j = r / B, e = r - j * B;
        const int32_t k = subsets[code * g.nnz + j];
        if (k >= 0 && k < g.G) {
          split_offset(block_off[k] + elem_off[e], g.K, &ctab[2 * i], &ctab[2 * i + 1]);
        } else {
          ctab[2 * i] = kRowClamp;  // never in range: the element is skipped (counted above)
          ctab[2 * i + 1] = 0;
        }
      }
    }
  }
  __syncthreads();
  return bad;
}

// Decodes runs of consecutive values (value index i: scope i / P, kept block
// (i % P) / B, element i % B) into W's (row, col), checking every index, code
// and offset, and that the row lies in [row_lo, row_lo + n_rows) (the rows the
// calling block owns: its row group, or its tile). Bad elements are skipped and
// counted in `bad`. Consecutive scopes along the last scope-grid dim and
// consecutive meta fields are stepped incrementally (no division per value).
struct Decoder {
  const GemvPlan& p;
  const int32_t* __restrict__ meta;
  const int32_t* sub;   // shared copy of subsets, or null
  const int32_t* boff;  // shared (G, 2)
  const int32_t* eoff;  // shared (B, 2)
  int32_t row_lo = 0, n_rows = 0;
  int bad = 0;
  // Current scope / block / element.
  uint32_t s = 0;
  int32_t j = 0, e = 0;
  int64_t last_idx = 0;  // the scope's index along the last scope-grid dim
  const int32_t* kept = nullptr;
  bool scope_ok = false, block_ok = false;
  int32_t base_r = 0, base_c = 0, org_r = 0, org_c = 0;
  // Meta field cursor.
  uint32_t f_word = 0, f_slot = 0, f_loaded = 0xFFFFFFFFu, f_val = 0;

  __device__ Decoder(const GemvPlan& plan, const int32_t* m, const int32_t* su, const int32_t* bo, const int32_t* eo,
                     int32_t lo, int32_t rows)
      : p(plan), meta(m), sub(su), boff(bo), eoff(eo), row_lo(lo), n_rows(rows) {}

  __device__ __forceinline__ void field_seek(uint32_t i) {
    f_word = p.div_per_word.div(i);
    f_slot = i - f_word * static_cast<uint32_t>(p.g.per_word);
  }
  __device__ __forceinline__ uint32_t field_take() {
    if (f_word != f_loaded) {
      f_val = static_cast<uint32_t>(ldg(meta + f_word));
      f_loaded = f_word;
    }
    const int bits = p.g.meta_bits;
    const uint32_t mask = bits >= 32 ? 0xFFFFFFFFu : ((1u << bits) - 1u);
    const uint32_t v = (f_val >> (f_slot * bits)) & mask;
    if (++f_slot == static_cast<uint32_t>(p.g.per_word)) {
      f_slot = 0;
      ++f_word;
    }
    return v;
  }

  // The scope's base from scratch.
  __device__ __forceinline__ void scope_base() {
    const PackedGeometry& g = p.g;
    if (p.base_fast) {
      uint32_t t = s, base = 0;
      // Constant indices only (a dynamic index into the kernel's parameters
      // would copy them to local memory).
#pragma unroll
      for (int d = kMaxPackedScopeDims - 1; d >= 0; --d) {
        if (d >= g.ndim) continue;
        const uint32_t t2 = p.div_scope_shape[d].div(t);
        const uint32_t idx = t - t2 * static_cast<uint32_t>(g.scope_shape[d]);
        if (d == g.ndim - 1) last_idx = idx;
        base += idx * static_cast<uint32_t>(g.scope_stride[d]);
        t = t2;
      }
      const uint32_t r = p.div_K.div(base);
      base_r = static_cast<int32_t>(r);
      base_c = static_cast<int32_t>(base - r * static_cast<uint32_t>(g.K));
    } else {
      split_offset(g.scope_base(s), g.K, &base_r, &base_c);
    }
  }

  // Enter scope s: its kept set (codes) and base. `stepped`: s is the previous scope + 1.
  __device__ __forceinline__ void enter_scope(bool stepped) {
    const PackedGeometry& g = p.g;
    if (stepped && p.base_fast && ++last_idx < p.last_shape) {
      base_r += p.step_r;
      base_c += p.step_c;
      if (base_c >= g.K) {
        base_c -= static_cast<int32_t>(g.K);
        ++base_r;
      }
    } else {
      scope_base();
    }
    scope_ok = true;
    if (sub != nullptr) {
      const uint32_t code = field_take();
      if (code >= static_cast<uint64_t>(g.n_codes)) {
        bad |= kPackedBadCode;
        scope_ok = false;
        return;
      }
      kept = sub + static_cast<int64_t>(code) * g.nnz;
    }
  }

  __device__ __forceinline__ void enter_block() {
    const PackedGeometry& g = p.g;
    block_ok = false;
    int32_t k;
    if (sub != nullptr) {
      if (!scope_ok) return;
      k = kept[j];
      if (k < 0) return;  // a bad subsets entry (counted by load_tables)
    } else {
      const uint32_t idx = field_take();  // read even when skipped: the cursor stays in step
      if (idx >= static_cast<uint32_t>(g.G)) {
        bad |= kPackedBadIndex;
        return;
      }
      k = static_cast<int32_t>(idx);
    }
    org_r = base_r + boff[2 * k];
    org_c = base_c + boff[2 * k + 1];
    if (org_c >= g.K) {
      org_c -= static_cast<int32_t>(g.K);
      ++org_r;
    }
    block_ok = true;
  }

  // Position at value index i.
  __device__ __forceinline__ void seek(uint32_t i) {
    s = p.div_P.div(i);
    const uint32_t r = i - s * static_cast<uint32_t>(p.P);
    j = static_cast<int32_t>(p.div_B.div(r));
    e = static_cast<int32_t>(r) - j * static_cast<int32_t>(p.g.B);
    field_seek(sub != nullptr ? s : s * static_cast<uint32_t>(p.g.nnz) + static_cast<uint32_t>(j));
    enter_scope(false);
    enter_block();
  }

  // (row, col) of element e of the current block (false, counted, when bad).
  __device__ __forceinline__ bool locate_at(int32_t el, int32_t* row, int32_t* col) {
    if (!block_ok) return false;
    return place(org_r + eoff[2 * el], org_c + eoff[2 * el + 1], row, col);
  }

  // (r, c) with c in [0, 2K): wrap c into [0, K); true when the row is one the
  // caller owns, else the bad bit (outside W, or outside the caller's rows).
  __device__ __forceinline__ bool place(int32_t r, int32_t c, int32_t* row, int32_t* col) {
    if (c >= p.g.K) {
      c -= static_cast<int32_t>(p.g.K);
      ++r;
    }
    if (static_cast<uint32_t>(r - row_lo) >= static_cast<uint32_t>(n_rows)) {
      bad |= (r < 0 || r >= p.g.M) ? kPackedBadOffset : kPackedBadGroup;
      return false;
    }
    *row = r;
    *col = c;
    return true;
  }
  __device__ __forceinline__ bool locate(int32_t* row, int32_t* col) { return locate_at(e, row, col); }

  // Step to the next value.
  __device__ __forceinline__ void next() {
    if (++e == p.g.B) {
      e = 0;
      if (++j == p.g.nnz) {
        j = 0;
        ++s;
        enter_scope(true);
      }
      enter_block();
    }
  }
};

// The Decoder of subset codes with a code table (rowtile): a value's offset
// from its scope's base is one shared load, ctab[code][i % P].
struct CodeDecoder : Decoder {
  const int32_t* ctab;       // shared (n_codes, P, 2)
  const int32_t* entry = nullptr;  // the current scope's row of ctab, null for a bad code
  int32_t r = 0;             // value index within the scope

  __device__ CodeDecoder(const GemvPlan& plan, const int32_t* m, const int32_t* ct, int32_t lo, int32_t rows)
      : Decoder(plan, m, nullptr, nullptr, nullptr, lo, rows), ctab(ct) {}

  __device__ __forceinline__ void take_code() {
    const uint32_t code = field_take();
    if (code >= static_cast<uint64_t>(p.g.n_codes)) {
      bad |= kPackedBadCode;
      entry = nullptr;
    } else {
      entry = ctab + 2 * static_cast<int64_t>(code) * p.P;
    }
  }
  __device__ __forceinline__ void seek(uint32_t i) {
    s = p.div_P.div(i);
    r = static_cast<int32_t>(i - s * static_cast<uint32_t>(p.P));
    field_seek(s);
    scope_base();
    take_code();
  }
  __device__ __forceinline__ void next() {
    if (++r == p.P) {
      r = 0;
      ++s;
      if (p.base_fast && ++last_idx < p.last_shape) {
        base_r += p.step_r;
        base_c += p.step_c;
        if (base_c >= p.g.K) {
          base_c -= static_cast<int32_t>(p.g.K);
          ++base_r;
        }
      } else {
        scope_base();
      }
      take_code();
    }
  }
  __device__ __forceinline__ bool locate(int32_t* row, int32_t* col) {
    if (entry == nullptr) return false;
    return place(base_r + entry[2 * r], base_c + entry[2 * r + 1], row, col);
  }
};

// Load VEC consecutive values (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
__device__ __forceinline__ void load_values(const T* __restrict__ src, T (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = ldg(reinterpret_cast<const uint4*>(src));
    std::memcpy(out, &raw, 16);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = src[v];
  }
}

// acc[n] += the dot product of VEC weights w with x's token n at columns col .. col + VEC - 1,
// for the call's N tokens (x row-major with K columns, read as VEC-value vectors).
template <typename T, int VEC, int NT>
__device__ __forceinline__ void dot_tokens(float (&acc)[NT], const T* w, const T* __restrict__ x, int32_t K,
                                           int32_t col, int32_t N) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    if (NT == 1 || n < N) {
      T xv[VEC];
      load_values<T, VEC>(x + static_cast<int64_t>(n) * K + col, xv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[n] += to_float(w[v]) * to_float(xv[v]);
    }
  }
}

// Every thread: chunks c_begin + threadIdx.x, + blockDim.x, ... below c_end
// (VEC consecutive values from value index base + c * VEC), kUnroll loads in
// flight, then fn(vals, value index of vals[0]) for each.
template <typename T, int VEC, typename Fn>
__device__ __forceinline__ void for_each_chunk(const T* __restrict__ values, uint32_t base, int64_t c_begin,
                                               int64_t c_end, Fn&& fn) {
  const int64_t nt = blockDim.x;
  for (int64_t c = c_begin + threadIdx.x; c < c_end; c += nt * kUnroll) {
    T vals[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t cu = c + u * nt;
      if (cu < c_end) load_values<T, VEC>(values + base + static_cast<uint32_t>(cu) * VEC, vals[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t cu = c + u * nt;
      if (cu < c_end) fn(vals[u], base + static_cast<uint32_t>(cu) * VEC);
    }
  }
}

// Scatter the block's kept values into the tile of rows [row0, row0 + rows).
template <typename T, int VEC, typename Dec>
__device__ __forceinline__ int scatter_into_tile(Dec& dec, const T* __restrict__ values, uint32_t v0, int64_t chunks,
                                                 T* tile, int32_t row0, int32_t K) {
  for_each_chunk<T, VEC>(values, v0, 0, chunks, [&](const T* vals, uint32_t i0) {
    dec.seek(i0);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (v > 0) dec.next();
      int32_t row, col;
      if (dec.locate(&row, &col)) tile[static_cast<int64_t>(row - row0) * K + col] = vals[v];
    }
  });
  return dec.bad;
}

// ------------------------------------------------------------------ gemv (decode, large groups)
// One block per row group (gridDim.y blocks per group when groups are few):
// every kept value read once, its dot products with the tokens accumulated in
// registers while consecutive elements stay in one row, flushed into the
// group's sums in shared memory. A chunk that is one run of columns (x_runs)
// reads x with 16-byte loads.
template <typename T, int VEC, int NT>
__global__ void __launch_bounds__(kThreads)
packed_gemv_kernel(const GemvPlan p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                   const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                   const int64_t* __restrict__ elem_off, const T* __restrict__ x, const T* __restrict__ bias,
                   T* __restrict__ y, float* __restrict__ y32, int* __restrict__ status) {
  S3_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int block_bad;
  __shared__ int not_runs;  // elem_off is not 0, 1, ..., B-1 (plus a constant)
  const PackedGeometry& g = p.g;
  float* ys = reinterpret_cast<float*>(smem);
  const SharedTables t = shared_tables(smem, p);
  int32_t *boff = t.boff, *eoff = t.eoff, *sub = t.sub;
  const int tid = static_cast<int>(threadIdx.x);
  const int nt = static_cast<int>(blockDim.x);
  const int32_t K = static_cast<int32_t>(g.K);
  const int32_t N = p.N;
  if (tid == 0) {
    block_bad = 0;
    not_runs = 0;
  }
  for (int i = tid; i < p.R * NT; i += nt) ys[i] = 0.f;
  __syncthreads();
  for (int i = tid; i < g.B; i += nt) {
    if (elem_off[i] != elem_off[0] + i) atomicOr(&not_runs, 1);
  }
  int bad = load_tables(p, subsets, block_off, elem_off, boff, eoff, sub);
  const int64_t q = blockIdx.x;
  const int32_t row0 = static_cast<int32_t>(q * p.R);
  Decoder dec(p, meta, subsets != nullptr ? sub : nullptr, boff, eoff, row0, p.R);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.chunks_per_split;
  const int64_t c1 = std::min(p.chunks_per_group, c0 + p.chunks_per_split);
  const uint32_t vbase = static_cast<uint32_t>(q * p.scopes_per_group * p.P);
  // A chunk lies in one block and its elements are consecutive columns.
  const bool runs = VEC > 1 && !not_runs && p.x_aligned && K % VEC == 0 && g.B % VEC == 0 && p.P % VEC == 0;

  float acc[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n] = 0.f;
  int32_t cur = -1;  // the group-local row acc belongs to
  auto flush = [&]() {
    if (cur >= 0) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (NT == 1 || n < N) atomicAdd(&ys[cur * NT + n], acc[n]);
        acc[n] = 0.f;
      }
    }
  };
  auto use_row = [&](int32_t lr) {
    if (lr != cur) {
      flush();
      cur = lr;
    }
  };

  for_each_chunk<T, VEC>(values, vbase, c0, c1, [&](const T* vals, uint32_t i0) {
    dec.seek(i0);
    int32_t row = 0, col = 0;
    if (runs) {
      // The whole chunk: one block, columns col .. col + VEC - 1 of one row
      // (its last element checked too), x read as 16-byte vectors when aligned.
      if (!dec.locate(&row, &col)) return;
      int32_t row_last = 0, col_last = 0;
      if (!dec.locate_at(dec.e + VEC - 1, &row_last, &col_last)) return;
      use_row(row - row0);
      if (row_last == row && col % VEC == 0) {
        dot_tokens<T, VEC, NT>(acc, vals, x, K, col, N);
        return;
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (v > 0) dec.next();
      if (!dec.locate(&row, &col)) continue;
      use_row(row - row0);
      const float w = to_float(vals[v]);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (NT == 1 || n < N) acc[n] += w * load_x(x + static_cast<int64_t>(n) * K + col);
      }
    }
  });
  flush();
  bad |= dec.bad;
  if (bad) atomicOr(&block_bad, bad);
  __syncthreads();

  const int any_bad = block_bad;
  if (any_bad && tid == 0 && status != nullptr) atomicOr(status, any_bad);
  for (int i = tid; i < p.R * N; i += nt) {
    const int32_t lr = i / N, n = i - lr * N;
    const int64_t out = static_cast<int64_t>(n) * g.M + row0 + lr;
    const float v = any_bad ? NAN : ys[lr * NT + n];
    if (p.split) {
      atomicAdd(&y32[out], v);
    } else {
      y[out] = static_cast<T>(bias != nullptr ? v + to_float(bias[row0 + lr]) : v);
    }
  }
}

// ------------------------------------------------------------------ rowtile (decode, small groups)
// groups_per_block row groups per block whose rows fit in shared memory: the
// kept values are read once and scattered into a zeroed tile of those rows,
// then every warp takes whole rows and multiplies them with the tokens, tile
// and x both read as consecutive 16-byte vectors (coalesced, no gathers).
template <typename T, int VEC, int NT>
__global__ void __launch_bounds__(kThreads)
packed_rowtile_kernel(const GemvPlan p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                      const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                      const int64_t* __restrict__ elem_off, const T* __restrict__ x, const T* __restrict__ bias,
                      T* __restrict__ y, int* __restrict__ status) {
  S3_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int block_bad;
  const PackedGeometry& g = p.g;
  constexpr int kXVec = 16 / sizeof(T);
  T* tile = reinterpret_cast<T*>(smem);
  float* ysum = reinterpret_cast<float*>(smem + p.smem_ysum);  // (rows, NT)
  const SharedTables t = shared_tables(smem, p);
  int32_t *boff = t.boff, *eoff = t.eoff, *sub = t.sub;
  const int tid = static_cast<int>(threadIdx.x);
  const int nt = static_cast<int>(blockDim.x);
  const int32_t K = static_cast<int32_t>(g.K);
  const int32_t N = p.N;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * p.groups_per_block;
  const int64_t q1 = std::min<int64_t>(p.groups, q0 + p.groups_per_block);
  const int32_t row0 = static_cast<int32_t>(q0 * p.R);
  const int32_t rows = static_cast<int32_t>((q1 - q0) * p.R);
  if (tid == 0) block_bad = 0;
  {
    uint4* t4 = reinterpret_cast<uint4*>(smem);
    const int32_t n16 = p.smem_ysum / 16;
    for (int32_t i = tid; i < n16; i += nt) t4[i] = uint4{0u, 0u, 0u, 0u};
  }
  for (int i = tid; i < rows * NT; i += nt) ysum[i] = 0.f;
  int32_t* ctab = p.code_table ? reinterpret_cast<int32_t*>(smem + p.smem_ctab) : nullptr;
  int bad = load_tables(p, subsets, block_off, elem_off, boff, eoff, sub, ctab);
  // Any row of the tile will do (a scope outside its own group but inside the
  // tile still lands on the right element of W); rows outside it are bad data.
  const uint32_t v0 = static_cast<uint32_t>(q0 * p.scopes_per_group * p.P);
  const int64_t chunks = (q1 - q0) * p.scopes_per_group * p.P / VEC;
  if (p.code_table) {
    CodeDecoder dec(p, meta, ctab, row0, rows);
    bad |= scatter_into_tile<T, VEC>(dec, values, v0, chunks, tile, row0, K);
  } else {
    Decoder dec(p, meta, subsets != nullptr ? sub : nullptr, boff, eoff, row0, rows);
    bad |= scatter_into_tile<T, VEC>(dec, values, v0, chunks, tile, row0, K);
  }
  if (bad) atomicOr(&block_bad, bad);
  __syncthreads();
  const int any_bad = block_bad;
  if (any_bad && tid == 0 && status != nullptr) atomicOr(status, any_bad);

  // Row by row, every thread takes column chunks of the row and multiplies
  // them with the tokens (tile and x read as consecutive 16-byte vectors);
  // warps reduce, then add into the row's sums.
  const int lane = tid % 32;
  const bool vec = p.x_aligned && K % kXVec == 0;  // x rows and tile rows 16-byte aligned
  for (int32_t r = 0; r < rows; ++r) {
    const T* trow = tile + static_cast<int64_t>(r) * K;
    float acc[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n] = 0.f;
    if (vec) {
#pragma unroll 2
      for (int32_t col = tid * kXVec; col < K; col += nt * kXVec) {
        T wv[kXVec];
        std::memcpy(wv, trow + col, 16);
        dot_tokens<T, kXVec, NT>(acc, wv, x, K, col, N);
      }
    } else {
      for (int32_t col = tid; col < K; col += nt) {
        const float w = to_float(trow[col]);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          if (NT == 1 || n < N) acc[n] += w * load_x(x + static_cast<int64_t>(n) * K + col);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      float v = acc[n];
      for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0 && (NT == 1 || n < N)) atomicAdd(&ysum[r * NT + n], v);
    }
  }
  __syncthreads();
  for (int i = tid; i < rows * N; i += nt) {
    const int32_t r = i / N, n = i - r * N;
    const int32_t row = row0 + r;
    const float v = ysum[r * NT + n];
    const float out = any_bad ? NAN : (bias != nullptr ? v + to_float(bias[row]) : v);
    y[static_cast<int64_t>(n) * g.M + row] = static_cast<T>(out);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
packed_finalize_kernel(const float* __restrict__ y32, const T* __restrict__ bias, T* __restrict__ y, int64_t M,
                       int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = y32[i];
    y[i] = static_cast<T>(bias != nullptr ? v + to_float(bias[i % M]) : v);
  }
}

template <typename T, int VEC, int NT>
void launch_decode_nt(GemvPlan p, const at::Tensor& values, const at::Tensor& meta,
                      const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                      const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                      at::Tensor& y, int* status, cudaStream_t stream) {
  const int32_t* sub = subsets.has_value() ? subsets->const_data_ptr<int32_t>() : nullptr;
  const T* b = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  if (p.groups_per_block > 0) {
    auto kernel = packed_rowtile_kernel<T, VEC, NT>;
    allow_shared<packed_rowtile_kernel<T, VEC, NT>>(p.smem_total);
    const int64_t blocks = ceil_div(p.groups, p.groups_per_block);
    S3_LAUNCH(static_cast<unsigned>(blocks), kThreads, p.smem_total, stream, kernel)(
        p, values.const_data_ptr<T>(), meta.const_data_ptr<int32_t>(), sub, block_off.const_data_ptr<int64_t>(),
        elem_off.const_data_ptr<int64_t>(), x2.const_data_ptr<T>(), b, y.mutable_data_ptr<T>(), status);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t values_per_group = p.scopes_per_group * p.P;
  p.chunks_per_group = values_per_group / VEC;
  // Split groups over blocks when there are too few to fill the GPU (about 4
  // blocks per SM), never below 2048 values a block.
  const int64_t want_blocks = 4 * multiprocessors();
  int64_t splits = 1;
  if (p.groups < want_blocks) {
    splits = std::min(ceil_div(want_blocks, p.groups), std::max<int64_t>(1, values_per_group / 2048));
  }
  splits = std::min<int64_t>(splits, 65535);
  p.chunks_per_split = std::max<int64_t>(1, ceil_div(p.chunks_per_group, splits));
  splits = std::max<int64_t>(1, ceil_div(p.chunks_per_group, p.chunks_per_split));
  p.split = splits > 1;
  at::Tensor y32;
  if (p.split) y32 = at::zeros({p.N, p.g.M}, x2.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(p.groups), static_cast<unsigned>(splits));
  auto kernel = packed_gemv_kernel<T, VEC, NT>;
  allow_shared<packed_gemv_kernel<T, VEC, NT>>(p.smem_total);
  S3_LAUNCH(grid, kThreads, p.smem_total, stream, kernel)(
      p, values.const_data_ptr<T>(), meta.const_data_ptr<int32_t>(), sub, block_off.const_data_ptr<int64_t>(),
      elem_off.const_data_ptr<int64_t>(), x2.const_data_ptr<T>(), b, y.mutable_data_ptr<T>(),
      p.split ? y32.mutable_data_ptr<float>() : nullptr, status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.split) {
    const int64_t total = p.N * p.g.M;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), 4096));
    S3_LAUNCH(blocks, kThreads, 0, stream, packed_finalize_kernel<T>)(y32.const_data_ptr<float>(), b,
                                                                      y.mutable_data_ptr<T>(), p.g.M, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int VEC>
void launch_decode_vec(const GemvPlan& p, const at::Tensor& values, const at::Tensor& meta,
                       const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                       const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                       at::Tensor& y, int* status, cudaStream_t stream) {
  if (p.N == 1) {
    launch_decode_nt<T, VEC, 1>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else if (p.N <= 4) {
    launch_decode_nt<T, VEC, 4>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else if (p.N <= 8) {
    launch_decode_nt<T, VEC, 8>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else {
    launch_decode_nt<T, VEC, 16>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  }
}

template <typename T>
void launch_decode(const GemvPlan& p, const at::Tensor& values, const at::Tensor& meta,
                   const std::optional<at::Tensor>& subsets, const at::Tensor& block_off, const at::Tensor& elem_off,
                   const at::Tensor& x2, const std::optional<at::Tensor>& bias, at::Tensor& y, int* status,
                   cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // 16-byte loads when the values start 16-byte aligned and every group (or
  // every block's groups) is whole chunks; x rows 16-byte aligned for its
  // vector loads (K a multiple of kVec, checked in the kernels).
  GemvPlan plan = p;
  plan.x_aligned = reinterpret_cast<uintptr_t>(x2.const_data_ptr<T>()) % 16 == 0;
  const bool vec = reinterpret_cast<uintptr_t>(values.const_data_ptr<T>()) % 16 == 0 &&
                   (p.scopes_per_group * p.P) % kVec == 0;
  if (vec) {
    launch_decode_vec<T, kVec>(plan, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else {
    launch_decode_vec<T, 1>(plan, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  }
}
#endif  // S3SPARSE_PACKED_DECODE_IMPL

}  // namespace decode
}  // namespace packed_cuda
}  // namespace s3sparse
