// sp24_linear from 17 tokens a call: the block-tiled form of sp24.cu's kernel (included there, after
// its helpers). One launch covers every token.
//
// Why another kernel: the decode kernel gives each warp its own x (loaded from L1/L2 by every warp of
// every tile), which is cheap for 1-16 tokens but at 32 tokens moves 2-4 times the weight's bytes
// through L1 a call (0.31-0.47x dense F.linear at 32-512 tokens on an H100,
// benchmarks/results/packed-32-512-paths-h100-5934764.txt). Here a block of 8 warps takes 8 row tiles
// (128 rows) over one slice of K for one tile of 32 or 64 tokens (128 in a lab build with
// S3_LAB_TILED_NT_LARGE=16): the block stages x once a chunk of
// iterations in shared memory, already in the tensor cores' virtual column order (sp24.h), so each
// warp's B registers are two ldmatrix.x4 a tile of 8 tokens and an iteration, while its A registers
// and metadata are read from global memory exactly as in the decode kernel.
//
// Two forms of the loads, both checked on an H100 (benchmarks/lab/sp24_ext.py times them side by side):
//  - sp24_tiled_async_kernel, the package's: x, A and the metadata go global -> shared by cp.async,
//    P - 1 iterations ahead (P = 4 stages), one barrier an iteration. 4096x4096 at 64 tokens 1.14-1.29x
//    faster than the other form, at 32 tokens 0.94x (2:4) to 1.11x (4:8), at 512 the same;
//  - sp24_tiled_kernel (-DS3_LAB_TILED_ASYNC=0): x and A of the next chunk load into registers while the
//    tensor cores work on this one, then x is stored to shared memory (double buffered, one barrier a
//    chunk): one chunk ahead, latency-bound (docs/performance.md).
//
// The grid is (row blocks, token tiles, slices of K). Slices are chosen so the grid holds at most one
// block an SM (kTiledFill): on an H100 that beat filling both of an SM's block slots by up to 1.4x at
// 32-128 tokens (fewer slices: less split-K work, and no SM running two blocks while others run one) and
// was equal elsewhere (docs/performance.md, 2026-12-07). With more than one slice the last warp of a tile
// to finish sums the slices' fp32 partial tiles in slice order (deterministic): the decode kernel's
// epilogue, sp24_finish_tile.
#pragma once

