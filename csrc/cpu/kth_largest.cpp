// CPU kernel of kth_largest: per row, a partial selection (nth_element) on
// (value, index) keys, so ties always favour the lower index.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common.h"

namespace s3sparse {
namespace {

std::tuple<at::Tensor, at::Tensor> kth_largest_cpu(const at::Tensor& x_in, int64_t k) {
  check_kth_largest(x_in, k, "s3sparse.kth_largest");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1);
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  at::Tensor values = at::empty(x.sizes().slice(0, x.dim() - 1), x.options());
  at::Tensor keep = at::zeros(x.sizes(), x.options().dtype(at::kBool));
  if (rows == 0) return {values, keep};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kth_largest_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* vout = values.mutable_data_ptr<scalar_t>();
    bool* kout = keep.mutable_data_ptr<bool>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      std::vector<std::pair<double, int64_t>> keys(n);
      for (int64_t r = r0; r < r1; ++r) {
        if (k == 0) {
          vout[r] = static_cast<scalar_t>(std::numeric_limits<double>::infinity());
          continue;
        }
        const scalar_t* row = src + r * n;
        for (int64_t i = 0; i < n; ++i) {
          const double val = static_cast<double>(row[i]);
          keys[i] = {std::isnan(val) ? -std::numeric_limits<double>::infinity() : val, i};
        }
        // Larger value first; among equal values the lower index first.
        auto before = [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        };
        std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), before);
        vout[r] = static_cast<scalar_t>(keys[k - 1].first);
        bool* krow = kout + r * n;
        for (int64_t i = 0; i < k; ++i) krow[keys[i].second] = true;
      }
    });
  });
  return {values, keep};
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CPU, m) { m.impl("kth_largest", &kth_largest_cpu); }

}  // namespace s3sparse
