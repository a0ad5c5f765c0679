// CUDA kernel of lowrank_sub: out = base - a b^T as one batched cuBLAS GEMM with
// fp32 accumulation straight from fp16/bf16 operands (ATen's baddbmm.dtype: tensor
// cores, no widened copies), b read in place through its strides.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) { m.impl("lowrank_sub", &lowrank_sub_cuda); }

}  // namespace s3sparse
