// sp24_linear on the CPU: W decoded from the values and the tensor-core metadata
// (checked: every nibble two distinct columns in order), then one fp32 GEMM.
// The CPU has no sparse tensor cores; this kernel gives the op its meaning on
// every device (tests, opcheck, a model moved to the CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "sp24.h"

namespace s3sparse {
namespace {

// W (M, K) fp32 from values (M * K / 2) and sp_meta (M/16, K/64, 32); raises on a nibble that is not
// two columns p0 < p1.
at::Tensor sp24_dense_fp32(const at::Tensor& values, const at::Tensor& sp_meta, int64_t M, int64_t K,
                           int64_t order, const char* op) {
  const at::Tensor v = values.reshape({M, K / 2}).to(at::kFloat);
  at::Tensor w = at::zeros({M, K}, v.options());
  const float* vp = v.const_data_ptr<float>();
  float* wp = w.data_ptr<float>();
  const int32_t* mp = sp_meta.const_data_ptr<int32_t>();
  const int64_t tiles = M / 16, iters = K / 64;
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t T = t0; T < t1; ++T) {
      for (int64_t i = 0; i < iters; ++i) {
        for (int lane = 0; lane < 32; ++lane) {
          const uint32_t word = static_cast<uint32_t>(mp[(T * iters + i) * 32 + lane]);
          const int g = lane / 4, s = (lane / 2) % 2, h = lane % 2;
          for (int half = 0; half < 2; ++half) {
            const int64_t row = 16 * T + g + 8 * half;
            for (int j = 0; j < 4; ++j) {
              const uint32_t nib = (word >> (16 * half + 4 * j)) & 0xFu;
              const int p0 = static_cast<int>(nib & 3u), p1 = static_cast<int>(nib >> 2);
              const int64_t G = sp24_group(i, s, 4 * h + j);
              if (p0 >= p1) {
                int64_t none = -1;
                bad.compare_exchange_strong(none, (T * iters + i) * 32 + lane);
                continue;
              }
              wp[row * K + sp24_column(order, 4 * G + p0)] = vp[row * (K / 2) + sp24_stored(order, 2 * G)];
              wp[row * K + sp24_column(order, 4 * G + p1)] = vp[row * (K / 2) + sp24_stored(order, 2 * G + 1)];
            }
          }
        }
      }
    }
  });
  const int64_t b = bad.load();
  S3_CHECK_VALUE(b < 0, op, ": `sp_meta`[", b / 32 / iters, ", ", (b / 32) % iters, ", ", b % 32,
                 "] holds a group whose two kept columns are not p0 < p1; build sp_meta with "
                 "s3sparse.sparse.sp24.sp24_meta_words");
  return w;
}

at::Tensor sp24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& sp_meta,
                           int64_t out_features, const std::optional<at::Tensor>& bias, bool /*checked*/,
                           int64_t column_order) {
  constexpr const char* op = "s3sparse.sp24_linear";  // (checks sp_meta whatever `checked` says)
  const Sp24Geometry g = check_sp24_linear(x, values, sp_meta, out_features, bias, column_order, op);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(g.M);
  const at::Tensor w = sp24_dense_fp32(values, sp_meta, g.M, g.K, column_order, op);
  if (g.N == 0) return at::empty(out_sizes, x.options());
  at::Tensor y = at::mm(x.reshape({g.N, g.K}).to(at::kFloat), w.t());
  if (bias.has_value()) y.add_(bias->to(at::kFloat));  // (fp32 sum, one rounding below)
  return y.to(x.scalar_type()).view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CPU, m) { m.impl("sp24_linear", &sp24_linear_cpu); }

}  // namespace s3sparse
