// CUDA kernels of the two OBS operators, with the semantics of
// csrc/cpu/obs_ops.cpp (same validation and messages, same +inf / status rules).
//
// score_subsets: one (item, subset) pair per thread for P <= kThreadMaxP (the
//   P x P matrix in registers / local memory), one pair per warp above that
//   (the matrix in shared memory, a right-looking Cholesky with the forward
//   solve of w_P folded in). Then one thread per item picks the first least cost.
// schur_update_: rows are processed in chunks that bound the K x P workspace;
//   per chunk three kernels, in stream order:
//   1. chol (thread block per row, L in shared memory when it fits): L = chol(C_SS),
//      z = L^-1 w_S in acc precision; a non-PD C_SS sets status[b] = 1 and the
//      later stages skip row b, so a failing row is never written. On success
//      marks the columns S of row b.
//   2. solve: At = L^-1 C[S, :] (A = At^T = C[:, S] L^-T): L^-1 by a batched
//      triangular solve of the P x P identity, times the gathered rows C[S, :]
//      by batched GEMM (ATen / cuBLAS); w -= At^T z, w_S = 0.
//   3. update: C -= A A^T by a batched tensor-core GEMM (ATen's baddbmm, fp32
//      accumulation; for fp16/bf16 storage A is split into hi + lo parts, written
//      in one pass, so the update keeps ~fp32 accuracy), then rows/cols S of C
//      are set to exactly 0.
//   C is read as C[S, k] where the CPU kernel reads C[k, S]: equal for the
//   symmetric C the op is documented to take.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

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

// ================================================================== schur_update_
// Row bl of a chunk: cols[bl*ld .. +counts[bl]) are its P pruned columns; L its
// ld x ld factor slot (identity past P), z its ld slot (zero past P), mask its K
// flags (the columns S of a row that succeeded).

constexpr int kCholThreads = 256;

// L = chol(C_SS), z = L^-1 w_S (acc precision), one thread block per row. The
// factor is built in shared memory when `in_shared` (ld x ld fits), else in
// place in the global slot; either way the slot ends as L (lower, zero above,
// identity past P). A non-PD C_SS sets status 1 and leaves the slot identity
// and z zero, so later stages see a harmless row (and skip it by status).
template <typename acc_t, typename c_t>
__global__ void __launch_bounds__(kCholThreads)
schur_chol_kernel(const acc_t* __restrict__ w, const c_t* __restrict__ c,
                  const int64_t* __restrict__ cols, const int* __restrict__ counts, acc_t* __restrict__ Lg,
                  acc_t* __restrict__ z, uint8_t* __restrict__ mask, int* __restrict__ status, int64_t nb,
                  int64_t K, int ld, bool in_shared) {
  S3_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int tid = static_cast<int>(threadIdx.x);
  constexpr int T = kCholThreads;
  for (int64_t bl = blockIdx.x; bl < nb; bl += gridDim.x) {
    const int P = counts[bl];
    const int64_t* Sb = cols + bl * ld;
    const c_t* C = c + bl * K * K;
    const acc_t* wb = w + bl * K;
    acc_t* Lout = Lg + bl * static_cast<int64_t>(ld) * ld;
    acc_t* Lb = in_shared ? reinterpret_cast<acc_t*>(smem_raw) : Lout;
    acc_t* zb = z + bl * ld;
    for (int e = tid; e < ld * ld; e += T) {
      const int i = e / ld, j = e - i * ld;
      Lb[e] = (i < P && j <= i) ? static_cast<acc_t>(C[Sb[i] * K + Sb[j]]) : acc_t(i == j ? 1 : 0);
    }
    for (int i = tid; i < ld; i += T) zb[i] = i < P ? wb[Sb[i]] : acc_t(0);
    __syncthreads();
    // Right-looking Cholesky with the forward solve of z folded in. Every thread
    // reads the same pivot after a barrier, so `ok` and the break are uniform.
    bool ok = true;
    for (int j = 0; j < P; ++j) {
      acc_t d = Lb[j * ld + j];
      const acc_t zj0 = zb[j];
      if (!pivot_ok(d)) {
        ok = false;
        break;
      }
      d = sqrt(d);
      const acc_t zj = zj0 / d;
      __syncthreads();  // every thread has read L[j][j] and z[j]
      if (tid == 0) {
        Lb[j * ld + j] = d;
        zb[j] = zj;
      }
      for (int i = j + 1 + tid; i < P; i += T) {
        const acc_t l = Lb[i * ld + j] / d;
        Lb[i * ld + j] = l;
        zb[i] -= l * zj;
      }
      __syncthreads();
      const int m2 = P - j - 1;
      for (int e = tid; e < m2 * m2; e += T) {
        const int i = j + 1 + e / m2, m = j + 1 + e % m2;
        if (m <= i) Lb[i * ld + m] -= Lb[i * ld + j] * Lb[m * ld + j];
      }
      __syncthreads();
    }
    __syncthreads();
    if (!ok) {
      for (int e = tid; e < ld * ld; e += T) Lout[e] = acc_t((e / ld) == (e % ld) ? 1 : 0);
      for (int i = tid; i < ld; i += T) zb[i] = acc_t(0);
      if (tid == 0) status[bl] = 1;
    } else {
      if (in_shared)
        for (int e = tid; e < ld * ld; e += T) Lout[e] = Lb[e];
      for (int i = tid; i < P; i += T) mask[bl * K + Sb[i]] = 1;
    }
    __syncthreads();  // the shared slot is reused by the next row
  }
}

