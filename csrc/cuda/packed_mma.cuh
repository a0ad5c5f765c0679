// The tensor-core kernel of packed_linear for 1 to 16 tokens on span patterns
// (one row a group, every 16-byte chunk of values tiling 16 consecutive
// columns of its row: 2:4, 4:8, coupled 2:4), fp16 and bf16.
//
// Why: at a few tokens the layer is memory-bound, so the kernel must keep
// enough packed bytes in flight to stream them at close to copy bandwidth, and
// spend few instructions a value. The products go to the tensor cores, so the
// cost hardly grows with the tokens (the stream decode kernel of
// packed_stream.cuh reads x once per kept value and token).
//   - Register-direct: lane (g, t) of a warp (g = lane / 4, t = lane % 4)
//     loads, for a 16-row x 64-column step of W, the 16-byte chunks of rows g
//     and g + 8 at columns 16 t .. 16 t + 15 with their meta words, and x's
//     token g (and g + 8) at those columns, straight into registers. Since a
//     dot product may sum its k in any order, k-step j of the mma.m16n8k16
//     takes columns 16 t + 4 j .. + 3 from lane t: its A fragment (rows g,
//     g + 8; k 2t, 2t+1, 2t+8, 2t+9) is then words 2j, 2j+1 of the lane's two
//     expanded chunks, and its B fragment words 2j, 2j+1 of the lane's x. No
//     shared-memory staging of W or x, no ldmatrix.
//   - A lane expands a chunk into its 8 words of W (two columns each), each
//     one byte permutation of the scope's values, masked, by a recipe of its
//     code built once a block.
//   - kDepth steps are loaded ahead, and the first ones are issued before the
//     block builds its tables, so HBM is busy from the start.
//   - A thread block owns 16-row tiles (persistent: tiles b, b + gridDim.x,
//     ...); its 8 warps split each tile's K into equal runs of steps, and each
//     warp's loads run on into its run of the next tile; one barrier a tile
//     sums the warps' partial products (double-buffered in shared memory).
// Measured history (H200, 2560x9728 2:4 fp16, 1 token): the first version,
// which expanded into a shared tile zero-then-scatter, took 67 us; the second,
// a cp.async pipeline with recipes, 44 us (docs/performance.md).
// The tiling of the spans and the word layout of the scopes are checked in
// every block; a block whose format is not what the host planned for (a
// hand-made format that passes the host's checks) takes a plain per-value loop.
// Bad data is skipped, its rows become NaN (a bad chunk expands to NaN words)
// and the status word gets the CPU kernel's bits, as in every packed kernel.
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
constexpr int kTileRows = 16;   // rows of a tile (the mma's m)
constexpr int kStepCols = 64;   // columns of a warp's step: a 16-byte chunk a lane and row
constexpr int kChunkCols = 16;  // columns of a chunk (its 16 bytes of values)
// Lab knobs (benchmarks/lab/packed_mma_lab.py builds the kernel alone with
// them; the package never sets them): S3_LAB_DEPTH=n steps loaded ahead,
// S3_LAB_MIN_BLOCKS=n the launch bound's blocks an SM (2; 1 allows 255
// registers), and the diagnostics S3_LAB_NO_META (no meta loads: every code
// 0), S3_LAB_NO_EXPAND (the raw value words as W: no expansion, no meta),
// S3_LAB_NO_MMA (the words folded into the sums with one XOR instead),
// S3_LAB_NO_BARRIER (no barrier at a tile's end: wrong sums, the time without it).
#ifdef S3_LAB_DEPTH
constexpr int kDepth = S3_LAB_DEPTH;
#else
constexpr int kDepth = 3;       // steps a warp has loaded ahead
#endif
#ifdef S3_LAB_MIN_BLOCKS
constexpr int kMinBlocks = S3_LAB_MIN_BLOCKS;
#else
constexpr int kMinBlocks = 2;   // blocks an SM (the launch bound: at most 128 registers)
#endif