namespace s3sparse {
namespace packed_cuda {
namespace {

// (S3_LAB_TILED_*: knobs for benchmarks/lab/sp24_ext.py variants; the package builds the defaults.)
#ifndef S3_LAB_TILED_U
#define S3_LAB_TILED_U 2
#endif
#ifndef S3_LAB_TILED_BLOCKS_PER_SM
#define S3_LAB_TILED_BLOCKS_PER_SM 2
#endif
#ifndef S3_LAB_TILED_FILL  // blocks an SM the slices of K are chosen to fill (2 until 2026-12-07)
#if defined(S3SPARSE_EMULATE_CUDA)
#define S3_LAB_TILED_FILL 2  // (the emulator has 2 SMs: so two row blocks or token tiles still split K in the tests)
#else
#define S3_LAB_TILED_FILL 1
#endif
#endif
#ifndef S3_LAB_TILED_MIN_ITERS
#define S3_LAB_TILED_MIN_ITERS 8
#endif
#ifndef S3_LAB_TILED_WM
#define S3_LAB_TILED_WM 1  // row tiles a warp
#endif
#ifndef S3_LAB_TILED_NT32
#define S3_LAB_TILED_NT32 4  // token tile (/ 8) for 17-32 tokens
#endif
#ifndef S3_LAB_TILED_NT_LARGE
#define S3_LAB_TILED_NT_LARGE 8  // token tile (/ 8) above 64 tokens (lab: 16, with S3_LAB_TILED_BLOCKS_PER_SM=1)
#endif
#ifndef S3_LAB_TILED_P
#define S3_LAB_TILED_P 4  // stages of the cp.async pipeline
#endif
#ifndef S3_LAB_TILED_ROTATE
#define S3_LAB_TILED_ROTATE 0  // (cp.async form) row block b starts its slice ROTATE b iterations in
#endif
#ifndef S3_LAB_TILED_ASYNC
#define S3_LAB_TILED_ASYNC 1  // 1: the cp.async pipeline (sp24_tiled_async_kernel), WM row tiles a warp; 0: registers
#endif
static_assert(S3_LAB_TILED_NT32 == 4 || S3_LAB_TILED_NT32 == 8, "S3_LAB_TILED_NT32: 4 or 8 (the launcher's tiles)");
static_assert(S3_LAB_TILED_NT_LARGE == 8 || S3_LAB_TILED_NT_LARGE == 16, "S3_LAB_TILED_NT_LARGE: 8 or 16");
static_assert(S3_LAB_TILED_NT_LARGE == 8 || S3_LAB_TILED_BLOCKS_PER_SM == 1,
              "S3_LAB_TILED_NT_LARGE=16 needs S3_LAB_TILED_BLOCKS_PER_SM=1 (its 64 accumulators spill under 128 registers)");
constexpr int kTiledWarps = 8;  // a block: 8 row tiles of 16 (128 rows)
constexpr int kTiledBlocksPerSm = S3_LAB_TILED_BLOCKS_PER_SM;  // (256 threads, at most 128 registers each)
constexpr int kTiledU = S3_LAB_TILED_U;                        // 64-column iterations a chunk
constexpr int kTiledWm = S3_LAB_TILED_WM;                      // row tiles a warp
constexpr int kTiledRow = 72;  // a staged x row: 64 columns + 8, 144 bytes (ldmatrix's 8 rows on distinct banks)
constexpr int64_t kTiledMinIters = S3_LAB_TILED_MIN_ITERS;  // slices of K a tile take at least this many iterations
constexpr int64_t kTiledFill = S3_LAB_TILED_FILL;

// The staged column (elements) of virtual group G (0-15) of an iteration: step s = (G >> 1) & 1 and the
// step's group q = (G >> 2) + 4 (G & 1) (sp24_group inverted), so each step's 32 virtual columns lie in
// order and B register r of a lane is the 8r-th pair onwards: ldmatrix's matrix r.
__device__ __forceinline__ int staged_col(int G) { return 32 * ((G >> 1) & 1) + 4 * ((G >> 2) + 4 * (G & 1)); }

// 16 bytes of x (columns 8 p .. 8 p + 7 of an iteration) into the staged row, as the two virtual groups
// (4 virtual columns each, sp24_column) they hold, by column order:
//  0 (2:4): groups 2p and 2p + 1 as they are;
//  2 (coupled): chunk c = p / 2's slots hf and hf + 2 (hf = p % 2; slots 0-3 are groups 0, 2, 1, 3);
//  1 (4:8): chunk c's slots 2 hf (even columns) and 2 hf + 1 (odd columns), by byte permutes.
template <int kOrder>
__device__ __forceinline__ void stage_x(uint16_t* row, int p, uint4 v) {
  const int c = p >> 1, hf = p & 1;
  uint2 lo, hi;
  int ga, gb;
  if constexpr (kOrder == 1) {
    lo = make_uint2(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.z, v.w, 0x5410));
    hi = make_uint2(__byte_perm(v.x, v.y, 0x7632), __byte_perm(v.z, v.w, 0x7632));
    ga = 4 * c + 2 * hf, gb = ga + 1;
  } else {
    lo = make_uint2(v.x, v.y), hi = make_uint2(v.z, v.w);
    if constexpr (kOrder == 2) {
      ga = 4 * c + hf, gb = ga + 2;
    } else {
      ga = 2 * p, gb = ga + 1;
    }
  }
  *reinterpret_cast<uint2*>(row + staged_col(ga)) = lo;
  *reinterpret_cast<uint2*>(row + staged_col(gb)) = hi;
}

// NT tiles of 8 tokens a block (BN = 8 NT tokens), WM row tiles a warp (each B fragment feeds WM mma's: half
// the shared-memory reads a token at WM = 2), U iterations a chunk, kCheck: check every metadata word.
// A warp's WM row tiles tile0 .. tile0 + WM - 1: which exist (the others still copy x and meet the barriers;
// their pointers are tile 0's), and where a lane's A values (rows g and g + 8 of the tile, 16-byte column
// lane % 4) and metadata words start.
template <int WM>
__device__ __forceinline__ void warp_tiles(const uint4* vals, const uint32_t* meta, int tile0, int tiles, int iters,
                                           int64_t row_vecs, int lane, bool (&active)[WM], const uint4* (&v0)[WM],
                                           const uint32_t* (&mp)[WM]) {
#pragma unroll
  for (int m = 0; m < WM; ++m) {
    active[m] = tile0 + m < tiles;
    const int tile = active[m] ? tile0 + m : 0;
    v0[m] = vals + static_cast<int64_t>(tile * 16 + (lane >> 2)) * row_vecs + (lane & 3);
    mp[m] = meta + static_cast<int64_t>(tile) * iters * 32 + lane;
  }
}

// The end of both tiled kernels: each of a warp's WM row tiles NaN where its metadata was corrupt,
// then (if it exists) finished: bias and store, or its slice's partial through the workspace.
template <typename T, int NT, int WM, bool kCheck>
__device__ __forceinline__ void finish_warp_tiles(float (&d)[WM][NT][4], const uint32_t (&bad)[WM],
                                                  const bool (&active)[WM], int tile0, int lane,
                                                  const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
                                                  int* __restrict__ cnt, int M, int N, int S, int slice, int n0) {
#pragma unroll
  for (int m = 0; m < WM; ++m) {
    poison_bad_tile<kCheck, NT>(d[m], bad[m]);
    if (active[m]) {
      sp24_finish_tile<T, NT>(d[m], tile0 + m, lane, bias, y, ws, cnt, M, N, S, slice, n0, static_cast<int>(blockIdx.y),
                              static_cast<int>(gridDim.y));
    }
  }
}

template <typename T, int NT, int WM, int U, bool kCheck, int kOrder>
__global__ void __launch_bounds__(kTiledWarps * 32, kTiledBlocksPerSm)
    sp24_tiled_kernel(const uint4* __restrict__ vals, const uint32_t* __restrict__ meta, const T* __restrict__ x,
                      const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
                      int M, int K, int N, int S) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  constexpr int BN = 8 * NT;
  constexpr int kThreads = kTiledWarps * 32;
  constexpr int kPieces = U * BN * 8;  // 16-byte pieces of x a chunk
  static_assert(kPieces % kThreads == 0, "a chunk's x must split evenly over the block");
  constexpr int kPer = kPieces / kThreads;
  constexpr int kBuf = U * BN * kTiledRow;  // elements of one staged chunk
  S3_DYNAMIC_SHARED(uint16_t, xs);          // [2][U][BN][kTiledRow]

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int tiles = M / 16;
  const int tile0 = (static_cast<int>(blockIdx.x) * kTiledWarps + warp) * WM;  // this warp's tiles tile0 .. + WM - 1
  const int n0 = static_cast<int>(blockIdx.y) * BN;
  const int slice = static_cast<int>(blockIdx.z);
  const int iters = K / 64;
  const int it0 = static_cast<int>(static_cast<int64_t>(iters) * slice / S);
  const int it1 = static_cast<int>(static_cast<int64_t>(iters) * (slice + 1) / S);
  const int64_t row_vecs = K / 16;
  bool active[WM];
  const uint4* v0[WM];
  const uint32_t* mp[WM];
  warp_tiles<WM>(vals, meta, tile0, tiles, iters, row_vecs, lane, active, v0, mp);

