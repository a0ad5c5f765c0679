// CUDA kernels of the Schur-update ops.
//
// lowrank_sub: out = base - a b^T as one batched cuBLAS GEMM with fp32
// accumulation straight from fp16/bf16 operands (ATen's baddbmm.dtype: tensor
// cores, no widened copies), b read in place through its strides.
//
// lowrank_factor: U_j = panel^T linv^T at fp32 accuracy on tensor cores. One
// kernel reads the fp32 panel once and writes its parts [hi; lo; hi] in the
// split dtype (hi = round(v), lo = round(v - hi)); one fp16/bf16 GEMM with fp32
// output pairs them with [L_hi, L_hi, L_lo] over 3P: hi L_hi + lo L_hi + hi L_lo,
// only lo L_lo (2^-22 relative) dropped. The product writes its output once
// (no base to copy, no concatenated panel).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cuda/launch.cuh"
#include "lowrank.h"

namespace s3sparse {
namespace {

at::Tensor lowrank_sub_cuda(const at::Tensor& base, const at::Tensor& a, const at::Tensor& b) {
  check_lowrank_sub(base, a, b, "s3sparse.lowrank_sub");
  const c10::cuda::CUDAGuard device_guard(base.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor bt = b.transpose(1, 2);
  if (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16) {
    return at::baddbmm(base, a, bt, at::kFloat, 1, -1);
  }
  return at::baddbmm(base, a, bt, 1, -1);
}

// parts (N, 3, PR) = [hi, lo, hi] of panel (N, PR), element by element.
template <typename T>
__global__ void hi_lo_parts_kernel(const float* __restrict__ panel, T* __restrict__ parts, int64_t N, int64_t PR) {
  const int64_t total = N * PR;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += step) {
    const int64_t n = t / PR, i = t - n * PR;
    const float v = panel[t];
    const T hi = static_cast<T>(v);
    const T lo = static_cast<T>(v - static_cast<float>(hi));
    T* out = parts + n * 3 * PR + i;
    out[0] = hi;
    out[PR] = lo;
    out[2 * PR] = hi;
  }
}

at::Tensor lowrank_factor_cuda(const at::Tensor& panel, const at::Tensor& linv, at::ScalarType split_dtype) {
  check_lowrank_factor(panel, linv, split_dtype, "s3sparse.lowrank_factor");
  const c10::cuda::CUDAGuard device_guard(panel.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool split = panel.scalar_type() == at::kFloat && (split_dtype == at::kHalf || split_dtype == at::kBFloat16);
  const int64_t N = panel.size(0), P = panel.size(1), R = panel.size(2);
  if (!split || N * P * R == 0) return at::bmm(panel.transpose(1, 2), linv.transpose(1, 2));
  const at::Tensor src = panel.contiguous();
  at::Tensor parts = at::empty({N, 3 * P, R}, panel.options().dtype(split_dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((N * P * R + kThreads - 1) / kThreads, int64_t{1} << 16);
  if (split_dtype == at::kHalf) {
    S3_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, hi_lo_parts_kernel<at::Half>)(
        src.data_ptr<float>(), parts.data_ptr<at::Half>(), N, P * R);
  } else {
    S3_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, hi_lo_parts_kernel<at::BFloat16>)(
        src.data_ptr<float>(), parts.data_ptr<at::BFloat16>(), N, P * R);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor l_hi = linv.to(split_dtype);
  const at::Tensor l_lo = (linv - l_hi.to(at::kFloat)).to(split_dtype);
  const at::Tensor rhs = at::cat({l_hi, l_hi, l_lo}, 2);  // (N, P, 3P), paired with parts' [hi; lo; hi]
#ifdef S3SPARSE_EMULATE_CUDA
  // The host emulator's CPU BLAS has no fp16 GEMM with fp32 output: the same
  // products from the same parts, widened (exact).
  return at::bmm(parts.transpose(1, 2).to(at::kFloat), rhs.transpose(1, 2).to(at::kFloat));
#else
  return at::bmm(parts.transpose(1, 2), rhs.transpose(1, 2), at::kFloat);
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) {
  m.impl("lowrank_sub", &lowrank_sub_cuda);
  m.impl("lowrank_factor", &lowrank_factor_cuda);
}

}  // namespace s3sparse
