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
//
// column_order: which columns form those groups of 4 ("virtual" columns v, in
// 16-column chunks, v % 16 = 4 k + p: slot k, position p):
//   0  2:4: the column itself;
//   1  4:8 (pairs kept, 2 of the 4 pairs of each 8 columns): slot k is the even
//      (k % 2 = 0) or odd columns of the chunk's 8-column half k / 2, column
//      8 (k / 2) + 2 p + k % 2: both hold one value of each kept pair;
//   2  coupled 2:4 (columns c and c + 8 of each 16 kept together): slots 0-3
//      are the chunk's 4-column groups 0, 2, 1, 3, column 4 [0, 2, 1, 3][k] + p.
// With orders 1 and 2 the values are stored a kept block (2 values) at a time,
// [a0 a1 b0 b1] for a group pair: the virtual order takes them as a0 b0, a1 b1.
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

// Original column of virtual column v (see column_order above).
C10_HOST_DEVICE inline int64_t sp24_column(int64_t order, int64_t v) {
  const int64_t chunk = v - v % 16, k = (v % 16) / 4, p = v % 4;
  if (order == 1) return chunk + 8 * (k / 2) + 2 * p + k % 2;
  if (order == 2) return chunk + 4 * ((k % 2) * 2 + k / 2) + p;
  return v;
}

// Index in a row's stored values of the row's j-th value in virtual order.
C10_HOST_DEVICE inline int64_t sp24_stored(int64_t order, int64_t j) {
  if (order == 0) return j;
  const int64_t r = j % 4;
  return j - r + (r % 2) * 2 + r / 2;  // (a0 b0 a1 b1 <- a0 a1 b0 b1)
}

inline Sp24Geometry check_sp24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& sp_meta,
                                      int64_t out_features, const std::optional<at::Tensor>& bias,
                                      int64_t column_order, const char* op) {
  S3_CHECK_VALUE(column_order >= 0 && column_order <= 2, op,
                 ": `column_order` must be 0 (2:4), 1 (4:8) or 2 (coupled 2:4), got ", column_order);
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