  // This thread's pieces of a chunk: piece j = threadIdx + kThreads r: p = j % 8, token j / 8 % BN, iteration j / 8 BN.
  const auto load_x = [&](uint4(&xr)[kPer], int it) {
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int j = static_cast<int>(threadIdx.x) + kThreads * r;
      const int p = j & 7, n = (j >> 3) % BN, i = it + j / (8 * BN);
      const bool on = i < it1 && n0 + n < N;
      xr[r] = on ? ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(n0 + n) * K + 64 * i + 8 * p))
                 : make_uint4(0, 0, 0, 0);
    }
  };
  const auto store_x = [&](const uint4(&xr)[kPer], int buf) {
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int j = static_cast<int>(threadIdx.x) + kThreads * r;
      const int p = j & 7, n = (j >> 3) % BN, u = j / (8 * BN);
      stage_x<kOrder>(xs + buf * kBuf + (u * BN + n) * kTiledRow, p, xr[r]);
    }
  };
  // A of a chunk: a lane's 16 bytes of rows g and g + 8 of each tile, and its metadata word, an iteration.
  const auto load_a = [&](uint4(&a)[WM][U][2], uint32_t(&e)[WM][U], int it) {
#pragma unroll
    for (int m = 0; m < WM; ++m) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = it + u;
        const bool on = active[m] && i < it1;
        a[m][u][0] = on ? ld_stream16(v0[m] + 4 * static_cast<int64_t>(i)) : make_uint4(0, 0, 0, 0);
        a[m][u][1] = on ? ld_stream16(v0[m] + 8 * row_vecs + 4 * static_cast<int64_t>(i)) : make_uint4(0, 0, 0, 0);
        e[m][u] = on ? ldg(mp[m] + static_cast<int64_t>(i) * 32) : 0x44444444u;  // (off: valid words, zero values)
      }
    }
  };

  float d[WM][NT][4];