// CS[bl, p, :] = C[S_p, :] in acc precision (zero rows past P): the right-hand
// side of L At = C[S, :]. Thread per (row, p, k), coalesced along k.
template <typename acc_t, typename c_t>
__global__ void schur_gather_rows_kernel(const c_t* __restrict__ c, const int64_t* __restrict__ cols,
                                         const int* __restrict__ counts, acc_t* __restrict__ CS, int64_t nb,
                                         int64_t K, int64_t ld) {
  const int64_t kstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t bl = blockIdx.z; bl < nb; bl += gridDim.z) {
    const c_t* C = c + bl * K * K;
    for (int64_t p = blockIdx.y; p < ld; p += gridDim.y) {
      acc_t* out = CS + (bl * ld + p) * K;
      const bool valid = p < counts[bl];
      const c_t* src = valid ? C + cols[bl * ld + p] * K : nullptr;
      for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K; k += kstep)
        out[k] = valid ? static_cast<acc_t>(src[k]) : acc_t(0);
    }
  }
}

// w -= delta (= A z) and w_S = 0, for the rows that succeeded.
template <typename acc_t>
__global__ void schur_update_w_kernel(acc_t* __restrict__ w, const acc_t* __restrict__ delta,
                                      const uint8_t* __restrict__ mask, const int* __restrict__ status,
                                      int64_t nb, int64_t K) {
  const int64_t kstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t bl = blockIdx.y; bl < nb; bl += gridDim.y) {
    if (status[bl] != 0) continue;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K; k += kstep) {
      const int64_t i = bl * K + k;
      w[i] = mask[i] ? acc_t(0) : w[i] - delta[i];
    }
  }
}

// C[S, :] = 0 and C[:, S] = 0 for the rows that succeeded (the Schur complement
// is exactly zero there; the GEMM leaves round-off). Thread per (row, p, k).
template <typename c_t>
__global__ void schur_zero_pruned_kernel(c_t* __restrict__ c, const int64_t* __restrict__ cols,
                                         const int* __restrict__ counts, const int* __restrict__ status,
                                         int64_t nb, int64_t K, int64_t ld) {
  const int64_t kstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t bl = blockIdx.z; bl < nb; bl += gridDim.z) {
    if (status[bl] != 0) continue;
    c_t* Cb = c + bl * K * K;
    for (int64_t p = blockIdx.y; p < counts[bl]; p += gridDim.y) {
      const int64_t s = cols[bl * ld + p];
      for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K; k += kstep) {
        Cb[s * K + k] = c_t(0);
        Cb[k * K + s] = c_t(0);
      }
    }
  }
}

