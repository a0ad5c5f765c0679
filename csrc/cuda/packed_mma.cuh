// The tensor-core kernel of packed_linear for 1 to 16 tokens on span patterns
// (one row a group, every 16-byte chunk of values tiling 16 consecutive
// columns of its row: 2:4, 4:8, coupled 2:4), fp16 and bf16.
//
// Why: the stream decode kernel (packed_stream.cuh) does the products on the
// CUDA cores and reads x from shared memory once per kept value and token, so
// its cost grows with the tokens (at 16 tokens it took 3x dense). Here the
// packed values are expanded in shared memory into 16x64 tiles of W and the
// tensor cores multiply them by x, which each warp reads once per tile:
//   - a thread block owns 16 rows of W and all of K; its 8 warps take
//     consecutive 64-column stages of K and sum their partial products in
//     shared memory at the end (no second kernel, no global atomics);
//   - a warp streams its stages through a cp.async pipeline (values, meta
//     words and the x slice of a stage in flight while an earlier stage is
//     expanded and multiplied), so many bytes are in flight per SM;
//   - a lane expands whole chunks: each 32-bit word of W (two columns) is one
//     byte permutation of the scope's values, masked, by a recipe of its code
//     built once a block (no zeroing, no 2-byte scatter: the first version,
//     which wrote zeros then each value at its column, spent 40 of 67 us of a
//     2560x9728 call there);
//   - ldmatrix + mma.m16n8k16 with fp32 accumulators; tokens are the n = 8
//     (or 16) side, unused token slots are zeros.
// The tiling of the spans and the word layout of the scopes are checked in
// every block; a block whose format is not what the host planned for (a
// hand-made format that passes the host's checks) takes a plain per-value loop.
// Bad data is skipped, its rows become NaN and the status word gets the CPU
// kernel's bits, as in every packed kernel.
#pragma once

#include "cuda/packed_expand.cuh"
// (after packed_expand.cuh: under the host emulator, mma.cuh calls runtime.h's collectives)
#include "cuda/mma.cuh"