#pragma unroll
  for (int m = 0; m < WM; ++m) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) d[m][nt][0] = d[m][nt][1] = d[m][nt][2] = d[m][nt][3] = 0.f;
  }
  uint32_t bad[WM] = {};
  uint4 xr[kPer], a[WM][U][2];
  uint32_t e[WM][U];
  load_a(a, e, it0);
  load_x(xr, it0);
  store_x(xr, 0);
  __syncthreads();
  int buf = 0;
  for (int it = it0; it < it1; it += U) {
    const bool more = it + U < it1;
    uint4 na[WM][U][2];
    uint32_t ne[WM][U];
    if (more) {  // (the next chunk's loads, in flight while this one computes)
      load_a(na, ne, it + U);
      load_x(xr, it + U);
    }
    const uint16_t* xc = xs + buf * kBuf + (lane & 7) * kTiledRow + 8 * (lane >> 3);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      uint32_t a0[WM][4], a1[WM][4];
#pragma unroll
      for (int m = 0; m < WM; ++m) {
        const uint4 va = value_words<kOrder>(a[m][u][0]), vb = value_words<kOrder>(a[m][u][1]);
        a0[m][0] = va.x, a0[m][1] = vb.x, a0[m][2] = va.y, a0[m][3] = vb.y;
        a1[m][0] = va.z, a1[m][1] = vb.z, a1[m][2] = va.w, a1[m][3] = vb.w;
        if constexpr (kCheck) bad[m] |= bad_nibbles(e[m][u]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t b0[4], b1[4];
        const uint16_t* row = xc + (u * BN + 8 * nt) * kTiledRow;
        ldmatrix_x4(b0, row);
        ldmatrix_x4(b1, row + 32);
#pragma unroll
        for (int m = 0; m < WM; ++m) {
          mma_sp_16832<kBf16, 0>(d[m][nt], a0[m], b0, e[m][u]);
          mma_sp_16832<kBf16, 1>(d[m][nt], a1[m], b1, e[m][u]);
        }
      }
    }
    if (more) {
      store_x(xr, buf ^ 1);
#pragma unroll
      for (int m = 0; m < WM; ++m) {
#pragma unroll
        for (int u = 0; u < U; ++u) a[m][u][0] = na[m][u][0], a[m][u][1] = na[m][u][1], e[m][u] = ne[m][u];
      }
    }
    __syncthreads();  // (this chunk read by every warp before the next store; the next one stored before it is read)
    buf ^= 1;
  }
  finish_warp_tiles<T, NT, WM, kCheck>(d, bad, active, tile0, lane, bias, y, ws, cnt, M, N, S, slice, n0);
}

