// Packed structured-sparse weights (packed_to_dense, packed_linear): the
// geometry, the field decoding and the host-side argument checks, shared by the
// CPU and CUDA kernels. The format is documented with the schemas in
// csrc/ops.cpp and, as executable code, in s3sparse/reference.py.
//
// Summary: W (M, K) row-major is covered by S scopes (a scope grid of
// `scope_shape`, row-major) that keep nnz blocks of B elements each, out of G
// in-scope blocks. values (S, nnz, B); meta (W,) int32 words of meta_bits-bit
// fields; with subsets (n_codes, nnz) one field per scope (a row of subsets),
// without nnz fields per scope (in-scope block indices). Element e of in-scope
// block k of scope s is W's flat element
//   f = sum_d idx_d(s) * scope_stride[d] + block_off[k] + elem_off[e].
#pragma once

#include "common.h"

namespace s3sparse {

constexpr int kMaxPackedScopeDims = 8;

// Everything a kernel needs besides the data pointers, validated by the checks
// below (a plain struct: it can be passed by value to a CUDA kernel).
struct PackedGeometry {
  int64_t S = 0;         // scopes (values.size(0) = prod(scope_shape))
  int64_t nnz = 0;       // kept blocks per scope (values.size(1))
  int64_t B = 0;         // elements per block (values.size(2) = elem_off.size(0))
  int64_t G = 0;         // in-scope blocks (block_off.size(0))
  int64_t M = 0;         // out_features: rows of W
  int64_t K = 0;         // in_features: columns of W
  int64_t n_codes = 0;   // rows of subsets; 0 = no subsets (per-block indices)
  int64_t n_fields = 0;  // meta fields used: S with subsets, S * nnz without
  int64_t n_words = 0;   // int32 words those fields need
  int64_t row_group = 0; // packed_linear's routing promise (0 for packed_to_dense)
  int meta_bits = 0;
  int per_word = 0;      // fields per word: 32 / meta_bits
  int ndim = 0;          // scope-grid dims
  int64_t scope_shape[kMaxPackedScopeDims] = {};
  int64_t scope_stride[kMaxPackedScopeDims] = {};

  // Flat offset in W of scope s's origin: sum_d idx_d(s) * scope_stride[d].
  C10_HOST_DEVICE inline int64_t scope_base(int64_t s) const {
    int64_t base = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t n = scope_shape[d];
      base += (s % n) * scope_stride[d];
      s /= n;
    }
    return base;
  }

  // Smallest and largest scope_base over all scopes (strides may be of any sign).
  C10_HOST_DEVICE inline void scope_base_range(int64_t* lo, int64_t* hi) const {
    int64_t a = 0, b = 0;
    for (int d = 0; d < ndim; ++d) {
      const int64_t span = (scope_shape[d] - 1) * scope_stride[d];
      if (span < 0) a += span; else b += span;
    }
    *lo = a;
    *hi = b;
  }
};

// Field i of meta: word i / per_word, bits [(i % per_word) * bits, + bits).
C10_HOST_DEVICE inline uint32_t packed_field(const int32_t* meta, int64_t i, int bits, int per_word) {
  const uint32_t word = static_cast<uint32_t>(meta[i / per_word]);
  const int shift = static_cast<int>(i % per_word) * bits;
  const uint32_t mask = bits >= 32 ? 0xFFFFFFFFu : ((1u << bits) - 1u);
  return (word >> shift) & mask;
}