struct MmaPlan {
  ExpandPlan e;
  int32_t N = 0;
  int32_t n_words = 0;       // meta words
  int32_t row_chunks = 0;    // chunks a row: K / 16
  int32_t row_steps = 0;     // steps a row: ceil(K / 64)
  int32_t smem_recipes = 0;  // byte offset of the expansion recipes (n_codes sel, then n_codes mask, uint4)
  int32_t smem_red = 0;      // byte offset of the partial sums: 2 x (kWarps, 16, NTOK) fp32
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

// Where word i (columns 2i, 2i+1 of the scope's run) of scope k of a chunk
// lands among the chunk's 8 words: runs of P words back to back (2:4, 4:8), or
// (INTERLEAVED) pairs of words 2k, 2k+1 in each half of the chunk (coupled 2:4:
// columns j and j + 8 pruned together).
template <int P, bool INTERLEAVED>
__device__ __forceinline__ constexpr int word_slot(int k, int i) {
  return INTERLEAVED ? 2 * k + (i % 2) + 4 * (i / 2) : P * k + i;
}

// Expansion recipes, one a code: word i of a scope with code c is
// __byte_perm(a, b, sel[c][i] & 0xFFFF) & mask[c][i], where a, b are the 32-bit
// words that hold the scope's P values (b = 0 when P = 2: then the mask is not
// needed). Bit 31 of sel[c][0] marks
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
      // A column no value lands on selects byte 4: a zero when b = 0 (P = 2, no mask).
      uint32_t sel[4] = {0x4444u, 0x4444u, 0x4444u, 0x4444u}, mask[4] = {0u, 0u, 0u, 0u};
      for (int i = 0; i < P; ++i) {
        for (int h = 0; h < 2; ++h) {
          for (int v = 0; v < P; ++v) {
            if (t.col[c * P + v] == 2 * words[i] + h) {  // value v: bytes 2v, 2v + 1 of (a, b)
              sel[i] = (sel[i] & ~(0xFFu << (8 * h))) | static_cast<uint32_t>((2 * v) | ((2 * v + 1) << 4)) << (8 * h);
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

// The registers of one step of a lane: its chunks of rows g and g + 8 (h = 0,
// 1), their two meta words each, and x's tokens g (+ 8) at the chunks' columns.
template <int NT>
struct StepRegs {
  uint4 vals[2];
  uint2 words[2];
  uint4 x[NT / 8][2];
};

// Where a warp is in its steps: tile rows row0.., step s (columns 64 s ..).
struct Cursor {
  int32_t row0, s;
  __device__ __forceinline__ void advance(int32_t s_lo, int32_t s_hi) {
    if (++s == s_hi) {
      s = s_lo;
      row0 += kTileRows * static_cast<int32_t>(gridDim.x);
    }
  }
};

// Loads step (row0, s) of lane (g, t) into r; what lies outside W or x is zeros.
template <typename T, int C, int NT>
__device__ __forceinline__ void load_step(const MmaPlan& m, const T* __restrict__ values,
                                          const int32_t* __restrict__ meta, const T* __restrict__ x, Cursor at,
                                          int g, int t, StepRegs<NT>& r) {
  const StreamPlan& p = m.e.s;
  const int32_t j = at.s * (kStepCols / kChunkCols) + t;  // the lane's chunk of its rows
  const bool col_ok = j < m.row_chunks;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int32_t row = at.row0 + g + 8 * h;
    const bool ok = col_ok && row < p.M;
    const int64_t chunk = static_cast<int64_t>(row) * m.row_chunks + j;
    r.vals[h] = ok ? ldg(reinterpret_cast<const uint4*>(values) + chunk) : uint4{0u, 0u, 0u, 0u};
#ifdef S3_LAB_NO_META
    r.words[h] = uint2{0u, 0u};
#else
    const uint32_t word = ok ? p.div_per_word.div(static_cast<uint32_t>(chunk * C)) : 0u;
    r.words[h].x = ok ? static_cast<uint32_t>(ldg(meta + word)) : 0u;
    r.words[h].y = ok && static_cast<int32_t>(word) + 1 < m.n_words ? static_cast<uint32_t>(ldg(meta + word + 1)) : 0u;
#endif
  }
#pragma unroll
  for (int nt = 0; nt < NT / 8; ++nt) {
    const int n = g + 8 * nt;
    const bool ok = col_ok && n < m.N;
    const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(n) * p.K + j * kChunkCols);
    r.x[nt][0] = ok ? ldg(src) : uint4{0u, 0u, 0u, 0u};
    r.x[nt][1] = ok ? ldg(src + 1) : uint4{0u, 0u, 0u, 0u};
  }
}

// The 8 words (columns 2i, 2i + 1) of a lane's chunk of row `row`, chunk j:
// zeros outside W, NaN words for a bad chunk (so its row's sums become NaN).
// Returns status bits.
template <typename T, int P, bool INTERLEAVED>
__device__ __forceinline__ int expand_chunk(const MmaPlan& m, const Recipes& rc, int32_t row, int32_t j, uint4 raw,
                                            uint2 words, uint32_t (&out)[8]) {
  const StreamPlan& p = m.e.s;
  constexpr int C = 8 / P;
  constexpr uint32_t kNaN = std::is_same_v<T, at::BFloat16> ? 0x7FC07FC0u : 0x7E007E00u;
  if (row >= p.M || j >= m.row_chunks) {
#pragma unroll
    for (int w = 0; w < 8; ++w) out[w] = 0u;
    return 0;
  }
  const uint32_t val[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t code[C];
  staged_codes<C>(p, static_cast<uint32_t>((static_cast<int64_t>(row) * m.row_chunks + j) * C), words, code);
  int bad = 0;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t a = val[(k * P) / 2], b = P == 4 ? val[(k * P) / 2 + 1] : 0u;
    if (code[k] >= static_cast<uint32_t>(p.n_codes)) {
      bad |= p.bad_code;
      continue;
    }
    if constexpr (P == 2) {
      const uint2 sel = *reinterpret_cast<const uint2*>(&rc.sel[code[k]]);
      if (sel.x >> 31) bad |= kPackedBadIndex;
      // b = 0: the selector's bytes 4-7 are zeros, so no mask.
      out[word_slot<P, INTERLEAVED>(k, 0)] = __byte_perm(a, 0u, sel.x & 0xFFFFu);
      out[word_slot<P, INTERLEAVED>(k, 1)] = __byte_perm(a, 0u, sel.y);
    } else {
      const uint4 sel = rc.sel[code[k]], mask = rc.mask[code[k]];
      if (sel.x >> 31) bad |= kPackedBadIndex;
      out[word_slot<P, INTERLEAVED>(k, 0)] = __byte_perm(a, b, sel.x & 0xFFFFu) & mask.x;
      out[word_slot<P, INTERLEAVED>(k, 1)] = __byte_perm(a, b, sel.y) & mask.y;
      out[word_slot<P, INTERLEAVED>(k, 2)] = __byte_perm(a, b, sel.z) & mask.z;
      out[word_slot<P, INTERLEAVED>(k, 3)] = __byte_perm(a, b, sel.w) & mask.w;
    }
  }
  if (bad) {
#pragma unroll
    for (int w = 0; w < 8; ++w) out[w] = kNaN;
  }
  return bad;
}

// Expands step `at` of a lane and multiplies it: 4 k-steps of 16 columns (the
// lane's columns 16 t + 4 kk .. + 3 of each of its chunks). Returns status bits.
template <typename T, int P, bool INTERLEAVED, int NT>
__device__ __forceinline__ int multiply_step(const MmaPlan& m, const Recipes& rc, Cursor at, int g, int t,
                                             const StepRegs<NT>& r, float (&acc)[NT / 8][4]) {
  constexpr bool kBF16 = std::is_same_v<T, at::BFloat16>;
  const int32_t j = at.s * (kStepCols / kChunkCols) + t;
  uint32_t w0[8], w1[8];
#ifdef S3_LAB_NO_EXPAND
  int bad = 0;
  const uint32_t raw[8] = {r.vals[0].x, r.vals[0].y, r.vals[0].z, r.vals[0].w,
                           r.vals[1].x, r.vals[1].y, r.vals[1].z, r.vals[1].w};
#pragma unroll
  for (int w = 0; w < 8; ++w) {
    w0[w] = raw[w];
    w1[w] = raw[(w + 4) % 8];
  }
#else
  int bad = expand_chunk<T, P, INTERLEAVED>(m, rc, at.row0 + g, j, r.vals[0], r.words[0], w0);
  bad |= expand_chunk<T, P, INTERLEAVED>(m, rc, at.row0 + g + 8, j, r.vals[1], r.words[1], w1);
#endif
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a[4] = {w0[2 * kk], w1[2 * kk], w0[2 * kk + 1], w1[2 * kk + 1]};
#pragma unroll
    for (int nt = 0; nt < NT / 8; ++nt) {
      const uint4& lo = r.x[nt][kk / 2];
      const uint32_t b[2] = {kk % 2 == 0 ? lo.x : lo.z, kk % 2 == 0 ? lo.y : lo.w};
#ifdef S3_LAB_NO_MMA
      acc[nt][kk] += __uint_as_float((a[0] ^ a[1] ^ a[2] ^ a[3] ^ b[0] ^ b[1]) & 0x3FFFFFFFu);
#else
      mma_16816<kBF16>(acc[nt], a, b);
#endif
    }
  }
  return bad;
}

// The end of a tile (every warp, once a tile): the warps' partial sums into
// red[parity], a barrier, then y of the tile's rows (bias, NaN when the
// block's code tables are bad). Double-buffered: the next tile's partials go
// to the other half while this one is read.
template <typename T, int NT>
__device__ __forceinline__ void finish_tile(const MmaPlan& m, int32_t row0, int parity, float (&acc)[NT / 8][4],
                                            float* red, bool table_bad, const T* __restrict__ bias,
                                            T* __restrict__ y) {
  const StreamPlan& p = m.e.s;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  float* mine = red + (parity * kWarps + warp) * kTileRows * NT;
#pragma unroll
  for (int nt = 0; nt < NT / 8; ++nt) {
    const int n = 8 * nt + 2 * t;
    mine[g * NT + n] = acc[nt][0];
    mine[g * NT + n + 1] = acc[nt][1];
    mine[(g + 8) * NT + n] = acc[nt][2];
    mine[(g + 8) * NT + n + 1] = acc[nt][3];
    acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  }
#ifndef S3_LAB_NO_BARRIER
  __syncthreads();
#endif
  const float* half = red + parity * kWarps * kTileRows * NT;
  for (int i = tid; i < kTileRows * m.N; i += kThreads) {
    const int rr = i % kTileRows, n = i / kTileRows;
    const int32_t row = row0 + rr;
    if (row >= p.M) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += half[(w * kTileRows + rr) * NT + n];
    y[static_cast<int64_t>(n) * p.M + row] = stream::stream_out<T>(sum, table_bad, bias, row);
  }
}

// One warp's share of the block's tiles: steps [s_lo, s_hi) of each, D steps
// loaded ahead (buf, the next at load_at) across tile ends. Returns status bits.
template <typename T, int P, bool INTERLEAVED, int NT, int D>
__device__ __forceinline__ int warp_tiles(const MmaPlan& m, const T* __restrict__ values,
                                          const int32_t* __restrict__ meta, const T* __restrict__ x,
                                          const Recipes& rc, int32_t s_lo, int32_t s_hi, int32_t my_tiles,
                                          StepRegs<NT> (&buf)[D], Cursor load_at, float* red, bool table_bad,
                                          const T* __restrict__ bias, T* __restrict__ y) {
  constexpr int C = 8 / P;
  const int lane = static_cast<int>(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const int32_t per_tile = s_hi - s_lo;
  float acc[NT / 8][4] = {};
  int bad = 0;
  if (per_tile == 0) {  // more warps than steps: this warp only joins the tile ends
    for (int32_t i = 0; i < my_tiles; ++i) {
      finish_tile<T, NT>(m, static_cast<int32_t>(blockIdx.x + i * gridDim.x) * kTileRows, i % 2, acc, red, table_bad,
                         bias, y);
    }
    return 0;
  }
  const int32_t total = my_tiles * per_tile;
  Cursor at{static_cast<int32_t>(blockIdx.x) * kTileRows, s_lo};
  int32_t tile = 0;
  for (int32_t e0 = 0; e0 < total; e0 += D) {
#pragma unroll
    for (int i = 0; i < D; ++i) {
      const int32_t e = e0 + i;
      if (e < total) {
        bad |= multiply_step<T, P, INTERLEAVED, NT>(m, rc, at, g, t, buf[i], acc);
        if (e + D < total) {
          load_step<T, C, NT>(m, values, meta, x, load_at, g, t, buf[i]);
          load_at.advance(s_lo, s_hi);
        }
        if (at.s + 1 == s_hi) {
          finish_tile<T, NT>(m, at.row0, tile % 2, acc, red, table_bad, bias, y);
          ++tile;
        }
        at.advance(s_lo, s_hi);
      }
    }
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
        if (o.y == kRowBadEntry) {  // (an offset far outside W has kRowClamp: reported below)
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

// Steps a warp loads ahead (its registers: a step is 12 + 8 NT / 8 words).
template <int NT>
constexpr int depth() {
#ifdef S3_LAB_DEPTH
  return kDepth;
#else
  return NT == 8 ? kDepth : 2;
#endif
}

// Persistent blocks: block b takes row tiles b, b + gridDim.x, ... (the code
// tables and recipes are built once a block, while the first steps load).
template <typename T, int P, bool INTERLEAVED, int NT>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
packed_mma_kernel(const MmaPlan m, const T* __restrict__ values, const int32_t* __restrict__ meta,
                  const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                  const int64_t* __restrict__ elem_off, const T* __restrict__ x, const T* __restrict__ bias,
                  T* __restrict__ y, int* __restrict__ status) {
  S3_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int table_bad, span_bad, layout_bad, block_bad;
  __shared__ uint32_t bad_rows;
  __shared__ int32_t cmax;
  constexpr int C = 8 / P;
  constexpr int D = depth<NT>();
  const StreamPlan& p = m.e.s;
  const CodeTables tab{reinterpret_cast<int2*>(smem + p.smem_entry), reinterpret_cast<int32_t*>(smem + p.smem_col),
                       reinterpret_cast<int32_t*>(smem + p.smem_row), &cmax};
  const Recipes rc{reinterpret_cast<uint4*>(smem + m.smem_recipes),
                   reinterpret_cast<uint4*>(smem + m.smem_recipes + 16 * p.n_codes)};
  float* red = reinterpret_cast<float*>(smem + m.smem_red);
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const int32_t tiles = (p.M + kTileRows - 1) / kTileRows;
  const int32_t my_tiles =
      (tiles - static_cast<int32_t>(blockIdx.x) + static_cast<int32_t>(gridDim.x) - 1) / static_cast<int32_t>(gridDim.x);
  const int32_t s_lo = warp * m.row_steps / kWarps, s_hi = (warp + 1) * m.row_steps / kWarps;
  const int32_t total = my_tiles * (s_hi - s_lo);

  // The format's loads, then the first steps' (they need no table): the
  // tables are built while W streams in.
  stream::FormatLoads fl;
  stream::format_issue(p, subsets, block_off, elem_off, fl);
  StepRegs<NT> buf[D];
  Cursor load_at{static_cast<int32_t>(blockIdx.x) * kTileRows, s_lo};
#pragma unroll
  for (int i = 0; i < D; ++i) {
    if (i < total) {
      load_step<T, C, NT>(m, values, meta, x, load_at, lane / 4, lane % 4, buf[i]);
      load_at.advance(s_lo, s_hi);
    }
  }

  const stream::FormatPtrs fmt = stream::format_finish(p, smem, subsets, block_off, elem_off, fl);
  if (tid == 0) {
    table_bad = 0;
    span_bad = 0;
    layout_bad = 0;
    block_bad = 0;
    bad_rows = 0;
    cmax = 0;
  }
  __syncthreads();
  stream::block_code_tables<P>(p, fmt.subsets, fmt.block_off, fmt.elem_off, tab, &table_bad);
  const bool fast = stream::spans_tile(m.e.s, m.e.L, fmt.block_off, fmt.elem_off, C,
                                       reinterpret_cast<int32_t*>(smem + m.e.smem_hits), &span_bad) &&
                    build_recipes<P, INTERLEAVED>(p, fmt.block_off, fmt.elem_off, tab, rc, &layout_bad);
  int bad = 0;
  if (fast) {
    bad = warp_tiles<T, P, INTERLEAVED, NT, D>(m, values, meta, x, rc, s_lo, s_hi, my_tiles, buf, load_at, red,
                                               table_bad != 0, bias, y);
  } else {
    for (int32_t tile = static_cast<int32_t>(blockIdx.x); tile < tiles; tile += static_cast<int32_t>(gridDim.x)) {
      const int32_t row0 = tile * kTileRows;
      for (int i = tid; i < kTileRows * NT; i += kThreads) red[i] = 0.f;
      __syncthreads();
      bad |= block_by_values<T, P, NT>(m, values, meta, x, tab, row0, red, &bad_rows);
      __syncthreads();
      for (int i = tid; i < kTileRows * m.N; i += kThreads) {
        const int r = i % kTileRows, n = i / kTileRows;
        const int32_t row = row0 + r;
        if (row >= p.M) continue;
        const bool nan = table_bad != 0 || ((bad_rows >> r) & 1u) != 0;
        y[static_cast<int64_t>(n) * p.M + row] = stream::stream_out<T>(red[r * NT + n], nan, bias, row);
      }
      __syncthreads();  // the sums and bad_rows are read before the next tile overwrites them
      if (tid == 0) bad_rows = 0;
      __syncthreads();  // ... and bad_rows is cleared before any warp marks a row of the next tile
    }
  }
  if (bad) atomicOr(&block_bad, bad);
  __syncthreads();
  const int bits = block_bad | table_bad;
  if (bits && tid == 0 && status != nullptr) atomicOr(status, bits);
}

template <typename T, int P, bool INTERLEAVED, int NT>
void launch_mma_kernel(const MmaPlan& m, const at::Tensor& values, const at::Tensor& meta,
                       const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                       const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                       at::Tensor& y, int* status, cudaStream_t stream) {
  auto kernel = packed_mma_kernel<T, P, INTERLEAVED, NT>;
  allow_shared<packed_mma_kernel<T, P, INTERLEAVED, NT>>(m.smem_total);
  // kMinBlocks blocks an SM (the launch bound), at most one a row tile.
  const int64_t tiles = ceil_div(m.e.s.M, kTileRows);
  const unsigned blocks =
      static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(tiles, kMinBlocks * int64_t(multiprocessors()))));
  stream::launch_linear_kernel<T>(kernel, m, blocks, kThreads, m.smem_total, stream, values, meta, subsets, block_off,
                                  elem_off, x2, bias, y, status);
}

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
    // x read as 16-byte vectors (K is a multiple of 16 here).
    if (reinterpret_cast<uintptr_t>(x2.const_data_ptr<T>()) % 16 != 0) return false;
    if (!device_has_mma()) return false;
    StreamPlan& p = m.e.s;
    p.N = static_cast<int32_t>(N);
    m.N = static_cast<int32_t>(N);
    m.n_words = static_cast<int32_t>(g.n_words);
    m.row_chunks = static_cast<int32_t>(g.K / kChunkCols);
    m.row_steps = static_cast<int32_t>(ceil_div(g.K, kStepCols));
    const int64_t entries = int64_t(p.n_codes) * P;
    p.smem_entry = 0;
    p.smem_col = static_cast<int32_t>(8 * entries);
    p.smem_row = static_cast<int32_t>(12 * entries);
    m.e.smem_hits = static_cast<int32_t>(ceil_div(tables_bytes, 16) * 16);
    m.smem_recipes = static_cast<int32_t>(m.e.smem_hits + ceil_div(4 * int64_t(m.e.L), 16) * 16);
    m.smem_red = static_cast<int32_t>(m.smem_recipes + 32 * int64_t(p.n_codes));
    const int ntok = N <= 8 ? 8 : 16;
    m.smem_total = static_cast<int32_t>(m.smem_red + 2 * int64_t(kWarps) * kTileRows * ntok * 4);
    const int64_t format_bytes = stream::format_copy_bytes(p);
    if (format_bytes > 0) {
      p.smem_format = m.smem_total;  // 16-byte aligned (the partial sums are)
      m.smem_total = static_cast<int32_t>(m.smem_total + format_bytes);
    }
    if (m.smem_total > 100 * 1024) return false;  // two blocks an SM
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