// The tiled kernel with a P-stage cp.async pipeline: x, A and the metadata go global -> shared
// without registers, P - 1 iterations ahead; one barrier an iteration. Orders 0 and 2: each virtual group
// of x is 4 contiguous columns, one 8-byte copy straight into the staged rows. Order 1 (its groups are
// the even / odd columns of 8): x lands raw, 16-byte pieces; after the wait each thread permutes the
// pieces it copied itself (visible to it without a barrier) into a double-buffered staged tile.
template <typename T, int NT, int WM, int P, bool kCheck, int kOrder>
__global__ void __launch_bounds__(kTiledWarps * 32, kTiledBlocksPerSm)
    sp24_tiled_async_kernel(const uint4* __restrict__ vals, const uint32_t* __restrict__ meta, const T* __restrict__ x,
                            const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
                            int* __restrict__ cnt, int M, int K, int N, int S) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  constexpr int BN = 8 * NT;
  constexpr int kThreads = kTiledWarps * 32;
  static_assert(P >= 2, "a pipeline of at least 2 stages");
  constexpr bool kRaw = kOrder == 1;
  constexpr int kPer = BN * 16 / kThreads;   // 8-byte pieces (virtual groups) of x a thread an iteration
  constexpr int kPer16 = BN * 8 / kThreads;  // (order 1) 16-byte pieces
  static_assert(BN * 8 % kThreads == 0, "an iteration's x must split evenly over the block");
  constexpr int kXStage = kRaw ? BN * 64 : BN * kTiledRow;  // elements of x a pipeline stage
  S3_DYNAMIC_SHARED(uint16_t, smem);
  uint16_t* xs = smem;                         // [P][kXStage]
  uint16_t* xd = smem + P * kXStage;           // (order 1) [2][BN][kTiledRow]
  uint4* as = reinterpret_cast<uint4*>(xd + (kRaw ? 2 * BN * kTiledRow : 0));  // [P][warps][WM][2][32]
  uint32_t* es = reinterpret_cast<uint32_t*>(as + P * kTiledWarps * WM * 64);   // [P][warps][WM][32]

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int tiles = M / 16;
  const int tile0 = (static_cast<int>(blockIdx.x) * kTiledWarps + warp) * WM;  // this warp's tiles tile0 .. + WM - 1
  const int n0 = static_cast<int>(blockIdx.y) * BN;
  const int slice = static_cast<int>(blockIdx.z);
  const int iters = K / 64;
  const int it0 = static_cast<int>(static_cast<int64_t>(iters) * slice / S);
  const int it1 = static_cast<int>(static_cast<int64_t>(iters) * (slice + 1) / S);
  const int64_t row_vecs = K / 16;
  bool active[WM];
  const uint4* v0[WM];
  const uint32_t* mp[WM];
  warp_tiles<WM>(vals, meta, tile0, tiles, iters, row_vecs, lane, active, v0, mp);

  // Step q (0 .. it1 - it0 - 1) of this slice takes iteration it0 + (q + rot) % steps: with S3_LAB_TILED_ROTATE = r,
  // row block b starts r b steps in, so the blocks of a slice do not all read the same columns of their rows at once.
  const int steps = it1 - it0;
  const int rot = S3_LAB_TILED_ROTATE && steps > 0 ? static_cast<int>(blockIdx.x * S3_LAB_TILED_ROTATE % steps) : 0;
  const auto issue = [&](int q, int slot) {  // step q's x, A and metadata into stage `slot`; one commit group
    if (q < steps) {
      const int i = it0 + (q + rot < steps ? q + rot : q + rot - steps);
      if constexpr (kRaw) {
#pragma unroll
        for (int r = 0; r < kPer16; ++r) {
          const int j = static_cast<int>(threadIdx.x) + kThreads * r;
          const int p = j & 7, n = j >> 3;
          const bool on = n0 + n < N;
          cp_async16(xs + slot * kXStage + n * 64 + 8 * p, x + static_cast<int64_t>(on ? n0 + n : 0) * K + 64 * i + 8 * p,
                     on);
        }
      } else {
#pragma unroll
        for (int r = 0; r < kPer; ++r) {
          const int j = static_cast<int>(threadIdx.x) + kThreads * r;
          const int G = j & 15, n = j >> 4;
          const int col = kOrder == 2 ? 16 * (G >> 2) + 4 * (((G & 1) << 1) | ((G >> 1) & 1)) : 4 * G;
          const bool on = n0 + n < N;
          cp_async_ca<8>(xs + slot * kXStage + n * kTiledRow + staged_col(G),
                         x + static_cast<int64_t>(on ? n0 + n : 0) * K + 64 * i + col, on);
        }
      }
#pragma unroll
      for (int m = 0; m < WM; ++m) {
        const int at = (slot * kTiledWarps + warp) * WM + m;
        cp_async16(as + at * 64 + lane, v0[m] + 4 * static_cast<int64_t>(i), active[m]);
        cp_async16(as + at * 64 + 32 + lane, v0[m] + 8 * row_vecs + 4 * static_cast<int64_t>(i), active[m]);
        cp_async_ca<4>(es + at * 32 + lane, mp[m] + static_cast<int64_t>(i) * 32, active[m]);
      }
    }
    cp_async_commit();
  };

  float d[WM][NT][4];
