// Shared by every kernel (CPU and CUDA): error text, argument validation and
// the description of a strided block view.
//
// Error messages are built as one std::string with std::to_string: streaming a
// number (or a shape) into TORCH_CHECK crashes the process on the GPU image we
// ship to, instead of raising. Only strings ever reach TORCH_CHECK.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace s3sparse {

// ------------------------------------------------------------------ text
inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(std::string_view s) { return std::string(s); }
inline std::string to_text(const char* s) { return std::string(s); }
inline std::string to_text(char c) { return std::string(1, c); }
inline std::string to_text(bool b) { return b ? "true" : "false"; }
inline std::string to_text(int v) { return std::to_string(v); }
inline std::string to_text(long v) { return std::to_string(v); }
inline std::string to_text(long long v) { return std::to_string(v); }
inline std::string to_text(unsigned v) { return std::to_string(v); }
inline std::string to_text(unsigned long v) { return std::to_string(v); }
inline std::string to_text(unsigned long long v) { return std::to_string(v); }
inline std::string to_text(double v) { return std::to_string(v); }
inline std::string to_text(c10::ScalarType t) { return std::string(c10::toString(t)); }
inline std::string to_text(const c10::Device& d) { return d.str(); }
inline std::string to_text(c10::IntArrayRef shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}
inline std::string to_text(const std::vector<int64_t>& v) { return to_text(c10::IntArrayRef(v)); }

template <typename... Args>
std::string cat(const Args&... args) {
  std::string out;
  ((out += to_text(args)), ...);
  return out;
}

}  // namespace s3sparse

// Raise RuntimeError / ValueError / TypeError with a message built by cat().
#define S3_CHECK(cond, ...)                                   \
  do {                                                        \
    if (C10_UNLIKELY(!(cond))) {                              \
      const std::string s3_msg_ = ::s3sparse::cat(__VA_ARGS__); \
      TORCH_CHECK(false, s3_msg_);                            \
    }                                                         \
  } while (0)
#define S3_CHECK_VALUE(cond, ...)                             \
  do {                                                        \
    if (C10_UNLIKELY(!(cond))) {                              \
      const std::string s3_msg_ = ::s3sparse::cat(__VA_ARGS__); \
      TORCH_CHECK_VALUE(false, s3_msg_);                      \
    }                                                         \
  } while (0)
#define S3_CHECK_TYPE(cond, ...)                              \
  do {                                                        \
    if (C10_UNLIKELY(!(cond))) {                              \
      const std::string s3_msg_ = ::s3sparse::cat(__VA_ARGS__); \
      TORCH_CHECK_TYPE(false, s3_msg_);                       \
    }                                                         \
  } while (0)