// ------------------------------------------------------------------ host-side argument checks
// Shapes, dtypes, devices, meta_bits and meta's length; not the data (indices,
// codes and offsets in range: see check_packed_subsets_host and the kernels).
inline PackedGeometry check_packed_common(const at::Tensor& values, const at::Tensor& meta,
                                          const std::optional<at::Tensor>& subsets,
                                          const at::Tensor& block_off, const at::Tensor& elem_off,
                                          c10::IntArrayRef scope_shape, c10::IntArrayRef scope_stride,
                                          int64_t meta_bits, int64_t out_features, const char* op) {
  check_float(values, op, "values");
  check_dtype(meta, at::kInt, op, "meta");
  check_dtype(block_off, at::kLong, op, "block_off");
  check_dtype(elem_off, at::kLong, op, "elem_off");
  check_dim(values, 3, op, "values", "(S, nnz, B): S scopes of nnz kept blocks of B elements");
  check_dim(meta, 1, op, "meta", "(W,): int32 words of meta_bits-bit fields");
  check_dim(block_off, 1, op, "block_off", "(G,): the flat offset of every in-scope block");
  check_dim(elem_off, 1, op, "elem_off", "(B,): the flat offset of every element of a block");
  check_contiguous(values, op, "values");
  check_contiguous(meta, op, "meta");
  check_contiguous(block_off, op, "block_off");
  check_contiguous(elem_off, op, "elem_off");
  check_same_device(values, meta, op, "values", "meta");
  check_same_device(values, block_off, op, "values", "block_off");
  check_same_device(values, elem_off, op, "values", "elem_off");

  PackedGeometry g;
  g.S = values.size(0);
  g.nnz = values.size(1);
  g.B = values.size(2);
  g.G = block_off.size(0);
  S3_CHECK_VALUE(out_features >= 0, op, ": `out_features` must be >= 0, got ", out_features);
  g.M = out_features;
  S3_CHECK_VALUE(elem_off.size(0) == g.B, op, ": `elem_off` must have one entry per block element, B=", g.B,
                 " (values.size(2)), got shape ", elem_off.sizes());
  S3_CHECK_VALUE(g.nnz <= g.G, op, ": a scope keeps nnz=", g.nnz, " blocks (values.size(1)) but `block_off` lists only G=",
                 g.G, " in-scope blocks");

  const auto nd = static_cast<int64_t>(scope_shape.size());
  S3_CHECK_VALUE(nd <= kMaxPackedScopeDims, op, ": `scope_shape` may have at most ", kMaxPackedScopeDims,
                 " dims, got ", scope_shape);
  S3_CHECK_VALUE(static_cast<int64_t>(scope_stride.size()) == nd, op,
                 ": `scope_stride` must have one entry per dim of `scope_shape` ", scope_shape, ", got ", scope_stride);
  int64_t S = 1;
  for (int64_t d = 0; d < nd; ++d) {
    S3_CHECK_VALUE(scope_shape[d] >= 0, op, ": `scope_shape` must be non-negative, got ", scope_shape);
    g.scope_shape[d] = scope_shape[d];
    g.scope_stride[d] = scope_stride[d];
    S *= scope_shape[d];
  }
  g.ndim = static_cast<int>(nd);
  S3_CHECK_VALUE(S == g.S, op, ": `values` holds S=", g.S, " scopes but `scope_shape` ", scope_shape, " has ", S);

  S3_CHECK_VALUE(meta_bits >= 1 && meta_bits <= 32, op, ": `meta_bits` must be in [1, 32], got ", meta_bits);
  g.meta_bits = static_cast<int>(meta_bits);
  g.per_word = 32 / g.meta_bits;
  if (subsets.has_value()) {
    const at::Tensor& sub = *subsets;
    check_dtype(sub, at::kInt, op, "subsets");
    check_dim(sub, 2, op, "subsets", "(n_codes, nnz): the kept in-scope blocks of every code");
    check_contiguous(sub, op, "subsets");
    check_same_device(values, sub, op, "values", "subsets");
    S3_CHECK_VALUE(sub.size(1) == g.nnz, op, ": `subsets` rows must list nnz=", g.nnz,
                   " kept blocks (values.size(1)), got shape ", sub.sizes());
    S3_CHECK_VALUE(sub.size(0) >= 1, op, ": `subsets` must have at least one code, got shape ", sub.sizes());
    g.n_codes = sub.size(0);
    g.n_fields = g.S;
  } else {
    g.n_fields = g.S * g.nnz;
  }
  g.n_words = (g.n_fields + g.per_word - 1) / g.per_word;
  S3_CHECK_VALUE(meta.size(0) >= g.n_words, op, ": `meta` must hold ", g.n_fields, " fields of ", meta_bits,
                 " bits (", g.per_word, " per word): at least ", g.n_words, " int32 words, got ", meta.size(0));
  return g;
}

inline PackedGeometry check_packed_to_dense(const at::Tensor& values, const at::Tensor& meta,
                                            const std::optional<at::Tensor>& subsets,
                                            const at::Tensor& block_off, const at::Tensor& elem_off,
                                            c10::IntArrayRef scope_shape, c10::IntArrayRef scope_stride,
                                            int64_t meta_bits, int64_t out_features, int64_t in_features,
                                            const char* op) {
  PackedGeometry g = check_packed_common(values, meta, subsets, block_off, elem_off, scope_shape, scope_stride,
                                         meta_bits, out_features, op);
  S3_CHECK_VALUE(in_features >= 0, op, ": `in_features` must be >= 0, got ", in_features);
  g.K = in_features;
  return g;
}