namespace s3sparse {
namespace packed_cuda {

// y (N, M) = x2 (N, K) W^T (+ bias) for 1 <= N <= 16 on a span pattern, or
// false without launching anything when the kernel does not apply (fp32 and
// fp64, other patterns, a GPU before sm_80). Instantiated in
// packed_stream_<dtype>.cu.
template <typename T>
bool launch_packed_mma(const PackedGeometry& g, int64_t N, const at::Tensor& values, const at::Tensor& meta,
                       const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                       const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                       at::Tensor& y, int* status, cudaStream_t stream);

constexpr int64_t kMmaMaxTokens = 16;  // tokens a launch

#ifdef S3SPARSE_PACKED_STREAM_IMPL
namespace mma {

using expand::ExpandPlan;
using stream::CodeTables;
using stream::StreamPlan;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileRows = 16;                     // rows of a block (the mma's m)
constexpr int kStageCols = 64;                    // columns of a stage
constexpr int kChunkCols = 16;                    // columns of a chunk (its 16 bytes of values)
constexpr int kChunks = kTileRows * kStageCols / kChunkCols;  // chunks a stage: 64, two a lane
constexpr int kRowHalves = kStageCols + 8;        // a tile row: 144 bytes, so ldmatrix rows miss each other's banks
constexpr int kRowBytes = 2 * kRowHalves;

template <int NTOK>
constexpr int stages() {
  return NTOK <= 8 ? 4 : 3;
}
// Bytes of one pipeline stage of a warp: values, two meta words a chunk, x.
template <int NTOK>
constexpr int stage_bytes() {
  return kChunks * 16 + kChunks * 8 + NTOK * kRowBytes;
}
// A warp's region: its stages, then its dense 16x64 tile of W.
template <int NTOK>
constexpr int region_bytes() {
  return stages<NTOK>() * stage_bytes<NTOK>() + kTileRows * kRowBytes;
}

struct MmaPlan {
  ExpandPlan e;
  int32_t N = 0;
  int32_t n_words = 0;       // meta words
  int32_t row_chunks = 0;    // chunks a row: K / 16
  int32_t row_stages = 0;    // stages a row: ceil(K / 64)
  int32_t smem_recipes = 0;  // byte offset of the expansion recipes (n_codes sel, then n_codes mask, uint4)
  int32_t smem_regions = 0;  // byte offset of the warps' regions (after the tables)
  int32_t smem_total = 0;
};

// The C codes of a chunk from its two staged meta words; f is its first field.
template <int C>
__device__ __forceinline__ void staged_codes(const StreamPlan& p, uint32_t f, uint2 words, uint32_t (&code)[C]) {
  const uint32_t word = p.div_per_word.div(f);
  const uint32_t slot = f - word * static_cast<uint32_t>(p.per_word);
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t sl = slot + k;
    const bool first = sl < static_cast<uint32_t>(p.per_word);
    const uint32_t wd = first ? words.x : words.y;
    const uint32_t sh = (first ? sl : sl - p.per_word) * p.bits;
    code[k] = p.bits >= 32 ? wd : (wd >> sh) & p.field_mask;
  }
}

// Issues the cp.async copies of stage s (columns 64 s ..) of rows row0.. into
// `buf`: chunk c = lane + 32 i is row c % 16, column chunk c / 16 of the stage.
template <typename T, int C, int NTOK>
__device__ __forceinline__ void issue_stage(const MmaPlan& m, const T* __restrict__ values,
                                            const int32_t* __restrict__ meta, const T* __restrict__ x, int32_t row0,
                                            int32_t s, unsigned char* buf, int lane) {
  const StreamPlan& p = m.e.s;
#pragma unroll
  for (int i = 0; i < kChunks / 32; ++i) {
    const int c = lane + 32 * i;
    const int32_t row = row0 + c % kTileRows;
    const int32_t j = s * (kStageCols / kChunkCols) + c / kTileRows;  // the chunk's index in its row
    const bool valid = row < p.M && j < m.row_chunks;
    const int64_t chunk = static_cast<int64_t>(row) * m.row_chunks + j;
    cp_async16(buf + 16 * c, valid ? values + chunk * 8 : values, valid);
    const uint32_t f = static_cast<uint32_t>(valid ? chunk * C : 0);
    const uint32_t word = p.div_per_word.div(f);
    const bool second = valid && static_cast<int32_t>(word) + 1 < m.n_words;
    unsigned char* mdst = buf + kChunks * 16 + 8 * c;
    cp_async4(mdst, meta + word, valid);
    cp_async4(mdst + 4, second ? meta + word + 1 : meta, second);
  }
  unsigned char* xs = buf + kChunks * 24;
  const int32_t col0 = s * kStageCols;
  for (int i = lane; i < m.N * (kStageCols / 8); i += 32) {
    const int n = i / (kStageCols / 8), piece = i % (kStageCols / 8);
    const int32_t col = col0 + 8 * piece;
    const bool valid = col < p.K;  // K is a multiple of 16
    cp_async16(xs + n * kRowBytes + 16 * piece, valid ? x + static_cast<int64_t>(n) * p.K + col : x, valid);
  }
}

// Where word i (columns 2i, 2i+1 of the scope's run) of scope k of a chunk
// lands among the chunk's 8 words: runs of P words back to back (2:4, 4:8), or
// (INTERLEAVED) pairs of words 2k, 2k+1 in each half of the chunk (coupled 2:4:
// columns j and j + 8 pruned together).
template <int P, bool INTERLEAVED>
__device__ __forceinline__ constexpr int word_slot(int k, int i) {
  return INTERLEAVED ? 2 * k + (i % 2) + 4 * (i / 2) : P * k + i;
}

// Expansion recipes, one a code: word i of a scope with code c is
// __byte_perm(a, b, sel[c][i]) & mask[c][i], where a, b are the 32-bit words
// that hold the scope's P values (b = 0 when P = 2). Bit 31 of sel[c][0] marks
// a code whose subset entry is bad.
struct Recipes {
  uint4* sel;
  uint4* mask;
};

// Builds the recipes (block-wide; ends with a barrier) and returns whether the
// pattern's scopes are the word runs word_slot says, given that the chunks
// tile their spans (spans_tile): each scope covers P whole words.
template <int P, bool INTERLEAVED>
__device__ inline bool build_recipes(const StreamPlan& p, const int64_t* __restrict__ block_off,
                                     const int64_t* __restrict__ elem_off, const CodeTables& t, const Recipes& r,
                                     int* layout_bad) {
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  __shared__ int32_t words[P];  // word i of a scope: columns 2 words[i], + 1 from its origin
  if (tid == 0) {
    const int32_t G = static_cast<int32_t>(p.g.G), B = static_cast<int32_t>(p.g.B);
    int32_t cols[2 * P];
    int n = 0;
    bool ok = G * B == 2 * P;
    for (int32_t b = 0; ok && b < G; ++b) {
      for (int32_t e = 0; e < B; ++e) {
        int32_t row = 0, col = 0;
        split_offset(block_off[b] + elem_off[e], p.g.K, &row, &col);
        int j = n++;
        while (j > 0 && cols[j - 1] > col) {  // insertion sort
          cols[j] = cols[j - 1];
          --j;
        }
        cols[j] = col;
      }
    }
    for (int i = 0; ok && i < P; ++i) {
      ok = cols[2 * i] % 2 == 0 && cols[2 * i + 1] == cols[2 * i] + 1;
      if (ok) words[i] = cols[2 * i] / 2;
    }
    // Scope k of a chunk starts k s1 columns in: its words must be word_slot's.
    constexpr int C = 8 / P;
    for (int k = 0; ok && k < C; ++k) {
      for (int i = 0; ok && i < P; ++i) {
        ok = p.s1_c % 2 == 0 && k * p.s1_c / 2 + words[i] == word_slot<P, INTERLEAVED>(k, i);
      }
    }
    if (!ok) *layout_bad = 1;
  }
  __syncthreads();
  if (*layout_bad == 0) {
    for (int32_t c = tid; c < p.n_codes; c += nt) {
      uint32_t sel[4] = {0u, 0u, 0u, 0u}, mask[4] = {0u, 0u, 0u, 0u};
      for (int i = 0; i < P; ++i) {
        for (int h = 0; h < 2; ++h) {
          for (int v = 0; v < P; ++v) {
            if (t.col[c * P + v] == 2 * words[i] + h) {  // value v: bytes 2v, 2v + 1 of (a, b)
              sel[i] |= static_cast<uint32_t>((2 * v) | ((2 * v + 1) << 4)) << (8 * h);
              mask[i] |= 0xFFFFu << (16 * h);
            }
          }
        }
      }
      if (t.row[c] != 0) sel[0] |= 0x80000000u;  // a bad subset entry (the table build reported it)
      r.sel[c] = uint4{sel[0], sel[1], sel[2], sel[3]};
      r.mask[c] = uint4{mask[0], mask[1], mask[2], mask[3]};
    }
  }
  __syncthreads();
  return *layout_bad == 0;
}

// Writes the lane's chunks of stage s (staged in buf) into the warp's dense
// 16x64 tile, each chunk as 8 words built by the recipes of its C codes.
// Returns status bits; a bad chunk's row gets its bit in *bad_rows (and zeros).
template <typename T, int P, bool INTERLEAVED>
__device__ __forceinline__ int expand_stage(const MmaPlan& m, const Recipes& rc, int32_t row0, int32_t s,
                                            const unsigned char* buf, unsigned char* dense, int lane,
                                            uint32_t* bad_rows) {
  const StreamPlan& p = m.e.s;
  constexpr int C = 8 / P;
  int bad = 0;
#pragma unroll
  for (int i = 0; i < kChunks / 32; ++i) {
    const int c = lane + 32 * i;
    const int r = c % kTileRows, kc = c / kTileRows;
    uint4* span = reinterpret_cast<uint4*>(dense + r * kRowBytes + kc * 2 * kChunkCols);
    const int32_t row = row0 + r;
    const int32_t j = s * (kStageCols / kChunkCols) + kc;
    if (row >= p.M || j >= m.row_chunks) {
      span[0] = uint4{0u, 0u, 0u, 0u};
      span[1] = uint4{0u, 0u, 0u, 0u};
      continue;
    }
    const uint4 raw = *reinterpret_cast<const uint4*>(buf + 16 * c);
    const uint32_t val[4] = {raw.x, raw.y, raw.z, raw.w};
    uint32_t code[C];
    staged_codes<C>(p, static_cast<uint32_t>((static_cast<int64_t>(row) * m.row_chunks + j) * C),
                    *reinterpret_cast<const uint2*>(buf + kChunks * 16 + 8 * c), code);
    uint32_t out[8];
    int chunk_bad = 0;
#pragma unroll
    for (int k = 0; k < C; ++k) {
      uint4 sel{0u, 0u, 0u, 0u}, mask{0u, 0u, 0u, 0u};
      if (code[k] < static_cast<uint32_t>(p.n_codes)) {
        sel = rc.sel[code[k]];
        mask = rc.mask[code[k]];
        if (sel.x >> 31) chunk_bad |= kPackedBadIndex;
      } else {
        chunk_bad |= p.bad_code;
      }
      const uint32_t a = val[(k * P) / 2], b = P == 4 ? val[(k * P) / 2 + 1] : 0u;
      const uint32_t sels[4] = {sel.x, sel.y, sel.z, sel.w}, masks[4] = {mask.x, mask.y, mask.z, mask.w};
#pragma unroll
      for (int w = 0; w < P; ++w) out[word_slot<P, INTERLEAVED>(k, w)] = __byte_perm(a, b, sels[w]) & masks[w];
    }
    span[0] = uint4{out[0], out[1], out[2], out[3]};
    span[1] = uint4{out[4], out[5], out[6], out[7]};
    if (chunk_bad) {
      bad |= chunk_bad;
      atomicOr(bad_rows, 1u << r);
    }
  }
  return bad;
}

// The tensor-core part of a stage: 4 k-steps of 16 columns over the dense tile.
template <bool BF16, int NTOK>
__device__ __forceinline__ void multiply_stage(const unsigned char* xs, const unsigned char* dense, int lane,
                                               float (&acc)[NTOK / 8][4]) {
  // ldmatrix row addresses: A tiles (rows 0-7 | 8-15) x (k 0-7 | 8-15); B tiles
  // are x's token rows (n 0-7, then 8-15), k 0-7 | 8-15.
  const int a_row = (lane % 8) + 8 * ((lane / 8) % 2), a_col = 8 * (lane / 16);
  const int b_row = (lane % 8) + 8 * (lane / 16), b_col = 8 * ((lane / 8) % 2);
#pragma unroll
  for (int kk = 0; kk < kStageCols / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, dense + a_row * kRowBytes + 2 * (16 * kk + a_col));
    if constexpr (NTOK == 8) {
      uint32_t b[2];
      ldmatrix_x2(b, xs + (lane % 8) * kRowBytes + 2 * (16 * kk + b_col));
      mma_16816<BF16>(acc[0], a, b);
    } else {
      uint32_t b4[4];
      ldmatrix_x4(b4, xs + b_row * kRowBytes + 2 * (16 * kk + b_col));
      const uint32_t b0[2] = {b4[0], b4[1]}, b1[2] = {b4[2], b4[3]};
      mma_16816<BF16>(acc[0], a, b0);
      mma_16816<BF16>(acc[1], a, b1);
    }
  }
}

// One warp's stages [s_lo, s_hi) of the 16 rows from row0 through the
// pipeline; its partial products go to red (16, NTOK) fp32.
template <typename T, int P, bool INTERLEAVED, int NTOK>
__device__ __forceinline__ int warp_stages(const MmaPlan& m, const T* __restrict__ values,
                                           const int32_t* __restrict__ meta, const T* __restrict__ x,
                                           const Recipes& rc, int32_t row0, int32_t s_lo, int32_t s_hi,
                                           unsigned char* region, float* red, int lane, uint32_t* bad_rows) {
  constexpr int C = 8 / P;
  constexpr int S = stages<NTOK>();
  constexpr bool kBF16 = std::is_same_v<T, at::BFloat16>;
  unsigned char* dense = region + S * stage_bytes<NTOK>();
  float acc[NTOK / 8][4] = {};
  int bad = 0;
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    if (s_lo + i < s_hi) issue_stage<T, C, NTOK>(m, values, meta, x, row0, s_lo + i, region + i * stage_bytes<NTOK>(), lane);
    cp_async_commit();
  }
  for (int32_t s = s_lo; s < s_hi; ++s) {
    const int32_t ahead = s + S - 1;
    if (ahead < s_hi) {
      issue_stage<T, C, NTOK>(m, values, meta, x, row0, ahead, region + ((ahead - s_lo) % S) * stage_bytes<NTOK>(),
                              lane);
    }
    cp_async_commit();
    cp_async_wait<S - 1>();  // stage s has landed (this lane's copies)
    __syncwarp();            // ... and every lane's
    const unsigned char* buf = region + ((s - s_lo) % S) * stage_bytes<NTOK>();
    bad |= expand_stage<T, P, INTERLEAVED>(m, rc, row0, s, buf, dense, lane, bad_rows);
    __syncwarp();
    multiply_stage<kBF16, NTOK>(buf + kChunks * 24, dense, lane, acc);
    __syncwarp();  // the tile and this stage's buffer are written again later
  }
  cp_async_wait<0>();
  // acc[tile] = (row g, tokens 2q, 2q+1) and (row g + 8, the same) of n-tile `tile`.
  const int g = lane / 4, q = lane % 4;
#pragma unroll
  for (int tile = 0; tile < NTOK / 8; ++tile) {
    const int n = 8 * tile + 2 * q;
    red[g * NTOK + n] = acc[tile][0];
    red[g * NTOK + n + 1] = acc[tile][1];
    red[(g + 8) * NTOK + n] = acc[tile][2];
    red[(g + 8) * NTOK + n + 1] = acc[tile][3];
  }
  return bad;
}