#pragma unroll
  for (int m = 0; m < WM; ++m) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) d[m][nt][0] = d[m][nt][1] = d[m][nt][2] = d[m][nt][3] = 0.f;
  }
  uint32_t bad[WM] = {};
#pragma unroll
  for (int s = 0; s < P - 1; ++s) issue(s, s);
  for (int q = 0; q < steps; ++q) {
    cp_async_wait<P - 2>();
    const int slot = q % P;
    uint16_t* xt = kRaw ? xd + (q & 1) * BN * kTiledRow : xs + slot * kXStage;  // step q's staged x
    if constexpr (kRaw) {  // (this thread's own copies: visible to it after the wait)
#pragma unroll
      for (int r = 0; r < kPer16; ++r) {
        const int j = static_cast<int>(threadIdx.x) + kThreads * r;
        const int p = j & 7, n = j >> 3;
        stage_x<1>(xt + n * kTiledRow, p, *reinterpret_cast<const uint4*>(xs + slot * kXStage + n * 64 + 8 * p));
      }
    }
    __syncthreads();  // (step q landed / staged for every thread; the stages of q - 1 and q - 2 read by every warp)
    issue(q + P - 1, (q + P - 1) % P);
    uint32_t a0[WM][4], a1[WM][4], e[WM];
#pragma unroll
    for (int m = 0; m < WM; ++m) {
      const int at = (slot * kTiledWarps + warp) * WM + m;
      const uint4 va = value_words<kOrder>(as[at * 64 + lane]), vb = value_words<kOrder>(as[at * 64 + 32 + lane]);
      e[m] = active[m] ? es[at * 32 + lane] : 0x44444444u;
      a0[m][0] = va.x, a0[m][1] = vb.x, a0[m][2] = va.y, a0[m][3] = vb.y;
      a1[m][0] = va.z, a1[m][1] = vb.z, a1[m][2] = va.w, a1[m][3] = vb.w;
      if constexpr (kCheck) bad[m] |= bad_nibbles(e[m]);
    }
    const uint16_t* xc = xt + (lane & 7) * kTiledRow + 8 * (lane >> 3);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b0[4], b1[4];
      ldmatrix_x4(b0, xc + 8 * nt * kTiledRow);
      ldmatrix_x4(b1, xc + 8 * nt * kTiledRow + 32);
#pragma unroll
      for (int m = 0; m < WM; ++m) {  // (WM > 1: each B fragment feeds WM tiles, 1 / WM of the shared-memory reads)
        mma_sp_16832<kBf16, 0>(d[m][nt], a0[m], b0, e[m]);
        mma_sp_16832<kBf16, 1>(d[m][nt], a1[m], b1, e[m]);
      }
    }
  }
  cp_async_wait<0>();
  finish_warp_tiles<T, NT, WM, kCheck>(d, bad, active, tile0, lane, bias, y, ws, cnt, M, N, S, slice, n0);
}