inline PackedGeometry check_packed_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                          const std::optional<at::Tensor>& subsets,
                                          const at::Tensor& block_off, const at::Tensor& elem_off,
                                          c10::IntArrayRef scope_shape, c10::IntArrayRef scope_stride,
                                          int64_t meta_bits, int64_t out_features, int64_t row_group,
                                          const std::optional<at::Tensor>& bias, const char* op) {
  PackedGeometry g = check_packed_common(values, meta, subsets, block_off, elem_off, scope_shape, scope_stride,
                                         meta_bits, out_features, op);
  S3_CHECK_TYPE(x.scalar_type() == values.scalar_type(), op, ": `x` must have the dtype of `values` (",
                values.scalar_type(), "), got ", x.scalar_type());
  S3_CHECK_VALUE(x.dim() >= 1, op, ": `x` must be (..., in_features), got a scalar");
  check_same_device(values, x, op, "values", "x");
  g.K = x.size(-1);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    S3_CHECK_TYPE(b.scalar_type() == x.scalar_type(), op, ": `bias` must have the dtype of `x` (", x.scalar_type(),
                  "), got ", b.scalar_type());
    S3_CHECK_VALUE(b.dim() == 1 && b.size(0) == g.M, op, ": `bias` must be (out_features,) = (", g.M,
                   ",), got shape ", b.sizes());
    check_same_device(values, b, op, "values", "bias");
  }
  S3_CHECK_VALUE(row_group >= 0, op, ": `row_group` must be >= 0 (0 = no promise), got ", row_group);
  if (row_group > 0) {
    const bool divides = g.M % row_group == 0 && (g.M == 0 ? g.S == 0 : (g.S * row_group) % g.M == 0);
    S3_CHECK_VALUE(divides, op, ": `row_group`=", row_group, " must divide out_features=", g.M,
                   " into groups of whole scopes (S=", g.S, " scopes, S * row_group / out_features per group); pass 0");
  }
  g.row_group = row_group;
  return g;
}

// Every entry of subsets is an in-scope block index in [0, G). `subsets` must be
// a contiguous int32 tensor in host memory (it is small: the CUDA kernel may
// copy it over, or check it on the device).
inline void check_packed_subsets_host(const PackedGeometry& g, const at::Tensor& subsets, const char* op) {
  const int32_t* p = subsets.const_data_ptr<int32_t>();
  const int64_t n = g.n_codes * g.nnz;
  for (int64_t i = 0; i < n; ++i) {
    S3_CHECK_VALUE(p[i] >= 0 && p[i] < g.G, op, ": `subsets`[", i / g.nnz, ", ", i % g.nnz, "] = ", p[i],
                   " is not an in-scope block index in [0, G=", g.G, ")");
  }
}

// Problems found in the data while decoding (bits of one status word), and
// their message.
enum PackedDataError : int {
  kPackedBadIndex = 1,   // a meta field (an in-scope block index) >= G
  kPackedBadCode = 2,    // a meta field (a subset code) >= n_codes
  kPackedBadOffset = 4,  // an element offset outside W
  kPackedBadGroup = 8,   // a scope outside the rows its row group promised
};

inline std::string packed_data_error_message(int status, const PackedGeometry& g, const char* op) {
  std::string msg = cat(op, ": invalid packed data:");
  if (status & kPackedBadIndex)
    msg += cat(" `meta` holds an in-scope block index >= G=", g.G, " (the length of `block_off`);");
  if (status & kPackedBadCode)
    msg += cat(" `meta` holds a subset code >= n_codes=", g.n_codes, " (the rows of `subsets`);");
  if (status & kPackedBadOffset)
    msg += cat(" an element offset falls outside W (", g.M, " x ", g.K,
               "): check `block_off`, `elem_off`, `scope_shape`, `scope_stride` and the shape;");
  if (status & kPackedBadGroup)
    msg += cat(" a scope touches rows outside its group of row_group=", g.row_group,
               " rows (the promise does not hold): pass row_group=0;");
  msg.pop_back();
  return msg;
}

}  // namespace s3sparse