// The plain loop of a block whose chunks do not tile their spans: every kept
// value through every check, products summed into red (16, NTOK) with atomics.
template <typename T, int P, int NTOK>
__device__ inline int block_by_values(const MmaPlan& m, const T* __restrict__ values, const int32_t* __restrict__ meta,
                                      const T* __restrict__ x, const CodeTables& t, int32_t row0, float* red,
                                      uint32_t* bad_rows) {
  const StreamPlan& p = m.e.s;
  constexpr int C = stream::chunk_scopes<T, P>();
  const int tid = static_cast<int>(threadIdx.x);
  int bad = 0;
  for (int32_t it = tid; it < kTileRows * m.row_chunks; it += kThreads) {
    const int r = it / m.row_chunks;
    const int32_t j = it % m.row_chunks, row = row0 + r;
    if (row >= p.M) continue;
    const uint32_t s_first = static_cast<uint32_t>(row) * static_cast<uint32_t>(p.Sg);
    uint32_t code[C];
    expand::chunk_codes<C>(p, meta, s_first, j, code);
    T vals[C * P];
    std::memcpy(vals, values + (static_cast<int64_t>(row) * m.row_chunks + j) * 8, 16);
    int32_t rb, cb;
    stream::scope_origin(p, row * p.K, static_cast<uint32_t>(j) * C, &rb, &cb);
    int chunk_bad = 0;
    for (int k = 0; k < C; ++k) {
      if (k > 0) stream::next_scope(p, &rb, &cb);
      if (code[k] >= static_cast<uint32_t>(p.n_codes)) {
        chunk_bad |= p.bad_code;
        continue;
      }
      for (int v = 0; v < P; ++v) {
        const int2 o = t.entry[code[k] * P + v];
        if (o.y == kRowClamp) {
          chunk_bad |= kPackedBadIndex;
          continue;
        }
        int32_t col = cb + o.x, rr = rb + o.y;
        if (col >= p.K) {
          col -= p.K;
          ++rr;
        }
        if (rr != row) {
          chunk_bad |= (rr < 0 || rr >= p.M) ? kPackedBadOffset : kPackedBadGroup;
          continue;
        }
        const float w = to_float(vals[k * P + v]);
        for (int n = 0; n < m.N; ++n) atomicAdd(&red[r * NTOK + n], w * to_float(x[static_cast<int64_t>(n) * p.K + col]));
      }
    }
    if (chunk_bad) {
      bad |= chunk_bad;
      atomicOr(bad_rows, 1u << r);
    }
  }
  return bad;
}

