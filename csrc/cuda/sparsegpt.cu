// CUDA kernel of sparsegpt_block_, with the semantics of csrc/cpu/sparsegpt.cpp
// (the same sweep, csrc/sparsegpt.h, so the same bits).
//
// Two launches on the current stream, no host sync:
//   1. validate (one thread block): the status bits of the index tables.
//   2. sweep: one CUDA thread per row group, kThreads groups per thread block.
//      The factor block u (b x b fp32, 64 KiB for b = 128) sits in shared
//      memory when it fits (else it is read through the cache from global
//      memory); every thread's weights, mask, errors and block-score scratch sit
//      in shared memory too, interleaved across the threads of the block
//      (element (r, j) of thread t at (r*b + j)*pitch + t, pitch odd: no bank
//      conflicts, neither in the sweep nor in the coalesced load / store of the
//      rows). A nonzero status makes every thread return before writing.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "cuda/launch.cuh"
#include "sparsegpt.h"

namespace s3sparse {
namespace {

constexpr int kValidateThreads = 128;

__global__ void __launch_bounds__(kValidateThreads)
sparsegpt_validate_kernel(const int64_t* __restrict__ ptr, const int64_t* __restrict__ cols,
                          const int64_t* __restrict__ lrows, const int64_t* __restrict__ group_rows,
                          int* __restrict__ status, int64_t M, int64_t b, int64_t S, int64_t E, int64_t R,
                          int64_t rpg) {
  __shared__ int bad[kValidateThreads];
  const int tid = static_cast<int>(threadIdx.x);
  bad[tid] = sparsegpt_validate_part(ptr, cols, lrows, group_rows, M, b, S, E, R, rpg, tid, kValidateThreads);
  __syncthreads();
  if (tid == 0) {
    int all = 0;
    for (int k = 0; k < kValidateThreads; ++k) all |= bad[k];
    status[0] = all;
  }
}

// Shared-memory footprint of one thread block (bytes).
struct SweepSmem {
  int64_t threads, pitch, u_floats, total;
};

inline SweepSmem sweep_smem(int64_t threads, bool u_shared, int64_t b, int64_t rpg, int64_t nb) {
  SweepSmem s;
  s.threads = threads;
  s.pitch = threads % 2 == 0 ? threads + 1 : threads;
  s.u_floats = u_shared ? b * b : 0;
  const int64_t floats = s.u_floats + b + 2 * rpg * b * s.pitch + std::max<int64_t>(nb, 1) * s.pitch;
  s.total = floats * static_cast<int64_t>(sizeof(float)) + rpg * b * s.pitch;
  return s;
}

template <bool kUShared>
__global__ void sparsegpt_sweep_kernel(float* __restrict__ w, int64_t ws0, int64_t ws1, bool* __restrict__ pruned,
                                       int64_t ps0, int64_t ps1, const float* __restrict__ u, int64_t us0,
                                       int64_t us1, const int64_t* __restrict__ ptr,
                                       const int64_t* __restrict__ cols, const int64_t* __restrict__ lrows,
                                       const int64_t* __restrict__ group_rows, float* __restrict__ err,
                                       const int* __restrict__ status, int64_t b, int64_t E, int64_t bn,
                                       int64_t nnz, int64_t R, int64_t rpg, int64_t pitch) {
  if (status[0] != 0) return;  // uniform over the grid: no barrier is skipped by part of a block
  S3_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int64_t T = blockDim.x;
  const int64_t tid = threadIdx.x;
  const int64_t nb = E / bn;
  float* us = reinterpret_cast<float*>(smem_raw);
  float* d2 = us + (kUShared ? b * b : 0);
  float* ws = d2 + b;
  float* es = ws + rpg * b * pitch;
  float* ks = es + rpg * b * pitch;
  uint8_t* ps = reinterpret_cast<uint8_t*>(ks + (nb > 1 ? nb : 1) * pitch);

  if (kUShared) {
    for (int64_t x = tid; x < b * b; x += T) {
      const int64_t i = x / b, j = x - i * b;
      us[x] = u[i * us0 + j * us1];
    }
  }
  for (int64_t c = tid; c < b; c += T) {
    const float ucc = u[c * us0 + c * us1];
    d2[c] = sgpt_mul(ucc, ucc);
  }
  // The rows of this block's groups, coalesced along the columns.
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * T;
  const int64_t per_group = rpg * b;
  for (int64_t x = tid; x < T * per_group; x += T) {
    const int64_t t = x / per_group, rj = x - t * per_group;
    if (g0 + t >= R) break;
    const int64_t r = rj / b, j = rj - r * b;
    const int64_t row = group_rows[(g0 + t) * rpg + r];
    ws[rj * pitch + t] = w[row * ws0 + j * ws1];
    ps[rj * pitch + t] = pruned[row * ps0 + j * ps1] ? 1 : 0;
  }
  __syncthreads();

  const int64_t g = g0 + tid;
  if (g < R) {
    // 32-bit indexing inside the block: every index below addresses shared memory.
    const int bi = static_cast<int>(b), pi = static_cast<int>(pitch);
    float* wt = ws + tid;
    uint8_t* pt = ps + tid;
    float* et = es + tid;
    float* kt = ks + tid;
    const SgptTables tables{ptr, cols, lrows, E, bn, nnz};
    auto wa = [wt, bi, pi](int r, int j) -> float& { return wt[(r * bi + j) * pi]; };
    auto pa = [pt, bi, pi](int r, int j) -> uint8_t& { return pt[(r * bi + j) * pi]; };
    auto ea = [et, bi, pi](int r, int j) -> float& { return et[(r * bi + j) * pi]; };
    auto ka = [kt, pi](int k) -> float& { return kt[k * pi]; };
    if (kUShared) {
      auto ua = [us, bi](int i, int j) -> float { return us[i * bi + j]; };
      sparsegpt_sweep<int>(wa, pa, ea, ua, d2, ka, tables, bi, static_cast<int>(rpg));
    } else {
      auto ua = [u, us0, us1](int i, int j) -> float { return u[i * us0 + j * us1]; };
      sparsegpt_sweep<int>(wa, pa, ea, ua, d2, ka, tables, bi, static_cast<int>(rpg));
    }
  }
  __syncthreads();

  for (int64_t x = tid; x < T * per_group; x += T) {
    const int64_t t = x / per_group, rj = x - t * per_group;
    if (g0 + t >= R) break;
    const int64_t r = rj / b, j = rj - r * b;
    const int64_t row = group_rows[(g0 + t) * rpg + r];
    w[row * ws0 + j * ws1] = ws[rj * pitch + t];
    pruned[row * ps0 + j * ps1] = ps[rj * pitch + t] != 0;
    err[row * b + j] = es[rj * pitch + t];
  }
}

std::tuple<at::Tensor, at::Tensor> sparsegpt_block_cuda(at::Tensor& w, at::Tensor& pruned, const at::Tensor& u,
                                                        const at::Tensor& scope_ptr_in,
                                                        const at::Tensor& scope_cols_in,
                                                        const at::Tensor& scope_rows_in,
                                                        const at::Tensor& group_rows_in, int64_t nnz,
                                                        int64_t block_numel) {
  constexpr const char* op = "s3sparse.sparsegpt_block_";
  check_sparsegpt_block(w, pruned, u, scope_ptr_in, scope_cols_in, scope_rows_in, group_rows_in, nnz, block_numel,
                        op);
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t M = w.size(0), b = w.size(1);
  const at::Tensor scope_ptr = scope_ptr_in.contiguous();
  const at::Tensor scope_cols = scope_cols_in.contiguous();
  const at::Tensor scope_rows = scope_rows_in.contiguous();
  const at::Tensor group_rows = group_rows_in.contiguous();
  const int64_t S = scope_cols.size(0), E = scope_cols.size(1);
  const int64_t R = group_rows.size(0), rpg = group_rows.size(1);
  const int64_t nb = E / block_numel;
  at::Tensor err = at::zeros({M, b}, w.options());
  at::Tensor status = at::empty({}, w.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t* ptr = scope_ptr.const_data_ptr<int64_t>();
  const int64_t* cols = scope_cols.const_data_ptr<int64_t>();
  const int64_t* lrows = scope_rows.const_data_ptr<int64_t>();
  const int64_t* grows = group_rows.const_data_ptr<int64_t>();
  int* st = status.mutable_data_ptr<int>();
  S3_LAUNCH(1, kValidateThreads, 0, stream, sparsegpt_validate_kernel)(ptr, cols, lrows, grows, st, M, b, S, E, R,
                                                                       rpg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (R == 0 || rpg == 0 || b == 0) return {err, status};

  // Threads (= row groups) per block and where u goes: u in shared memory with
  // at least 8 groups per block, else u from global memory (through the cache).
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t want = std::min<int64_t>(32, R);
  SweepSmem plan{0, 0, 0, 0};
  bool u_shared = false;
  for (int64_t t = want; t >= std::min<int64_t>(8, want); t /= 2) {
    const SweepSmem s = sweep_smem(t, true, b, rpg, nb);
    if (s.total <= optin) {
      plan = s;
      u_shared = true;
      break;
    }
  }
  if (plan.threads == 0) {
    for (int64_t t = want; t >= 1; t /= 2) {
      const SweepSmem s = sweep_smem(t, false, b, rpg, nb);
      if (s.total <= optin) {
        plan = s;
        break;
      }
    }
  }
  S3_CHECK_VALUE(plan.threads > 0, op, ": a row group of ", rpg, " rows over b=", b, " columns (scopes of ", nb,
                 " blocks) needs ", sweep_smem(1, false, b, rpg, nb).total,
                 " bytes of shared memory on CUDA, more than the ", optin,
                 " this GPU offers; use a smaller lazy block");
  auto kernel = u_shared ? sparsegpt_sweep_kernel<true> : sparsegpt_sweep_kernel<false>;
  if (plan.total > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.total)));
  }
  const int64_t blocks = (R + plan.threads - 1) / plan.threads;
  S3_CHECK_VALUE(blocks < (int64_t(1) << 31), op, ": too many row groups (", R, ") for one launch");
  S3_LAUNCH(static_cast<unsigned>(blocks), static_cast<unsigned>(plan.threads), static_cast<size_t>(plan.total),
            stream, kernel)(w.mutable_data_ptr<float>(), w.stride(0), w.stride(1), pruned.mutable_data_ptr<bool>(),
                            pruned.stride(0), pruned.stride(1), u.const_data_ptr<float>(), u.stride(0), u.stride(1),
                            ptr, cols, lrows, grows, err.mutable_data_ptr<float>(), st, b, E, block_numel, nnz, R,
                            rpg, plan.pitch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {err, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) { m.impl("sparsegpt_block_", &sparsegpt_block_cuda); }

}  // namespace s3sparse