// One launch of the tiled kernel for all n tokens of xs (n > kLaunchTokens).
template <typename T>
void launch_sp24_tiled(const at::Tensor& xs, const at::Tensor& values, const at::Tensor& sp_meta,
                       const std::optional<at::Tensor>& bias, at::Tensor& ys, int64_t M, int64_t K, bool checked,
                       int64_t order, cudaStream_t stream) {
  const int64_t n = xs.size(0);
  const int nt = n <= 32 ? S3_LAB_TILED_NT32 : n <= 64 ? 8 : S3_LAB_TILED_NT_LARGE;
  const int64_t bn = 8 * nt, token_tiles = ceil_div(n, bn);
  const int64_t tiles = M / 16, iters = K / 64, row_blocks = ceil_div(tiles, kTiledWarps * kTiledWm);
  const int64_t want = multiprocessors() * kTiledFill / (row_blocks * token_tiles);  // (rounded down)
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>(want, iters / kTiledMinIters));
  S3_CHECK_VALUE(token_tiles <= 65535, "s3sparse.sp24_linear: ", std::to_string(n),
                 " tokens are beyond one launch's grid; pass at most ", std::to_string(65535 * bn), " a call");
  at::Tensor ws = S > 1 ? at::empty({S, token_tiles, M, bn}, values.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor cnt = S > 1 ? tile_counters(tiles * token_tiles, values, stream) : at::Tensor();
  const Sp24Operands<T> args(xs, values, sp_meta, bias, ys, M, K, S, ws, cnt);
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(token_tiles), static_cast<unsigned>(S));
  const auto launch = [&](auto nt_tag, auto order_tag, auto check_tag) {
    constexpr int NT = decltype(nt_tag)::value, O = decltype(order_tag)::value;
    constexpr bool C = decltype(check_tag)::value;
    if constexpr (S3_LAB_TILED_ASYNC) {
      constexpr int P = S3_LAB_TILED_P;
      constexpr auto kernel = sp24_tiled_async_kernel<T, NT, kTiledWm, P, C, O>;
      constexpr int64_t tn = 8 * NT, x_stage = O == 1 ? tn * 64 * 2 : tn * kTiledRow * 2;
      const int64_t smem = int64_t(P) * (x_stage + kTiledWarps * kTiledWm * (64 * 16 + 32 * 4)) +
                           (O == 1 ? 2 * tn * kTiledRow * 2 : 0);
      allow_shared<kernel>(smem);
      args.launch(kernel, grid, kTiledWarps * 32, smem, stream, false);
    } else {
      constexpr int U = kTiledU;
      constexpr auto kernel = sp24_tiled_kernel<T, NT, kTiledWm, U, C, O>;
      const int64_t smem = 2 * int64_t(U) * 8 * NT * kTiledRow * 2;
      allow_shared<kernel>(smem);
      args.launch(kernel, grid, kTiledWarps * 32, smem, stream, false);
    }
  };
  const auto by_check = [&](auto nt_tag, auto order_tag) {
    checked ? launch(nt_tag, order_tag, std::false_type{}) : launch(nt_tag, order_tag, std::true_type{});
  };
  const auto by_order = [&](auto nt_tag) {
    if (order == 0) {
      by_check(nt_tag, std::integral_constant<int, 0>{});
    } else if (order == 1) {
      by_check(nt_tag, std::integral_constant<int, 1>{});
    } else {
      by_check(nt_tag, std::integral_constant<int, 2>{});
    }
  };
  if constexpr (S3_LAB_TILED_NT_LARGE == 16) {  // (a lab build alone compiles the 128-token tile)
    if (nt == 16) by_order(std::integral_constant<int, 16>{});
  }
  if (nt == 8) {
    by_order(std::integral_constant<int, 8>{});
  } else if (nt == 4) {
    by_order(std::integral_constant<int, 4>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace packed_cuda
}  // namespace s3sparse