// The GEMM operands of C -= A A^T, A = At^T, written in one pass from At (acc
// precision): entries of At past a row's count, and rows that failed, become 0
// so they contribute nothing. With `split` (fp16 / bf16 storage of C) A = hi + lo,
// both in C's dtype, and the operands are left = [hi lo hi], right = [hi hi lo]
// stacked along P: C -= left^T right is then one fp32-accumulated product that
// keeps ~fp32 accuracy (hi alone would round A to C's 8/11 bits), and C is
// rounded once. Without split, left = right = A (in C's dtype).
template <typename acc_t, typename c_t>
__global__ void schur_gemm_operands_kernel(const acc_t* __restrict__ At, const int* __restrict__ counts,
                                           const int* __restrict__ status, c_t* __restrict__ left,
                                           c_t* __restrict__ right, int64_t nb, int64_t K, int64_t ld,
                                           bool split) {
  const int64_t kstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t parts = split ? 3 : 1;
  for (int64_t bl = blockIdx.z; bl < nb; bl += gridDim.z) {
    const bool row_ok = status[bl] == 0;
    for (int64_t p = blockIdx.y; p < ld; p += gridDim.y) {
      const bool valid = row_ok && p < counts[bl];
      const acc_t* a = At + (bl * ld + p) * K;
      c_t* l0 = left + (bl * parts * ld + p) * K;
      c_t* r0 = right + (bl * parts * ld + p) * K;
      for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K; k += kstep) {
        const acc_t v = valid ? a[k] : acc_t(0);
        const c_t hi = static_cast<c_t>(v);
        l0[k] = hi;
        r0[k] = hi;
        if (split) {
          const c_t lo = static_cast<c_t>(v - static_cast<acc_t>(hi));
          l0[ld * K + k] = lo;
          r0[ld * K + k] = hi;
          l0[2 * ld * K + k] = hi;
          r0[2 * ld * K + k] = lo;
        }
      }
    }
  }
}