// Persistent blocks: block b takes row tiles b, b + gridDim.x, ... (the code
// tables and recipes are built once a block).
template <typename T, int P, bool INTERLEAVED, int NTOK>
__global__ void __launch_bounds__(kThreads)
packed_mma_kernel(const MmaPlan m, const T* __restrict__ values, const int32_t* __restrict__ meta,
                  const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                  const int64_t* __restrict__ elem_off, const T* __restrict__ x, const T* __restrict__ bias,
                  T* __restrict__ y, int* __restrict__ status) {
  S3_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int table_bad, span_bad, layout_bad, block_bad;
  __shared__ uint32_t bad_rows;
  __shared__ int32_t cmax;
  const StreamPlan& p = m.e.s;
  const CodeTables t{reinterpret_cast<int2*>(smem + p.smem_entry), reinterpret_cast<int32_t*>(smem + p.smem_col),
                     reinterpret_cast<int32_t*>(smem + p.smem_row), &cmax};
  const Recipes rc{reinterpret_cast<uint4*>(smem + m.smem_recipes),
                   reinterpret_cast<uint4*>(smem + m.smem_recipes + 16 * p.n_codes)};
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  if (tid == 0) {
    table_bad = 0;
    span_bad = 0;
    layout_bad = 0;
    block_bad = 0;
    bad_rows = 0;
    cmax = 0;
  }
  __syncthreads();
  stream::block_code_tables<P>(p, subsets, block_off, elem_off, t, &table_bad);
  const bool fast = expand::spans_tile(m.e, block_off, elem_off, 8 / P, reinterpret_cast<int32_t*>(smem + m.e.smem_hits),
                                       &span_bad) &&
                    build_recipes<P, INTERLEAVED>(p, block_off, elem_off, t, rc, &layout_bad);
  // Token rows of x that no copy fills (n >= N) stay zero in every stage of every warp.
  unsigned char* region = smem + m.smem_regions + warp * region_bytes<NTOK>();
  if (fast) {
    constexpr int S = stages<NTOK>();
    for (int i = lane; i < S * (NTOK - m.N) * (kRowBytes / 16); i += 32) {
      const int per_stage = (NTOK - m.N) * (kRowBytes / 16);
      const int st = i / per_stage, rest = i % per_stage;
      const int n = m.N + rest / (kRowBytes / 16), piece = rest % (kRowBytes / 16);
      reinterpret_cast<uint4*>(region + st * stage_bytes<NTOK>() + kChunks * 24 + n * kRowBytes)[piece] =
          uint4{0u, 0u, 0u, 0u};
    }
  }
  // The warps' partial sums: each in its own region's first bytes (fast), or
  // all in red (the per-value loop).
  float* red = reinterpret_cast<float*>(smem + m.smem_regions);
  const int32_t tiles = (p.M + kTileRows - 1) / kTileRows;
  int bad = 0;
  for (int32_t tile = static_cast<int32_t>(blockIdx.x); tile < tiles; tile += static_cast<int32_t>(gridDim.x)) {
    const int32_t row0 = tile * kTileRows;
    if (fast) {
      const int32_t s_lo = warp * m.row_stages / kWarps, s_hi = (warp + 1) * m.row_stages / kWarps;
      bad |= warp_stages<T, P, INTERLEAVED, NTOK>(m, values, meta, x, rc, row0, s_lo, s_hi, region,
                                                  reinterpret_cast<float*>(region), lane, &bad_rows);
    } else {
      for (int i = tid; i < kTileRows * NTOK; i += kThreads) red[i] = 0.f;
      __syncthreads();
      bad |= block_by_values<T, P, NTOK>(m, values, meta, x, t, row0, red, &bad_rows);
    }
    __syncthreads();
    for (int i = tid; i < kTileRows * m.N; i += kThreads) {
      const int r = i % kTileRows, n = i / kTileRows;
      const int32_t row = row0 + r;
      if (row >= p.M) continue;
      float sum = 0.f;
      if (fast) {
        for (int w = 0; w < kWarps; ++w) {
          sum += reinterpret_cast<const float*>(smem + m.smem_regions + w * region_bytes<NTOK>())[r * NTOK + n];
        }
      } else {
        sum = red[r * NTOK + n];
      }
      const bool nan = table_bad != 0 || ((bad_rows >> r) & 1u) != 0;
      y[static_cast<int64_t>(n) * p.M + row] = stream::stream_out<T>(sum, nan, bias, row);
    }
    __syncthreads();  // the sums and bad_rows are read before the next tile overwrites them
    if (tid == 0) bad_rows = 0;
    __syncthreads();  // ... and bad_rows is cleared before any warp marks a row of the next tile
  }
  if (bad) atomicOr(&block_bad, bad);
  __syncthreads();
  const int bits = block_bad | table_bad;
  if (bits && tid == 0 && status != nullptr) atomicOr(status, bits);
}

