// The expansion kernel of packed_linear's large-batch path: the packed weight
// written out as a dense W (M, K) in a workspace, which one cuBLAS GEMM then
// multiplies. Same patterns as the stream decode kernel (packed_stream.cuh:
// a row_group promise, a fixed number of values a scope, a short code table),
// the same chunks of 16-byte value loads and the same code tables.
//
// Why not the general scatter kernel (packed.cu): it spends 64-bit divisions
// on every value and needs W zeroed first; on the H200 it took about 200 us
// for a 2560x9728 fp16 layer, ten times the GEMM at 64 tokens. Here the
// threads that own a row group write every element of its rows, so W needs no
// memset:
//   - span mode (one row a group, and each chunk's scopes tile L consecutive
//     columns, chunk c of a row at columns [c L, c L + L): 2:4, 4:8, coupled
//     2:4): W is the chunks' spans back to back, so the whole grid strides
//     over chunks, a warp 32 consecutive ones; a lane builds a chunk's span
//     in the warp's shared region (zeros, then the kept values at their
//     code's columns) and the warp stores the region as contiguous 16-byte
//     words;
//   - otherwise the group's rows are zeroed, then its kept values written
//     (16-byte stores for a scope whose values are one aligned run of a row,
//     as the blocks of block16-rows).
// Whether the chunks tile their span is checked in every block from block_off
// and elem_off (the host does not read them). Bad data is skipped and its bits
// go to the status word, as everywhere.
#pragma once

#include "cuda/packed_stream.cuh"

