// A 2:4 decode kernel on the sparse tensor cores (mma.sp m16n8k32), for
// benchmarks/lab/sp24_lab.py: built there with torch.utils.cpp_extension, not part
// of the package. fp16, 1-32 tokens (tiles of 8), M a multiple of 16, K a multiple of 64.
//
// The values are the package's canonical 2:4 packed values (a row's kept values
// in column order, K/2 a row) read as they are: lane (g, t) of a warp loads 16
// bytes of row g and of row g + 8 a step pair, the 8 kept values of original
// columns [64 i + 16 t, 64 i + 16 t + 16). The sum over k does not depend on
// the order of k, so the kernel gives the tensor cores a permuted k: in
// iteration i, step s (two m16n8k32 steps an iteration), virtual 4-column group
// q is original group 16 i + 4 (q % 4) + 2 s + q / 4. With that order a
// lane's A registers are words of its two 16-byte loads, and its B registers are
// 4-byte loads of x at fixed offsets. The metadata (2 bits a kept value) is
// built once on the host in the order the instruction reads it (sp24_lab.py),
// one 32-bit word a lane an iteration (SP_SELSPLIT: step 0 reads lanes t = 0, 1
// with selector 0, step 1 lanes t = 2, 3 with selector 1), else two words a
// lane (both steps selector 0).
//
// A warp computes one 16-row tile over a slice of K (S slices a tile, chosen
// by the host so the grid fills the GPU); the last warp of a tile to finish
// sums the slices' partial tiles (fp32 workspace, in slice order: the result
// does not depend on the order warps finish), adds the bias and rounds once.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cstdint>

#ifndef SP_U
#define SP_U 4
#endif
#ifndef SP_SELSPLIT
#define SP_SELSPLIT 1
#endif
#ifndef SP_WARPS
#define SP_WARPS 8
#endif
#ifndef SP_OWNMETA
#define SP_OWNMETA 0
#endif

