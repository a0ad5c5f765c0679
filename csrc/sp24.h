// sp24_linear: y = x Wᵀ + bias for a 2:4 weight W held as the tensor cores'
// sparse operand. Shared by the CPU and CUDA kernels: the argument checks and
// the metadata layout. The layout is documented in csrc/ops.cpp with the schema
// and, as executable code, in s3sparse/reference.py (sp24_to_dense) and
// s3sparse/sparse/sp24.py (sp24_meta_words, which builds it).
//
// values: W's kept values, two a group of 4 columns, each row's in column order
// (M * K / 2 elements, contiguous: PackedWeight's canonical 2:4 values).
// sp_meta (M/16, K/64, 32) int32: for 16-row tile T, 64-column iteration i and
// lane 4 g + 2 s + h, the word of step s, half h: nibble j (bits 4 j .. 4 j + 3)
// for row 16 T + g, nibble 4 + j (bits 16 + 4 j ..) for row 16 T + g + 8, both
// for the column group (4 columns) G = 16 i + 4 (q % 4) + 2 s + q / 4 with
// q = 4 h + j; a nibble is p0 | p1 << 2, the columns (0-3, p0 < p1) of the
// group's two kept values.
#pragma once

#include "common.h"

namespace s3sparse {

struct Sp24Geometry {
  int64_t N = 0;  // tokens: the product of x's leading dims
  int64_t M = 0;  // out_features
  int64_t K = 0;  // in_features
};

// Original column group of step s, virtual group q (0-7) in iteration i.
C10_HOST_DEVICE inline int64_t sp24_group(int64_t i, int s, int q) {
  return 16 * i + 4 * (q % 4) + 2 * s + q / 4;
}

inline Sp24Geometry check_sp24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& sp_meta,
                                      int64_t out_features, const std::optional<at::Tensor>& bias, const char* op) {
  const auto t = x.scalar_type();
  S3_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16, op,
                ": `x` must be float16 or bfloat16 (the 16-bit sparse tensor cores), got ", t,
                "; for other dtypes use packed_linear");
  S3_CHECK_TYPE(values.scalar_type() == t, op, ": `values` must have the dtype of `x` (", t, "), got ",
                values.scalar_type());
  S3_CHECK_VALUE(x.dim() >= 1, op, ": `x` must be (..., in_features), got a scalar");
  check_same_device(x, values, op, "x", "values");
  check_same_device(x, sp_meta, op, "x", "sp_meta");
  Sp24Geometry g;
  g.K = x.size(-1);
  g.M = out_features;
  g.N = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  S3_CHECK_VALUE(out_features > 0 && out_features % 16 == 0, op,
                 ": `out_features` must be a positive multiple of 16 (the 16-row tile), got ", out_features,
                 "; use packed_linear for this layer");
  S3_CHECK_VALUE(g.K > 0 && g.K % 64 == 0, op,
                 ": `x`'s last dim (in_features) must be a positive multiple of 64 (the 64-column step), got ", g.K,
                 "; use packed_linear for this layer");
  check_dtype(sp_meta, at::kInt, op, "sp_meta");
  S3_CHECK_VALUE(sp_meta.dim() == 3 && sp_meta.size(0) == g.M / 16 && sp_meta.size(1) == g.K / 64 &&
                     sp_meta.size(2) == 32,
                 op, ": `sp_meta` must be (out_features / 16, in_features / 64, 32) = (", g.M / 16, ", ", g.K / 64,
                 ", 32), got shape ", sp_meta.sizes(), "; build it with s3sparse.sparse.sp24.sp24_meta_words");
  check_contiguous(sp_meta, op, "sp_meta");
  S3_CHECK_VALUE(values.numel() == g.M * g.K / 2, op, ": `values` must hold out_features * in_features / 2 = ",
                 g.M * g.K / 2, " elements (two kept a group of 4), got ", values.numel());
  check_contiguous(values, op, "values");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    S3_CHECK_TYPE(b.scalar_type() == t, op, ": `bias` must have the dtype of `x` (", t, "), got ", b.scalar_type());
    S3_CHECK_VALUE(b.dim() == 1 && b.size(0) == g.M, op, ": `bias` must be (out_features,) = (", g.M,
                   ",), got shape ", b.sizes());
    check_same_device(x, b, op, "x", "bias");
  }
  return g;
}

}  // namespace s3sparse
