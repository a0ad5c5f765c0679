// CPU kernel of score_subsets: batched OBS subset scoring. (True OBS's Schur
// updates are lowrank_sub: csrc/cpu/lowrank.cpp.)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace s3sparse {
namespace {

// ------------------------------------------------------------------ score_subsets
std::tuple<at::Tensor, at::Tensor> score_subsets_cpu(const at::Tensor& w_in, const at::Tensor& c_in,
                                                     const std::optional<at::Tensor>& c_index_in,
                                                     const at::Tensor& subsets_in) {
  constexpr const char* op = "s3sparse.score_subsets";
  check_score_subsets(w_in, c_in, c_index_in, subsets_in, op);
  const at::Tensor w = w_in.contiguous();
  const at::Tensor c = c_in.contiguous();
  const at::Tensor subsets = subsets_in.contiguous();
  const int64_t N = w.size(0), E = w.size(1), U = c.size(0);
  const int64_t S = subsets.size(0), P = subsets.size(1);
  const int64_t* sub = subsets.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < S * P; ++i) {
    S3_CHECK_VALUE(sub[i] >= 0 && sub[i] < E, op, ": `subsets` entries must be in [0, ", E,
                   "), got ", sub[i], " in subset ", i / P);
  }
  at::Tensor c_index;
  if (c_index_in.has_value()) {
    c_index = c_index_in->contiguous();
    const int64_t* ci = c_index.const_data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      S3_CHECK_VALUE(ci[n] >= 0 && ci[n] < U, op, ": `c_index` entries must be in [0, ", U,
                     "), got ", ci[n], " at item ", n);
    }
  }
  at::Tensor costs = at::empty({N, S}, w.options());
  at::Tensor best = at::zeros({N}, w.options().dtype(at::kLong));
  if (N == 0 || S == 0) return {costs, best};

  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "score_subsets_cpu_w", [&] {
    using acc_t = scalar_t;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* cost_out = costs.mutable_data_ptr<acc_t>();
    int64_t* best_out = best.mutable_data_ptr<int64_t>();
    const int64_t* ci = c_index.defined() ? c_index.const_data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "score_subsets_cpu_c", [&] {
      const scalar_t* cp = c.const_data_ptr<scalar_t>();
      at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        std::vector<acc_t> a(P * P), z(P);
        for (int64_t n = n0; n < n1; ++n) {
          const acc_t* wn = wp + n * E;
          const scalar_t* C = cp + (ci ? ci[n] : n) * E * E;
          acc_t best_cost = std::numeric_limits<acc_t>::infinity();
          int64_t best_s = 0;
          for (int64_t s = 0; s < S; ++s) {
            const int64_t* idx = sub + s * P;
            for (int64_t i = 0; i < P; ++i) {
              for (int64_t j = 0; j < P; ++j) a[i * P + j] = static_cast<acc_t>(C[idx[i] * E + idx[j]]);
              z[i] = wn[idx[i]];
            }
            acc_t cost = std::numeric_limits<acc_t>::infinity();
            if (small_cholesky(a.data(), P)) {
              small_forward_solve(a.data(), z.data(), P);
              cost = 0;
              for (int64_t i = 0; i < P; ++i) cost += z[i] * z[i];
            }
            cost_out[n * S + s] = cost;
            if (cost < best_cost) {
              best_cost = cost;
              best_s = s;
            }
          }
          best_out[n] = best_s;
        }
      });
    });
  });
  return {costs, best};
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CPU, m) { m.impl("score_subsets", &score_subsets_cpu); }

}  // namespace s3sparse