namespace s3sparse {

// ------------------------------------------------------------------ argument checks
inline bool is_float_type(c10::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_float(const at::Tensor& t, const char* op, const char* arg) {
  S3_CHECK_TYPE(is_float_type(t.scalar_type()), op, ": `", arg,
                "` must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, c10::ScalarType want, const char* op, const char* arg) {
  S3_CHECK_TYPE(t.scalar_type() == want, op, ": `", arg, "` must be ", want, ", got ",
                t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t ndim, const char* op, const char* arg,
                      const char* layout) {
  S3_CHECK_VALUE(t.dim() == ndim, op, ": `", arg, "` must be ", ndim, "-D ", layout,
                 ", got shape ", t.sizes());
}

// A bias for kernels that index bias[row]: strided ones (an expand, a slice) made contiguous.
inline std::optional<at::Tensor> contiguous_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && !bias->is_contiguous() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  S3_CHECK_VALUE(t.is_contiguous(), op, ": `", arg,
                 "` must be contiguous (call .contiguous() first), got strides ", t.strides());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* arg_a, const char* arg_b) {
  S3_CHECK_VALUE(a.device() == b.device(), op, ": `", arg_b, "` must be on the device of `",
                 arg_a, "` (", a.device(), "), got ", b.device());
}

// ------------------------------------------------------------------ strided block views
// A view (size, stride, offset) over the flat elements of a contiguous tensor x,
// cut into blocks of `block` elements per dim. Block `g` (a grid index) holds the
// view elements i with i[d] / block[d] == g[d].
constexpr int kMaxViewDims = 8;

struct StridedBlocks {
  int ndim = 0;
  int64_t offset = 0;
  int64_t numel = 0;            // elements in the view
  int64_t num_blocks = 0;       // blocks in the grid
  int64_t block_numel = 0;      // elements per block
  int64_t size[kMaxViewDims] = {};
  int64_t stride[kMaxViewDims] = {};
  int64_t block[kMaxViewDims] = {};
  int64_t grid[kMaxViewDims] = {};

  std::vector<int64_t> grid_shape() const { return std::vector<int64_t>(grid, grid + ndim); }

  // Storage offset (relative to x's first element) of element `e` of block `b`,
  // both taken in row-major order of the grid / of the block.
  C10_HOST_DEVICE inline int64_t element_offset(int64_t b, int64_t e) const {
    int64_t off = offset;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t gd = b % grid[d];
      b /= grid[d];
      const int64_t ed = e % block[d];
      e /= block[d];
      off += (gd * block[d] + ed) * stride[d];
    }
    return off;
  }

  // Storage offset and block index of view element `i` (row-major view order).
  C10_HOST_DEVICE inline int64_t view_offset(int64_t i, int64_t* block_index) const {
    int64_t off = offset, b = 0, bmul = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t id = i % size[d];
      i /= size[d];
      off += id * stride[d];
      b += (id / block[d]) * bmul;
      bmul *= grid[d];
    }
    *block_index = b;
    return off;
  }
};

inline StridedBlocks make_strided_blocks(const at::Tensor& x, c10::IntArrayRef size,
                                         c10::IntArrayRef stride, int64_t offset,
                                         c10::IntArrayRef block, const char* op) {
  check_float(x, op, "x");
  check_contiguous(x, op, "x");
  const auto nd = static_cast<int64_t>(size.size());
  S3_CHECK_VALUE(nd <= kMaxViewDims, op, ": views of at most ", kMaxViewDims,
                 " dims are supported, got size ", size);
  S3_CHECK_VALUE(static_cast<int64_t>(stride.size()) == nd, op, ": `stride` must have one entry per dim of `size` ",
                 size, ", got ", stride);
  S3_CHECK_VALUE(static_cast<int64_t>(block.size()) == nd, op, ": `block` must have one entry per dim of `size` ",
                 size, ", got ", block);
  S3_CHECK_VALUE(offset >= 0, op, ": `offset` must be >= 0, got ", offset);
  StridedBlocks v;
  v.ndim = static_cast<int>(nd);
  v.offset = offset;
  v.numel = 1;
  v.block_numel = 1;
  int64_t last = offset;
  for (int64_t d = 0; d < nd; ++d) {
    S3_CHECK_VALUE(size[d] >= 0, op, ": `size` must be non-negative, got ", size);
    S3_CHECK_VALUE(stride[d] >= 0, op, ": `stride` must be non-negative, got ", stride);
    S3_CHECK_VALUE(block[d] >= 1, op, ": `block` entries must be >= 1, got ", block);
    S3_CHECK_VALUE(size[d] % block[d] == 0, op, ": block ", block, " does not tile view ", size,
                   ": dim ", d, " has size ", size[d], ", not a multiple of ", block[d]);
    v.size[d] = size[d];
    v.stride[d] = stride[d];
    v.block[d] = block[d];
    v.grid[d] = size[d] / block[d];
    v.numel *= size[d];
    v.block_numel *= block[d];
    last += (size[d] - 1) * stride[d];
  }
  v.num_blocks = v.block_numel ? v.numel / v.block_numel : 0;
  if (v.numel > 0) {
    S3_CHECK_VALUE(last < x.numel(), op, ": view (size ", size, ", stride ", stride, ", offset ",
                   offset, ") reaches element ", last, " but `x` has only ", x.numel(),
                   " elements");
  }
  return v;
}

enum class BlockReduce : int { Norm = 0, Min = 1, Max = 2, Sum = 3 };

inline BlockReduce parse_block_reduce(std::string_view reduce, double p, const char* op) {
  BlockReduce r;
  if (reduce == "norm") {
    r = BlockReduce::Norm;
    S3_CHECK_VALUE(p > 0, op, ": `p` must be > 0 (or inf) for reduce='norm', got ", p);
  } else if (reduce == "min") {
    r = BlockReduce::Min;
  } else if (reduce == "max") {
    r = BlockReduce::Max;
  } else if (reduce == "sum") {
    r = BlockReduce::Sum;
  } else {
    S3_CHECK_VALUE(false, op, ": `reduce` must be 'norm', 'min', 'max' or 'sum', got '",
                   std::string(reduce), "'");
  }
  return r;
}

inline void check_block_scale(const at::Tensor& x, const StridedBlocks& v, const at::Tensor& scale,
                              const char* op) {
  S3_CHECK_TYPE(is_float_type(scale.scalar_type()) || scale.scalar_type() == at::kBool, op,
                ": `scale` must be a float or bool tensor, got ", scale.scalar_type());
  check_same_device(x, scale, op, "x", "scale");
  const auto grid = v.grid_shape();
  S3_CHECK_VALUE(scale.sizes().equals(grid), op, ": `scale` must have the block-grid shape ",
                 grid, ", got ", scale.sizes());
}

// ------------------------------------------------------------------ k-th largest
inline void check_kth_largest(const at::Tensor& x, int64_t k, const char* op) {
  check_float(x, op, "x");
  S3_CHECK_VALUE(x.dim() >= 1, op, ": `x` must have at least 1 dim (selection runs along the last), got a scalar");
  const int64_t n = x.size(-1);
  S3_CHECK_VALUE(k >= 0 && k <= n, op, ": `k` must be in [0, ", n, "] (the size of the last dim of `x`), got ", k);
}

// ------------------------------------------------------------------ subset scoring
inline void check_score_subsets(const at::Tensor& w, const at::Tensor& c,
                                const std::optional<at::Tensor>& c_index, const at::Tensor& subsets,
                                const char* op) {
  S3_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble, op,
                ": `w` must be float32 or float64, got ", w.scalar_type());
  check_float(c, op, "c");
  check_dtype(subsets, at::kLong, op, "subsets");
  check_dim(w, 2, op, "w", "(N, E): N items of E weights");
  check_dim(c, 3, op, "c", "(U, E, E): inverse-Hessian sub-blocks");
  check_dim(subsets, 2, op, "subsets", "(S, P): S candidate subsets of P indices");
  check_same_device(w, c, op, "w", "c");
  check_same_device(w, subsets, op, "w", "subsets");
  const int64_t N = w.size(0), E = w.size(1);
  S3_CHECK_VALUE(c.size(1) == E && c.size(2) == E, op, ": `c` must be (U, ", E, ", ", E,
                 ") to match `w` of shape ", w.sizes(), ", got ", c.sizes());
  S3_CHECK_VALUE(subsets.size(1) <= E, op, ": `subsets` rows have ", subsets.size(1),
                 " indices but items have only E=", E, " elements");
  if (c_index.has_value()) {
    const auto& ci = *c_index;
    check_dtype(ci, at::kLong, op, "c_index");
    check_same_device(w, ci, op, "w", "c_index");
    S3_CHECK_VALUE(ci.dim() == 1 && ci.size(0) == N, op, ": `c_index` must be (N,) = (", N,
                   ",), got ", ci.sizes());
  } else {
    S3_CHECK_VALUE(c.size(0) == N, op, ": without `c_index`, `c` must have one block per item: (",
                   N, ", E, E), got ", c.sizes());
  }
}

