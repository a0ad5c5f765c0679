// CPU kernels of the Schur-update ops. lowrank_sub: out = base - a b^T by one
// batched BLAS GEMM in the precision of base (fp16/bf16 operands are widened
// first: CPU BLAS has no mixed-precision GEMM). lowrank_factor: panel^T linv^T
// by one GEMM in the operands' precision (split_dtype does not matter here: an
// fp32 product is already what the split rebuilds).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lowrank.h"

namespace s3sparse {
namespace {

at::Tensor lowrank_sub_cpu(const at::Tensor& base, const at::Tensor& a, const at::Tensor& b) {
  check_lowrank_sub(base, a, b, "s3sparse.lowrank_sub");
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto acc = base.scalar_type();
  return at::baddbmm(base, a.to(acc), b.to(acc).transpose(1, 2), 1, -1);
}

at::Tensor lowrank_factor_cpu(const at::Tensor& panel, const at::Tensor& linv, at::ScalarType split_dtype) {
  check_lowrank_factor(panel, linv, split_dtype, "s3sparse.lowrank_factor");
  at::AutoDispatchBelowADInplaceOrView guard;
  return at::bmm(panel.transpose(1, 2), linv.transpose(1, 2));
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CPU, m) {
  m.impl("lowrank_sub", &lowrank_sub_cpu);
  m.impl("lowrank_factor", &lowrank_factor_cpu);
}

}  // namespace s3sparse
