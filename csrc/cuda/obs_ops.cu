// CUDA kernel of score_subsets, with the semantics of csrc/cpu/obs_ops.cpp (same
// validation and messages, same +inf rule): one (item, subset) pair per thread
// for P <= kThreadMaxP (the P x P matrix in registers / local memory), one pair
// per warp above that (the matrix in shared memory, a right-looking Cholesky
// with the forward solve of w_P folded in). Then one thread per item picks the
// first least cost. (True OBS's Schur updates are lowrank_sub: csrc/cuda/lowrank.cu.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "cuda/launch.cuh"

namespace s3sparse {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_for(int64_t work_items, int64_t per_block) {
  const int64_t blocks = std::max<int64_t>(1, ceil_div(work_items, per_block));
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t(1) << 20));
}

template <typename T>
__device__ __forceinline__ bool pivot_ok(T d) {
  return d > T(0) && d < T(INFINITY);
}

// ================================================================== score_subsets
constexpr int kThreadMaxP = 8;

template <typename acc_t, typename c_t>
__global__ void score_subsets_thread_kernel(const acc_t* __restrict__ w, const c_t* __restrict__ c,
                                            const int64_t* __restrict__ c_index,
                                            const int64_t* __restrict__ subsets,
                                            acc_t* __restrict__ costs, int64_t N, int64_t S,
                                            int64_t P, int64_t E) {
  const int64_t total = N * S;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += step) {
    const int64_t n = t / S, s = t - n * S;
    const c_t* C = c + (c_index ? c_index[n] : n) * E * E;
    const acc_t* wn = w + n * E;
    const int64_t* idx = subsets + s * P;
    acc_t a[kThreadMaxP * kThreadMaxP];
    acc_t z[kThreadMaxP];
    for (int64_t i = 0; i < P; ++i) {
      const int64_t ii = idx[i];
      for (int64_t j = 0; j < P; ++j) a[i * P + j] = static_cast<acc_t>(C[ii * E + idx[j]]);
      z[i] = wn[ii];
    }
    acc_t cost = acc_t(INFINITY);
    if (small_cholesky(a, P)) {
      small_forward_solve(a, z, P);
      cost = 0;
      for (int64_t i = 0; i < P; ++i) cost += z[i] * z[i];
    }
    costs[t] = cost;
  }
}

// One warp per (item, subset); each warp owns P*P + P acc_t of shared memory.
template <typename acc_t, typename c_t>
__global__ void score_subsets_warp_kernel(const acc_t* __restrict__ w, const c_t* __restrict__ c,
                                          const int64_t* __restrict__ c_index,
                                          const int64_t* __restrict__ subsets,
                                          acc_t* __restrict__ costs, int64_t N, int64_t S,
                                          int64_t P, int64_t E) {
  S3_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t warp = threadIdx.x / 32;
  acc_t* a = reinterpret_cast<acc_t*>(smem_raw) + warp * (P * P + P);
  acc_t* z = a + P * P;
  const int64_t total = N * S;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps_per_block + warp; t < total; t += step) {
    const int64_t n = t / S, s = t - n * S;
    const c_t* C = c + (c_index ? c_index[n] : n) * E * E;
    const acc_t* wn = w + n * E;
    const int64_t* idx = subsets + s * P;
    // Lower triangle of C_PP (the entries the CPU kernel's Cholesky reads).
    for (int64_t e = lane; e < P * P; e += 32) {
      const int64_t i = e / P, j = e - i * P;
      if (j <= i) a[i * P + j] = static_cast<acc_t>(C[idx[i] * E + idx[j]]);
    }
    for (int64_t i = lane; i < P; i += 32) z[i] = wn[idx[i]];
    __syncwarp();
    // Right-looking Cholesky; column j of L is final after its scaling, so the
    // forward substitution z <- L^-1 z advances with it. Every lane reads the
    // same pivot, so `ok` and the break are warp-uniform.
    bool ok = true;
    for (int64_t j = 0; j < P; ++j) {
      acc_t d = a[j * P + j];
      acc_t zj = z[j];
      if (!pivot_ok(d)) {
        ok = false;
        break;
      }
      d = sqrt(d);
      zj = zj / d;
      __syncwarp();  // every lane has read a[j][j] and z[j]
      if (lane == 0) {
        a[j * P + j] = d;
        z[j] = zj;
      }
      for (int64_t i = j + 1 + lane; i < P; i += 32) {
        const acc_t l = a[i * P + j] / d;
        a[i * P + j] = l;
        z[i] -= l * zj;
      }
      __syncwarp();
      const int64_t m2 = P - j - 1;
      for (int64_t e = lane; e < m2 * m2; e += 32) {
        const int64_t i = j + 1 + e / m2, m = j + 1 + e % m2;
        if (m <= i) a[i * P + m] -= a[i * P + j] * a[m * P + j];
      }
      __syncwarp();
    }
    acc_t cost = acc_t(INFINITY);
    if (ok) {
      acc_t part = 0;
      for (int64_t i = lane; i < P; i += 32) part += z[i] * z[i];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) part += __shfl_down_sync(0xffffffffu, part, o);
      cost = part;
    }
    if (lane == 0) costs[t] = cost;
    __syncwarp();  // a and z are rewritten for the next pair
  }
}