// Cholesky of a small SPD matrix held row-major in `a` (n x n), in place (lower
// triangle). Returns false when a pivot is not positive and finite.
template <typename T>
C10_HOST_DEVICE inline bool small_cholesky(T* a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    T d = a[j * n + j];
    for (int64_t k = 0; k < j; ++k) d -= a[j * n + k] * a[j * n + k];
    if (!(d > T(0)) || !(d < T(INFINITY))) return false;
    d = sqrt(d);
    a[j * n + j] = d;
    for (int64_t i = j + 1; i < n; ++i) {
      T s = a[i * n + j];
      for (int64_t k = 0; k < j; ++k) s -= a[i * n + k] * a[j * n + k];
      a[i * n + j] = s / d;
    }
  }
  return true;
}

// Solve L y = b in place (L lower, row-major n x n).
template <typename T>
C10_HOST_DEVICE inline void small_forward_solve(const T* L, T* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T s = b[i];
    for (int64_t k = 0; k < i; ++k) s -= L[i * n + k] * b[k];
    b[i] = s / L[i * n + i];
  }
}

// Solve L^T x = y in place.
template <typename T>
C10_HOST_DEVICE inline void small_backward_solve(const T* L, T* b, int64_t n) {
  for (int64_t i = n - 1; i >= 0; --i) {
    T s = b[i];
    for (int64_t k = i + 1; k < n; ++k) s -= L[k * n + i] * b[k];
    b[i] = s / L[i * n + i];
  }
}

}  // namespace s3sparse