namespace {

template <int SEL>
__device__ __forceinline__ void mma_sp(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3, uint32_t e) {
  asm volatile(
      "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(b2), "r"(b3), "r"(e), "n"(SEL));
}

// SP_L2PF=128 / 256: the load asks L2 to fetch the whole 128 / 256-byte span around it (prefetch).
#ifndef SP_L2PF
#define SP_L2PF 0
#endif
#if SP_L2PF == 256
#define SP_LD "ld.global.nc.L1::no_allocate.L2::256B.v4.u32"
#elif SP_L2PF == 128
#define SP_LD "ld.global.nc.L1::no_allocate.L2::128B.v4.u32"
#else
#define SP_LD "ld.global.nc.L1::no_allocate.v4.u32"
#endif
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile(SP_LD " {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

constexpr int kMetaWords = SP_SELSPLIT ? 1 : 2;

// SP_OWNMETA: the package's own 2:4 meta (3-bit codes of the lexicographic 2-of-4 table, 10 a
// 32-bit word, field r K/4 + group) turned into this lane's metadata word in the kernel. Lane t
// gives step t / 2's word for virtual groups 4 (t & 1) + j, j < 4, which are original groups
// 16 i + 4 j + t of rows g (bits 0-15) and g + 8 (bits 16-31).
__device__ __forceinline__ uint32_t own_meta_row(const int32_t* __restrict__ meta, int64_t f) {
  uint32_t e = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t fj = f + 4 * j;
    const int64_t word = fj / 10;
    const uint32_t code = (static_cast<uint32_t>(__ldg(meta + word)) >> (3 * static_cast<int>(fj - 10 * word))) & 7u;
    e |= ((0x00ED9C84u >> (4 * code)) & 0xFu) << (4 * j);
  }
  return e;
}
// x offsets (halves) of a lane's 8 B registers in an iteration: step s, registers 0-3.
__device__ __forceinline__ constexpr int x_off(int j) {
  return 8 * (j / 4) + ((j % 4) & 1 ? 32 : 0) + ((j % 4) >= 2 ? 4 : 0);
}

// NT tiles of 8 tokens (1-8, 9-16, 17-32 tokens: NT = 1, 2, 4).
template <int U, int NT>
__global__ void __launch_bounds__(SP_WARPS * 32)
    sp24_kernel(const uint4* __restrict__ vals, const uint32_t* __restrict__ meta, const __half* __restrict__ x,
                const __half* __restrict__ bias, __half* __restrict__ y, float* __restrict__ ws,
                int* __restrict__ cnt, int M, int K, int N, int S) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int gw = static_cast<int>(blockIdx.x) * SP_WARPS + static_cast<int>(threadIdx.x) / 32;
  const int tiles = M / 16;
  if (gw >= tiles * S) return;
  const int tile = gw / S, slice = gw % S;
  const int iters = K / 64;
  const int it0 = static_cast<int>(static_cast<int64_t>(iters) * slice / S);
  const int it1 = static_cast<int>(static_cast<int64_t>(iters) * (slice + 1) / S);
  const int g = lane >> 2, t = lane & 3;
  const int rc = K / 16;  // uint4 a row
  const uint4* v0p = vals + static_cast<int64_t>(tile * 16 + g) * rc + t;
  const uint4* v1p = v0p + static_cast<int64_t>(8) * rc;
  [[maybe_unused]] const uint32_t* mp = meta + static_cast<int64_t>(tile) * iters * 32 * kMetaWords + lane * kMetaWords;
  bool xon[NT];
  const __half* xp[NT];
  float d[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    xon[nt] = 8 * nt + g < N;
    xp[nt] = x + static_cast<int64_t>(xon[nt] ? 8 * nt + g : 0) * K + 16 * (t >> 1) + 2 * (t & 1);
    d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = 0.f;
  }
  for (int it = it0; it < it1; it += U) {
    uint4 a[U], b[U];
    uint32_t e[U][kMetaWords], xb[U][NT][8];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = it + u;
      const bool on = i < it1;
      a[u] = on ? ld_stream(v0p + 4 * i) : make_uint4(0, 0, 0, 0);
      b[u] = on ? ld_stream(v1p + 4 * i) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int w = 0; w < kMetaWords; ++w) {
#if SP_OWNMETA
        const int32_t* pm = reinterpret_cast<const int32_t*>(meta);
        const int64_t f0 = static_cast<int64_t>(tile * 16 + g) * (K / 4) + 16 * i + t;
        e[u][w] = on ? own_meta_row(pm, f0) | (own_meta_row(pm, f0 + static_cast<int64_t>(8) * (K / 4)) << 16) : 0u;
#else
        e[u][w] = on ? __ldg(mp + static_cast<int64_t>(i) * 32 * kMetaWords + w) : 0u;
#endif
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
          xb[u][nt][j] = on && xon[nt] ? __ldg(reinterpret_cast<const uint32_t*>(xp[nt] + 64 * i + x_off(j))) : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t* xq = xb[u][nt];
        mma_sp<0>(d[nt], a[u].x, b[u].x, a[u].y, b[u].y, xq[0], xq[1], xq[2], xq[3], e[u][0]);
#if SP_SELSPLIT
        mma_sp<1>(d[nt], a[u].z, b[u].z, a[u].w, b[u].w, xq[4], xq[5], xq[6], xq[7], e[u][0]);
#else
        mma_sp<0>(d[nt], a[u].z, b[u].z, a[u].w, b[u].w, xq[4], xq[5], xq[6], xq[7], e[u][kMetaWords - 1]);
#endif
      }
    }
  }
  const int r0 = tile * 16 + g, r1 = r0 + 8;
  constexpr int W = 8 * NT;  // workspace columns a row: the token slots
  float sum[NT][4];
  if (S == 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) sum[nt][c] = d[nt][c];
  } else {
    // d[nt]: (row g, token 8 nt + 2t), (g, + 1), (g + 8, 8 nt + 2t), (g + 8, + 1); workspace [S][M][W].
    float* wp = ws + (static_cast<int64_t>(slice) * M + tile * 16) * W;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = 8 * nt + 2 * t;
      wp[g * W + n] = d[nt][0];
      wp[g * W + n + 1] = d[nt][1];
      wp[(g + 8) * W + n] = d[nt][2];
      wp[(g + 8) * W + n + 1] = d[nt][3];
    }
    __threadfence();
    __syncwarp();
    int old = 0;
    if (lane == 0) {
      old = atomicAdd(cnt + tile, 1);
      __threadfence();  // (acquire: the other slices' partials before this warp reads them)
    }
    old = __shfl_sync(0xffffffffu, old, 0);
    if (old != S - 1) return;
    __syncwarp();
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) sum[nt][0] = sum[nt][1] = sum[nt][2] = sum[nt][3] = 0.f;
    for (int sl = 0; sl < S; ++sl) {
      const float* p = ws + (static_cast<int64_t>(sl) * M + tile * 16) * W;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = 8 * nt + 2 * t;
        sum[nt][0] += __ldcg(p + g * W + n);
        sum[nt][1] += __ldcg(p + g * W + n + 1);
        sum[nt][2] += __ldcg(p + (g + 8) * W + n);
        sum[nt][3] += __ldcg(p + (g + 8) * W + n + 1);
      }
    }
    if (lane == 0) cnt[tile] = 0;  // ready for the next call (a graph replays it)
  }
  const float b0 = bias ? __half2float(bias[r0]) : 0.f, b1 = bias ? __half2float(bias[r1]) : 0.f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int n0 = 8 * nt + 2 * t, n1 = n0 + 1;
    if (n0 < N) {
      y[static_cast<int64_t>(n0) * M + r0] = __float2half_rn(sum[nt][0] + b0);
      y[static_cast<int64_t>(n0) * M + r1] = __float2half_rn(sum[nt][2] + b1);
    }
    if (n1 < N) {
      y[static_cast<int64_t>(n1) * M + r0] = __float2half_rn(sum[nt][1] + b0);
      y[static_cast<int64_t>(n1) * M + r1] = __float2half_rn(sum[nt][3] + b1);
    }
  }
}

}  // namespace

