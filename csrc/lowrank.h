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

// panel (N, P, R) and linv (N, P, P), both float32 or both float64, on one
// device; split_dtype a floating dtype.
inline void check_lowrank_factor(const at::Tensor& panel, const at::Tensor& linv, at::ScalarType split_dtype,
                                 const char* op) {
  check_dim(panel, 3, op, "panel", "(N, P, R)");
  check_dim(linv, 3, op, "linv", "(N, P, P)");
  S3_CHECK_TYPE(panel.scalar_type() == at::kFloat || panel.scalar_type() == at::kDouble, op,
                ": `panel` must be float32 or float64, got ", panel.scalar_type());
  check_dtype(linv, panel.scalar_type(), op, "linv");
  S3_CHECK_TYPE(is_float_type(split_dtype), op, ": `split_dtype` must be a floating dtype, got ", split_dtype);
  check_same_device(panel, linv, op, "panel", "linv");
  S3_CHECK_VALUE(linv.size(0) == panel.size(0) && linv.size(1) == panel.size(1) && linv.size(2) == panel.size(1),
                 op, ": shapes must be panel (N, P, R), linv (N, P, P), got panel ", panel.sizes(), ", linv ",
                 linv.sizes());
}

}  // namespace s3sparse