// best[n] = the first s of least cost (NaN never wins; all +inf -> 0).
template <typename acc_t>
__global__ void argmin_kernel(const acc_t* __restrict__ costs, int64_t* __restrict__ best, int64_t N,
                              int64_t S) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += step) {
    acc_t best_cost = acc_t(INFINITY);
    int64_t best_s = 0;
    for (int64_t s = 0; s < S; ++s) {
      const acc_t v = costs[n * S + s];
      if (v < best_cost) {
        best_cost = v;
        best_s = s;
      }
    }
    best[n] = best_s;
  }
}

std::tuple<at::Tensor, at::Tensor> score_subsets_cuda(const at::Tensor& w_in, const at::Tensor& c_in,
                                                      const std::optional<at::Tensor>& c_index_in,
                                                      const at::Tensor& subsets_in) {
  constexpr const char* op = "s3sparse.score_subsets";
  check_score_subsets(w_in, c_in, c_index_in, subsets_in, op);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const at::Tensor c = c_in.contiguous();
  const at::Tensor subsets = subsets_in.contiguous();
  const int64_t N = w.size(0), E = w.size(1), U = c.size(0);
  const int64_t S = subsets.size(0), P = subsets.size(1);
  {
    // (S, P) is small: check it on the host, with the CPU kernel's message.
    const at::Tensor sub_host = subsets.to(at::kCPU);
    const int64_t* sub = sub_host.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < S * P; ++i) {
      S3_CHECK_VALUE(sub[i] >= 0 && sub[i] < E, op, ": `subsets` entries must be in [0, ", E,
                     "), got ", sub[i], " in subset ", i / P);
    }
  }
  at::Tensor c_index;
  if (c_index_in.has_value()) {
    c_index = c_index_in->contiguous();
    if (N > 0) {
      // A reduction on the device and one host sync; the offending entry is
      // only looked up when there is one.
      const at::Tensor bad = at::logical_or(c_index.lt(0), c_index.ge(U));
      if (bad.any().item<bool>()) {
        const int64_t n = bad.nonzero().select(1, 0)[0].item<int64_t>();
        const int64_t val = c_index[n].item<int64_t>();
        S3_CHECK_VALUE(false, op, ": `c_index` entries must be in [0, ", U, "), got ", val,
                       " at item ", n);
      }
    }
  }
  at::Tensor costs = at::empty({N, S}, w.options());
  at::Tensor best = at::zeros({N}, w.options().dtype(at::kLong));
  if (N == 0 || S == 0) return {costs, best};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "score_subsets_cuda_w", [&] {
    using acc_t = scalar_t;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* cost_out = costs.mutable_data_ptr<acc_t>();
    const int64_t* ci = c_index.defined() ? c_index.const_data_ptr<int64_t>() : nullptr;
    const int64_t* sub = subsets.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "score_subsets_cuda_c", [&] {
      using c_t = scalar_t;
      const c_t* cp = c.const_data_ptr<c_t>();
      if (P <= kThreadMaxP) {
        constexpr int threads = 128;
        S3_LAUNCH(grid_for(N * S, threads), threads, 0, stream, score_subsets_thread_kernel<acc_t, c_t>)(
            wp, cp, ci, sub, cost_out, N, S, P, E);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int64_t per_warp = (P * P + P) * static_cast<int64_t>(sizeof(acc_t));
        constexpr int64_t kDefaultSmem = 48 * 1024;
        int64_t warps = std::min<int64_t>(4, kDefaultSmem / per_warp);
        auto kernel = score_subsets_warp_kernel<acc_t, c_t>;
        if (warps < 1) {
          // One warp per block, with the opt-in (larger) shared memory.
          int device = 0, optin = 0;
          C10_CUDA_CHECK(cudaGetDevice(&device));
          C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
          S3_CHECK_VALUE(per_warp <= optin, op, ": subsets of P=", P, " indices need ", per_warp,
                         " bytes of shared memory per (item, subset) on CUDA, more than the ", optin,
                         " this GPU offers; use fewer indices per subset or float32 `w`");
          C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(per_warp)));
          warps = 1;
        }
        const int threads = static_cast<int>(warps * 32);
        const size_t smem = static_cast<size_t>(warps * per_warp);
        S3_LAUNCH(grid_for(N * S, warps), threads, smem, stream, kernel)(wp, cp, ci, sub, cost_out, N, S, P, E);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    constexpr int threads = 256;
    S3_LAUNCH(grid_for(N, threads), threads, 0, stream, argmin_kernel<acc_t>)(
        cost_out, best.mutable_data_ptr<int64_t>(), N, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {costs, best};
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) { m.impl("score_subsets", &score_subsets_cuda); }

}  // namespace s3sparse