namespace s3sparse {
namespace packed_cuda {

// Expands into w (M, K) (uninitialised on entry, contiguous) and returns true,
// or returns false without launching when the pattern is not one the kernel
// takes. Instantiated with launch_packed_stream in packed_stream_<dtype>.cu.
template <typename T>
bool launch_packed_expand(const PackedGeometry& g, const at::Tensor& values, const at::Tensor& meta,
                          const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                          const at::Tensor& elem_off, at::Tensor& w, int* status, cudaStream_t stream);

#ifdef S3SPARSE_PACKED_STREAM_IMPL
namespace expand {

using stream::CodeTables;
using stream::StreamPlan;
using stream::chunk_scopes;
using stream::kThreads;
using stream::kWarps;

constexpr int kMaxSpanBytes = 64;  // span mode: a lane's staged span

struct ExpandPlan {
  StreamPlan s;
  bool span = false;        // span mode may apply (the device checks the tiling)
  int32_t L = 0;            // span columns (C * G * B)
  int32_t span_bytes = 0;   // L * sizeof(T), a multiple of 16
  bool zero_vec = false;    // a group's rows can be zeroed with 16-byte stores
  int32_t smem_runs = 0, smem_hits = 0, smem_stage = 0;
};

// The C codes of chunk cu of the group whose first scope is s_first.
template <int C>
__device__ __forceinline__ void chunk_codes(const StreamPlan& p, const int32_t* __restrict__ meta, uint32_t s_first,
                                            int32_t cu, uint32_t (&code)[C]) {
  const uint32_t f = s_first + static_cast<uint32_t>(cu) * C;
  const uint32_t word = p.div_per_word.div(f);
  const uint32_t slot = f - word * static_cast<uint32_t>(p.per_word);
  const uint32_t w0 = static_cast<uint32_t>(ldg(meta + word));
  const uint32_t w1 =
      (C > 1 && slot + C > static_cast<uint32_t>(p.per_word)) ? static_cast<uint32_t>(ldg(meta + word + 1)) : 0u;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t sl = slot + k;
    const bool first = sl < static_cast<uint32_t>(p.per_word);
    const uint32_t wd = first ? w0 : w1;
    const uint32_t sh = (first ? sl : sl - p.per_word) * p.bits;
    code[k] = p.bits >= 32 ? wd : (wd >> sh) & p.field_mask;
  }
}

// Span mode over the whole weight: chunk gc (of every row, in order) holds
// values gc * C * P.., meta fields gc * C.. and becomes W's elements
// [gc * L, gc * L + L). The lanes of a warp take 32 consecutive chunks, so a
// warp writes one contiguous stretch of W: each lane builds its chunk's span
// in the warp's shared region (zeros, then the kept values at their code's
// columns), and the warp stores the region as whole 512-byte rows of 16-byte
// words (a lane storing its own span wrote half sectors: two stores for every
// 32-byte sector). kUnroll chunks a lane are loaded before any is written.
template <typename T, int P>
__device__ inline int expand_spans(const ExpandPlan& e, const T* __restrict__ values, const int32_t* __restrict__ meta,
                                   const CodeTables& t, int32_t warp_rank, int32_t team, int lane,
                                   unsigned char* region, T* __restrict__ w) {
  const StreamPlan& p = e.s;
  constexpr int C = chunk_scopes<T, P>();
  constexpr int CP = C * P;
  constexpr int NV = CP * static_cast<int>(sizeof(T)) / 16;
  constexpr int kUnroll = 4;
  const int32_t total = p.groups * (p.Sg / C);
  const uint4* vbase = reinterpret_cast<const uint4*>(values);
  const int n16 = e.span_bytes / 16;   // 16-byte words a span
  uint4* region16 = reinterpret_cast<uint4*>(region);
  T* span = reinterpret_cast<T*>(region + lane * e.span_bytes);
  uint4* w16 = reinterpret_cast<uint4*>(w);
  int bad = 0;
  // warp_rank: the warp's first chunk; the loop bounds are the warp's, so every
  // lane reaches every __syncwarp.
  for (int32_t cw0 = warp_rank; cw0 < total; cw0 += team * kUnroll) {
    uint4 raw[kUnroll][NV];
    uint32_t code[kUnroll][C];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int32_t c = cw0 + u * team + lane;
      if (c < total) {
#pragma unroll
        for (int v = 0; v < NV; ++v) raw[u][v] = ldg(vbase + static_cast<int64_t>(c) * NV + v);
        chunk_codes<C>(p, meta, 0u, c, code[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int32_t cw = cw0 + u * team;  // the warp's first chunk of this step
      if (cw >= total) break;             // the same for every lane
      for (int i = lane; i < 32 * n16; i += 32) region16[i] = uint4{0u, 0u, 0u, 0u};
      __syncwarp();
      if (cw + lane < total) {
        T vals[CP];
        std::memcpy(vals, raw[u], CP * sizeof(T));
#pragma unroll
        for (int k = 0; k < C; ++k) {
          // A code outside the table or with a bad subset entry: its values are
          // skipped (the span keeps zeros) and the status says why.
          if (code[u][k] >= static_cast<uint32_t>(p.n_codes)) {
            bad |= p.bad_code;
            continue;
          }
          if (t.row[code[u][k]] != 0) {
            bad |= kPackedBadIndex;
            continue;
          }
          int32_t cols[P];
          stream::load_cols<P>(t.col, code[u][k], cols);
#pragma unroll
          for (int v = 0; v < P; ++v) span[k * p.s1_c + cols[v]] = vals[k * P + v];
        }
      }
      __syncwarp();
      for (int i = lane; i < 32 * n16; i += 32) {
        if (cw + i / n16 < total) w16[static_cast<int64_t>(cw) * n16 + i] = region16[i];
      }
      __syncwarp();  // the region is zeroed again next step
    }
  }
  return bad;
}

// The general mode for the threads (rank of team) that own group q: the
// group's rows zeroed, a barrier (`sync`), then every kept value written
// through every check.
template <typename T, int P, bool ROW1>
__device__ inline int expand_group_scatter(const ExpandPlan& e, const T* __restrict__ values,
                                           const int32_t* __restrict__ meta, const CodeTables& t,
                                           const int32_t* runs, int32_t q, int rank, int team, T* __restrict__ w) {
  const StreamPlan& p = e.s;
  constexpr int C = chunk_scopes<T, P>();
  constexpr int CP = C * P;
  constexpr int NV = CP * static_cast<int>(sizeof(T)) / 16;
  const int32_t K = p.K;
  const int32_t row_lo = q * p.R;
  {
    T* rows = w + static_cast<int64_t>(row_lo) * K;
    const int32_t n = p.R * K;
    if (e.zero_vec) {  // the group's rows as 16-byte words
      uint4* rows16 = reinterpret_cast<uint4*>(rows);
      for (int32_t i = rank; i < n / (16 / static_cast<int32_t>(sizeof(T))); i += team) rows16[i] = uint4{0u, 0u, 0u, 0u};
    } else {
      for (int32_t i = rank; i < n; i += team) rows[i] = T(0.f);
    }
  }
  if (ROW1) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  const uint32_t s_first = static_cast<uint32_t>(q) * static_cast<uint32_t>(p.Sg);
  const int32_t origin = p.origin_affine ? q * p.origin_step
                                         : static_cast<int32_t>(p.g.scope_base(static_cast<int64_t>(s_first)));
  const int32_t chunks = p.Sg / C;
  const uint4* vbase = reinterpret_cast<const uint4*>(values) + static_cast<int64_t>(s_first) / C * NV;
  int bad = 0;
  for (int32_t c = rank; c < chunks; c += team) {
    uint4 raw[NV];
#pragma unroll
    for (int v = 0; v < NV; ++v) raw[v] = ldg(vbase + static_cast<int64_t>(c) * NV + v);
    uint32_t code[C];
    chunk_codes<C>(p, meta, s_first, c, code);
    T vals[CP];
    std::memcpy(vals, raw, CP * sizeof(T));
    int32_t rb, cb;  // the chunk's first scope origin
    stream::scope_origin(p, origin, static_cast<uint32_t>(c) * C, &rb, &cb);
#pragma unroll
    for (int k = 0; k < C; ++k) {
      if (k > 0) stream::next_scope(p, &rb, &cb);
      if (code[k] >= static_cast<uint32_t>(p.n_codes)) {
        bad |= p.bad_code;
        continue;
      }
      if constexpr ((P * sizeof(T)) % 16 == 0) {
        // One aligned run of a row inside the group: 16-byte stores.
        if (runs[code[k]]) {
          const int2 o = t.entry[code[k] * P];
          const int32_t col = cb + o.x, row = rb + o.y;
          const int64_t f = static_cast<int64_t>(row) * K + col;
          if (col + P <= K && static_cast<uint32_t>(row - row_lo) < static_cast<uint32_t>(p.R) &&
              (f * static_cast<int64_t>(sizeof(T))) % 16 == 0) {
            uint4* dst = reinterpret_cast<uint4*>(w + f);
#pragma unroll
            for (int i = 0; i < P * static_cast<int>(sizeof(T)) / 16; ++i) {
              uint4 v16;
              std::memcpy(&v16, vals + k * P + i * (16 / sizeof(T)), 16);
              dst[i] = v16;
            }
            continue;
          }
        }
      }
      for (int v = 0; v < P; ++v) {
        const int2 o = t.entry[code[k] * P + v];
        int32_t col = cb + o.x;
        int32_t row = rb + o.y;
        if (col >= K) {
          col -= K;
          ++row;
        }
        if (o.y == kRowBadEntry) {  // a bad subset entry (the table build reported it)
          bad |= kPackedBadIndex;
          continue;
        }
        if (static_cast<uint32_t>(row - row_lo) >= static_cast<uint32_t>(p.R)) {
          bad |= (row < 0 || row >= p.M) ? kPackedBadOffset : kPackedBadGroup;
          continue;
        }
        w[static_cast<int64_t>(row) * K + col] = vals[k * P + v];
      }
    }
  }
  return bad;
}

template <typename T, int P, bool ROW1>
__global__ void __launch_bounds__(kThreads, 2)
packed_expand_kernel(const ExpandPlan e, const T* __restrict__ values, const int32_t* __restrict__ meta,
                     const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                     const int64_t* __restrict__ elem_off, T* __restrict__ w, int* __restrict__ status) {
  S3_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int table_bad, span_bad;
  __shared__ int32_t cmax;
  const StreamPlan& p = e.s;
  const CodeTables t{reinterpret_cast<int2*>(smem + p.smem_entry), reinterpret_cast<int32_t*>(smem + p.smem_col),
                     reinterpret_cast<int32_t*>(smem + p.smem_row), &cmax};
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) {
    table_bad = 0;
    span_bad = 0;
    cmax = 0;
  }
  __syncthreads();
  stream::block_code_tables<P>(p, subsets, block_off, elem_off, t, &table_bad);
  // runs[c]: code c's values are one run of consecutive columns of one row.
  int32_t* runs = reinterpret_cast<int32_t*>(smem + e.smem_runs);
  for (int32_t c = tid; c < p.n_codes; c += kThreads) {
    bool run = t.row[c] != kRowClamp;
    for (int v = 1; v < P && run; ++v) run = t.col[c * P + v] == t.col[c * P] + v;
    runs[c] = run ? 1 : 0;
  }
  __syncthreads();
  bool span = false;
  if (ROW1 && e.span) {
    span = stream::spans_tile(e.s, e.L, block_off, elem_off, chunk_scopes<T, P>(), reinterpret_cast<int32_t*>(smem + e.smem_hits),
                      &span_bad);
  }
  int bad = table_bad;
  if (span) {
    const int lane = tid % 32, warp = tid / 32;
    unsigned char* region = smem + e.smem_stage + warp * 32 * e.span_bytes;
    const int32_t team = static_cast<int32_t>(gridDim.x) * kThreads;
    bad |= expand_spans<T, P>(e, values, meta, t, static_cast<int32_t>(blockIdx.x) * kThreads + warp * 32, team, lane,
                              region, w);
  } else if constexpr (ROW1) {
    const int lane = tid % 32, warp = tid / 32;
    const int32_t step = kWarps * static_cast<int32_t>(gridDim.x);
    for (int32_t q = warp * static_cast<int32_t>(gridDim.x) + static_cast<int32_t>(blockIdx.x); q < p.groups;
         q += step) {
      bad |= expand_group_scatter<T, P, true>(e, values, meta, t, runs, q, lane, 32, w);
    }
  } else {
    for (int32_t q = static_cast<int32_t>(blockIdx.x); q < p.groups; q += static_cast<int32_t>(gridDim.x)) {
      bad |= expand_group_scatter<T, P, false>(e, values, meta, t, runs, q, tid, kThreads, w);
      __syncthreads();  // the next group's zeroing never races this group's writes
    }
  }
  if (bad && status != nullptr) atomicOr(status, bad);
}

template <typename T, int P, bool ROW1>
void launch_expand_kernel(const ExpandPlan& e, const at::Tensor& values, const at::Tensor& meta,
                          const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                          const at::Tensor& elem_off, at::Tensor& w, int* status, cudaStream_t stream) {
  auto kernel = packed_expand_kernel<T, P, ROW1>;
  allow_shared<packed_expand_kernel<T, P, ROW1>>(e.s.smem_total);
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(2, (220 * 1024) / (e.s.smem_total + 1024)));
  const int64_t slots = multiprocessors() * per_sm;
  // Span mode strides the grid over chunks; otherwise a warp (one row a group)
  // or a block owns a group.
  const int64_t want = e.span  ? ceil_div(int64_t(e.s.groups) * (e.s.Sg / chunk_scopes<T, P>()), kThreads)
                       : ROW1 ? ceil_div(e.s.groups, kWarps)
                              : e.s.groups;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(want, slots)));
  S3_LAUNCH(blocks, kThreads, e.s.smem_total, stream, kernel)(
      e, values.const_data_ptr<T>(), meta.const_data_ptr<int32_t>(),
      subsets.has_value() ? subsets->const_data_ptr<int32_t>() : nullptr, block_off.const_data_ptr<int64_t>(),
      elem_off.const_data_ptr<int64_t>(), w.mutable_data_ptr<T>(), status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Span mode, as far as the host can tell (sets e->span, L, span_bytes): one
// row a group, chunk c of a row at column c * L (its scopes s1 apart in one
// run of the row), every span whole 16-byte stores. The device checks the
// tiling itself (spans_tile).
template <typename T>
void plan_spans(const PackedGeometry& g, ExpandPlan* e) {
  const int64_t L = stream::span_columns<T>(g, e->s);
  e->span = L > 0 && L * static_cast<int64_t>(sizeof(T)) <= kMaxSpanBytes;
  e->L = static_cast<int32_t>(e->span ? L : 0);
  e->span_bytes = static_cast<int32_t>(e->span ? L * static_cast<int64_t>(sizeof(T)) : 0);
}

}  // namespace expand

template <typename T>
bool launch_packed_expand(const PackedGeometry& g, const at::Tensor& values, const at::Tensor& meta,
                          const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                          const at::Tensor& elem_off, at::Tensor& w, int* status, cudaStream_t stream) {
  using namespace expand;
  ExpandPlan e;
  int64_t tables_bytes = 0;
  if (!plan_stream_geometry<T>(g, values, subsets, &e.s, &tables_bytes)) return false;
  if (reinterpret_cast<uintptr_t>(w.const_data_ptr<T>()) % 16 != 0) return false;
  StreamPlan& p = e.s;
  const int64_t P = g.nnz * g.B;
  const bool row1 = g.row_group == 1;
  plan_spans<T>(g, &e);
  e.zero_vec = (g.K * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const int64_t entries = int64_t(p.n_codes) * P;
  p.smem_entry = 0;
  p.smem_col = static_cast<int32_t>(8 * entries);
  p.smem_row = static_cast<int32_t>(12 * entries);
  e.smem_runs = static_cast<int32_t>(tables_bytes);
  e.smem_hits = static_cast<int32_t>(e.smem_runs + ceil_div(4 * int64_t(p.n_codes), 16) * 16);
  e.smem_stage = static_cast<int32_t>(e.smem_hits + ceil_div(4 * int64_t(e.L), 16) * 16);
  p.smem_total = static_cast<int32_t>(e.smem_stage + int64_t(kThreads) * e.span_bytes);
  dispatch_values_a_scope(P, row1, [&]<int kP, bool kRow1>() {
    launch_expand_kernel<T, kP, kRow1>(e, values, meta, subsets, block_off, elem_off, w, status, stream);
  });
  return true;
}
#endif  // S3SPARSE_PACKED_STREAM_IMPL

}  // namespace packed_cuda
}  // namespace s3sparse