template <typename T, int P, bool INTERLEAVED, int NTOK>
void launch_mma_kernel(const MmaPlan& m, const at::Tensor& values, const at::Tensor& meta,
                       const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                       const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                       at::Tensor& y, int* status, cudaStream_t stream) {
  auto kernel = packed_mma_kernel<T, P, INTERLEAVED, NTOK>;
  allow_shared<packed_mma_kernel<T, P, INTERLEAVED, NTOK>>(m.smem_total);
  // As many blocks as fit on the GPU at once (shared memory bound), at most one a row tile.
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(4, (228 * 1024) / (int64_t(m.smem_total) + 1024)));
  const int64_t tiles = ceil_div(m.e.s.M, kTileRows);
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(tiles, per_sm * multiprocessors())));
  stream::launch_linear_kernel<T>(kernel, m, blocks, kThreads, m.smem_total, stream, values, meta, subsets, block_off,
                                  elem_off, x2, bias, y, status);
}

// Tensor cores with mma.m16n8k16 and ldmatrix: sm_80 and later.
inline bool device_has_mma() { return device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 8; }

}  // namespace mma

template <typename T>
bool launch_packed_mma(const PackedGeometry& g, int64_t N, const at::Tensor& values, const at::Tensor& meta,
                       const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                       const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                       at::Tensor& y, int* status, cudaStream_t stream) {
  using namespace mma;
  if constexpr (!std::is_same_v<T, at::Half> && !std::is_same_v<T, at::BFloat16>) {
    return false;
  } else {
    if (N < 1 || N > kMmaMaxTokens) return false;
    MmaPlan m;
    int64_t tables_bytes = 0;
    if (!plan_stream_geometry<T>(g, values, subsets, &m.e.s, &tables_bytes)) return false;
    expand::plan_spans<T>(g, &m.e);
    const int64_t P = g.nnz * g.B;
    // Chunks of 8 values tiling 16 columns, a chunk's fields in at most two words.
    if (!m.e.span || m.e.L != kChunkCols || (P != 2 && P != 4) || g.per_word < 8 / P) return false;
    if (reinterpret_cast<uintptr_t>(x2.const_data_ptr<T>()) % 16 != 0) return false;
    if (!device_has_mma()) return false;
    StreamPlan& p = m.e.s;
    p.N = static_cast<int32_t>(N);
    m.N = static_cast<int32_t>(N);
    m.n_words = static_cast<int32_t>(g.n_words);
    m.row_chunks = static_cast<int32_t>(g.K / kChunkCols);
    m.row_stages = static_cast<int32_t>(ceil_div(g.K, kStageCols));
    const int64_t entries = int64_t(p.n_codes) * P;
    p.smem_entry = 0;
    p.smem_col = static_cast<int32_t>(8 * entries);
    p.smem_row = static_cast<int32_t>(12 * entries);
    m.e.smem_hits = static_cast<int32_t>(ceil_div(tables_bytes, 16) * 16);
    m.smem_recipes = static_cast<int32_t>(m.e.smem_hits + ceil_div(4 * int64_t(m.e.L), 16) * 16);
    m.smem_regions = static_cast<int32_t>(m.smem_recipes + 32 * int64_t(p.n_codes));
    const int ntok = N <= 8 ? 8 : 16;
    const int64_t regions = int64_t(kWarps) * (ntok == 8 ? region_bytes<8>() : region_bytes<16>());
    m.smem_total = static_cast<int32_t>(m.smem_regions + regions);
    if (m.smem_total > 227 * 1024) return false;
    // The word layout of a chunk's scopes (checked again on the device): runs
    // of P words (2:4, 4:8), or interleaved pairs (coupled 2:4: scopes 4 columns apart).
    const bool interleaved = P == 4 && p.s1_c == 4;
    auto go = [&]<int kP, bool kIL>() {
      if (ntok == 8) {
        launch_mma_kernel<T, kP, kIL, 8>(m, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
      } else {
        launch_mma_kernel<T, kP, kIL, 16>(m, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
      }
    };
    if (P == 2) {
      go.template operator()<2, false>();
    } else if (interleaved) {
      go.template operator()<4, true>();
    } else {
      go.template operator()<4, false>();
    }
    return true;
  }
}
#endif  // S3SPARSE_PACKED_STREAM_IMPL

}  // namespace packed_cuda
}  // namespace s3sparse