// y (N, M) = x (N, K) W^T (+ bias), N <= 32; vals (M, K/2) fp16, meta from sp24_lab.py's builder;
// ws (S, M, 8 ceil(N/8)) fp32 and cnt (M/16) int32 zeros (cnt is left zero; a launch that aborts leaves it
// non-zero, and one cnt must not serve two streams at once: a lab simplification).
at::Tensor sp24_linear(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& meta,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& ws, const at::Tensor& cnt, int64_t S) {
  const int64_t N = x.size(0), K = x.size(1), M = vals.size(0);
  TORCH_CHECK(N >= 1 && N <= 32, "sp24 lab: 1-32 tokens");
  const int64_t nt = N <= 8 ? 1 : N <= 16 ? 2 : 4;
  TORCH_CHECK(M % 16 == 0 && K % 64 == 0, "sp24 lab: M % 16, K % 64");
  TORCH_CHECK(x.is_cuda() && vals.device() == x.device() && meta.device() == x.device() && ws.device() == x.device() &&
                  cnt.device() == x.device(), "sp24 lab: every tensor on x's CUDA device");
  TORCH_CHECK(x.scalar_type() == at::kHalf && vals.scalar_type() == at::kHalf, "sp24 lab: fp16 x and values");
  TORCH_CHECK(x.is_contiguous() && vals.is_contiguous() && meta.is_contiguous() && ws.is_contiguous(),
              "sp24 lab: contiguous tensors");
  TORCH_CHECK(vals.dim() == 2 && vals.size(1) == K / 2, "sp24 lab: values (M, K/2)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(vals.data_ptr()) % 16 == 0, "sp24 lab: 16-byte aligned values");
  TORCH_CHECK(meta.scalar_type() == at::kInt &&
                  meta.numel() >= (SP_OWNMETA ? (M * K / 4 + 9) / 10 : M / 16 * (K / 64) * 32 * kMetaWords),
              "sp24 lab: int32 meta of the layout built for this variant");
  TORCH_CHECK(S >= 1 && S <= K / 64, "sp24 lab: 1 <= S <= K/64");
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.numel() >= S * M * 8 * nt, "sp24 lab: fp32 ws of S*M*8*ceil(N/8) (N <= 32: 8, 16 or 32 a row)");
  TORCH_CHECK(cnt.scalar_type() == at::kInt && cnt.numel() >= M / 16, "sp24 lab: int32 cnt of M/16");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kHalf && bias->numel() == M && bias->is_contiguous() &&
                                    bias->device() == x.device()),
              "sp24 lab: fp16 bias of M");
  at::Tensor y = at::empty({N, M}, x.options());
  const int64_t warps = M / 16 * S;
  const int blocks = static_cast<int>((warps + SP_WARPS - 1) / SP_WARPS);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, SP_WARPS * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint4*>(vals.data_ptr<at::Half>()), reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()),
        reinterpret_cast<const __half*>(x.data_ptr<at::Half>()),
        bias.has_value() ? reinterpret_cast<const __half*>(bias->data_ptr<at::Half>()) : nullptr,
        reinterpret_cast<__half*>(y.data_ptr<at::Half>()), ws.data_ptr<float>(), cnt.data_ptr<int32_t>(),
        static_cast<int>(M), static_cast<int>(K), static_cast<int>(N), static_cast<int>(S));
  };
  if (nt == 1) {
    launch(sp24_kernel<SP_U, 1>);
  } else if (nt == 2) {
    launch(sp24_kernel<2, 2>);
  } else {
    launch(sp24_kernel<1, 4>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("linear", &sp24_linear); }
