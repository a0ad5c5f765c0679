// Argument checks of lowrank_sub, shared by the CPU and CUDA kernels.
#pragma once

#include "common.h"

namespace s3sparse {

// base (N, P, R) fp32/fp64; a (N, P, O), b (N, R, O) of one float dtype, whose
// math precision is base's; b's last dim contiguous (it may be a view).
inline void check_lowrank_sub(const at::Tensor& base, const at::Tensor& a, const at::Tensor& b,
                              const char* op) {
  check_dim(base, 3, op, "base", "(N, P, R)");
  check_dim(a, 3, op, "a", "(N, P, O)");
  check_dim(b, 3, op, "b", "(N, R, O)");
  S3_CHECK_TYPE(base.scalar_type() == at::kFloat || base.scalar_type() == at::kDouble, op,
                ": `base` must be float32 or float64, got ", base.scalar_type());
  check_float(a, op, "a");
  check_dtype(b, a.scalar_type(), op, "b");
  const bool wide = a.scalar_type() == at::kDouble;
  S3_CHECK_TYPE(wide == (base.scalar_type() == at::kDouble), op,
                ": `base` must be float64 exactly when `a` is, got base ", base.scalar_type(),
                " and a ", a.scalar_type());
  check_same_device(base, a, op, "base", "a");
  check_same_device(base, b, op, "base", "b");
  S3_CHECK_VALUE(a.size(0) == base.size(0) && b.size(0) == base.size(0) &&
                     a.size(1) == base.size(1) && b.size(1) == base.size(2) &&
                     a.size(2) == b.size(2),
                 op, ": shapes must be base (N, P, R), a (N, P, O), b (N, R, O), got base ",
                 base.sizes(), ", a ", a.sizes(), ", b ", b.sizes());
}

}  // namespace s3sparse