// Workspace bytes per chunk of rows (the K x pmax slabs dominate): 1 GiB,
// or S3SPARSE_SCHUR_WORKSPACE_BYTES when set (tests set it tiny to run the
// chunk loop one row at a time).
inline int64_t schur_workspace_budget() {
  if (const char* env = std::getenv("S3SPARSE_SCHUR_WORKSPACE_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return int64_t(1) << 30;
}

at::Tensor schur_update_cuda(at::Tensor& w, at::Tensor& c, const at::Tensor& pruned) {
  constexpr const char* op = "s3sparse.schur_update_";
  check_schur_update(w, c, pruned, op);
  const c10::cuda::CUDAGuard guard(w.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below are kernel internals
  const int64_t B = w.size(0), K = w.size(1);
  // (B, P) is small: validate it on the host exactly as the CPU kernel does
  // (range and duplicates), before anything is written. One host sync.
  const auto cols = pruned_columns(pruned.to(at::kCPU).contiguous(), K, op);
  at::Tensor status = at::zeros({B}, w.options().dtype(at::kInt));
  int64_t pmax = 0;
  for (const auto& s : cols) pmax = std::max<int64_t>(pmax, static_cast<int64_t>(s.size()));
  if (B == 0 || pmax == 0) return status;

  // Compacted columns (B, pmax) and counts (B,), uploaded once.
  at::Tensor cols_host = at::zeros({B, pmax}, at::TensorOptions().dtype(at::kLong));
  at::Tensor counts_host = at::zeros({B}, at::TensorOptions().dtype(at::kInt));
  {
    int64_t* ch = cols_host.mutable_data_ptr<int64_t>();
    int* nh = counts_host.mutable_data_ptr<int>();
    for (int64_t b = 0; b < B; ++b) {
      nh[b] = static_cast<int>(cols[b].size());
      std::copy(cols[b].begin(), cols[b].end(), ch + b * pmax);
    }
  }
  const at::Tensor cols_dev = cols_host.to(w.device());
  const at::Tensor counts_dev = counts_host.to(w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "schur_update_cuda_w", [&] {
    using acc_t = scalar_t;
    const auto acc_opts = w.options();
    // Rows per chunk: the workspace of a chunk stays under the budget.
    // CS and At in acc_t, up to 2 x 3 GEMM operand slabs in C's dtype, L, z, mask.
    const int64_t row_bytes = (2 * pmax * K + 2 * pmax * pmax + pmax) * static_cast<int64_t>(sizeof(acc_t)) +
                              6 * pmax * K * static_cast<int64_t>(c.element_size()) + K;
    const int64_t chunk = std::clamp<int64_t>(schur_workspace_budget() / row_bytes, 1, B);
    at::Tensor Lw = at::empty({chunk, pmax, pmax}, acc_opts);
    at::Tensor zw = at::empty({chunk, pmax}, acc_opts);
    at::Tensor CS = at::empty({chunk, pmax, K}, acc_opts);
    at::Tensor mask = at::empty({chunk, K}, w.options().dtype(at::kByte));
    acc_t* wp = w.mutable_data_ptr<acc_t>();
    int* st = status.mutable_data_ptr<int>();
    const int64_t* colp = cols_dev.const_data_ptr<int64_t>();
    const int* cntp = counts_dev.const_data_ptr<int>();
    // The factor goes to shared memory when it fits the opt-in limit.
    int device = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const int64_t l_bytes = pmax * pmax * static_cast<int64_t>(sizeof(acc_t));
    const bool l_in_shared = l_bytes <= optin;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "schur_update_cuda_c", [&] {
      using c_t = scalar_t;
      c_t* cp = c.mutable_data_ptr<c_t>();
      const bool split = std::is_same_v<c_t, at::Half> || std::is_same_v<c_t, at::BFloat16>;
      const int64_t parts = split ? 3 : 1;
      at::Tensor left = at::empty({chunk, parts * pmax, K}, c.options());
      at::Tensor right = at::empty({chunk, parts * pmax, K}, c.options());
      const at::Tensor eye = at::eye(pmax, acc_opts);
      auto chol = schur_chol_kernel<acc_t, c_t>;
      const size_t chol_smem = l_in_shared ? static_cast<size_t>(l_bytes) : 0;
      if (chol_smem > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(chol, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(chol_smem)));
      }
      for (int64_t b0 = 0; b0 < B; b0 += chunk) {
        const int64_t nb = std::min(chunk, B - b0);
        mask.zero_();
        const unsigned rows_y = static_cast<unsigned>(std::min<int64_t>(nb, 65535));
        S3_LAUNCH(static_cast<unsigned>(std::min<int64_t>(nb, int64_t(1) << 20)), kCholThreads, chol_smem, stream,
                  chol)(wp + b0 * K, cp + b0 * K * K, colp + b0 * pmax, cntp + b0, Lw.mutable_data_ptr<acc_t>(),
                        zw.mutable_data_ptr<acc_t>(), mask.mutable_data_ptr<uint8_t>(), st + b0, nb, K,
                        static_cast<int>(pmax), l_in_shared);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const dim3 rows_grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(K, 256), 65535)),
                             static_cast<unsigned>(std::min<int64_t>(pmax, 65535)), rows_y);
        S3_LAUNCH(rows_grid, 256, 0, stream, schur_gather_rows_kernel<acc_t, c_t>)(
            cp + b0 * K * K, colp + b0 * pmax, cntp + b0, CS.mutable_data_ptr<acc_t>(), nb, K, pmax);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // At = L^-1 C[S, :] (so A = At^T = C[:, S] L^-T): L^-1 by a batched triangular
        // solve of the small P x P identity, then one batched GEMM over the K columns.
        const at::Tensor L = Lw.narrow(0, 0, nb);
        const at::Tensor Linv = at::linalg_solve_triangular(L, eye.expand({nb, pmax, pmax}), /*upper=*/false);
        const at::Tensor At = at::bmm(Linv, CS.narrow(0, 0, nb));
        // w -= A z (= At^T z), then w_S = 0, for the rows that succeeded.
        const at::Tensor delta = at::bmm(zw.narrow(0, 0, nb).unsqueeze(1), At).squeeze(1).contiguous();
        const dim3 w_grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(K, 256), 65535)), rows_y);
        S3_LAUNCH(w_grid, 256, 0, stream, schur_update_w_kernel<acc_t>)(
            wp + b0 * K, delta.const_data_ptr<acc_t>(), mask.const_data_ptr<uint8_t>(), st + b0, nb, K);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // C -= A A^T by one batched tensor-core GEMM (fp32 accumulation).
        const dim3 op_grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(K, 256), 65535)),
                           static_cast<unsigned>(std::min<int64_t>(pmax, 65535)), rows_y);
        S3_LAUNCH(op_grid, 256, 0, stream, schur_gemm_operands_kernel<acc_t, c_t>)(
            At.const_data_ptr<acc_t>(), cntp + b0, st + b0, left.mutable_data_ptr<c_t>(),
            right.mutable_data_ptr<c_t>(), nb, K, pmax, split);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const at::Tensor lhs = left.narrow(0, 0, nb);
        c.narrow(0, b0, nb).baddbmm_(lhs.transpose(1, 2), right.narrow(0, 0, nb), 1, -1);
        const dim3 zero_grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(K, 256), 65535)),
                             static_cast<unsigned>(std::min<int64_t>(pmax, 65535)),
                             static_cast<unsigned>(std::min<int64_t>(nb, 65535)));
        S3_LAUNCH(zero_grid, 256, 0, stream, schur_zero_pruned_kernel<c_t>)(
            cp + b0 * K * K, colp + b0 * pmax, cntp + b0, st + b0, nb, K, pmax);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return status;
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) {
  m.impl("score_subsets", &score_subsets_cuda);
  m.impl("schur_update_", &schur_update_cuda);
}

}  // namespace s3sparse
