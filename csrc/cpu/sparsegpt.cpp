// CPU kernel of sparsegpt_block_: the sweep of csrc/sparsegpt.h, one row group
// at a time (at::parallel_for over groups), each group's rows copied to a
// contiguous local buffer and written back once. Compiled with
// -ffp-contract=off (CMakeLists.txt): no fused multiply-add, so the result is
// bit for bit the Python loop's.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "sparsegpt.h"

namespace s3sparse {
namespace {

std::tuple<at::Tensor, at::Tensor> sparsegpt_block_cpu(at::Tensor& w, at::Tensor& pruned, const at::Tensor& u_in,
                                                       const at::Tensor& scope_ptr_in,
                                                       const at::Tensor& scope_cols_in,
                                                       const at::Tensor& scope_rows_in,
                                                       const at::Tensor& group_rows_in, int64_t nnz,
                                                       int64_t block_numel) {
  constexpr const char* op = "s3sparse.sparsegpt_block_";
  check_sparsegpt_block(w, pruned, u_in, scope_ptr_in, scope_cols_in, scope_rows_in, group_rows_in, nnz,
                        block_numel, op);
  const int64_t M = w.size(0), b = w.size(1);
  const at::Tensor scope_ptr = scope_ptr_in.contiguous();
  const at::Tensor scope_cols = scope_cols_in.contiguous();
  const at::Tensor scope_rows = scope_rows_in.contiguous();
  const at::Tensor group_rows = group_rows_in.contiguous();
  const int64_t S = scope_cols.size(0), E = scope_cols.size(1);
  const int64_t R = group_rows.size(0), rpg = group_rows.size(1);
  at::Tensor err = at::zeros({M, b}, w.options());
  at::Tensor status = at::zeros({}, w.options().dtype(at::kInt));

  const int64_t* ptr = scope_ptr.const_data_ptr<int64_t>();
  const int64_t* cols = scope_cols.const_data_ptr<int64_t>();
  const int64_t* lrows = scope_rows.const_data_ptr<int64_t>();
  const int64_t* grows = group_rows.const_data_ptr<int64_t>();
  const int bad = sparsegpt_validate_part(ptr, cols, lrows, grows, M, b, S, E, R, rpg, 0, 1);
  if (bad != 0) {
    status.fill_(bad);
    return {err, status};
  }
  if (R == 0 || rpg == 0 || b == 0) return {err, status};

  const at::Tensor u = u_in.contiguous();
  const float* up = u.const_data_ptr<float>();
  std::vector<float> d2(b);
  for (int64_t c = 0; c < b; ++c) d2[c] = sgpt_mul(up[c * b + c], up[c * b + c]);
  const SgptTables tables{ptr, cols, lrows, E, block_numel, nnz};
  const int64_t nb = E / block_numel;

  float* wp = w.mutable_data_ptr<float>();
  bool* pp = pruned.mutable_data_ptr<bool>();
  float* ep = err.mutable_data_ptr<float>();
  const int64_t ws0 = w.stride(0), ws1 = w.stride(1), ps0 = pruned.stride(0), ps1 = pruned.stride(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, rpg * b * b / 64));
  at::parallel_for(0, R, grain, [&](int64_t g0, int64_t g1) {
    const int64_t n = rpg * b;
    std::vector<float> wl(n), el(n), keys(std::max<int64_t>(nb, 1));
    std::vector<uint8_t> pl(n);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t* rows = grows + g * rpg;
      for (int64_t r = 0; r < rpg; ++r) {
        const float* src = wp + rows[r] * ws0;
        const bool* psrc = pp + rows[r] * ps0;
        for (int64_t j = 0; j < b; ++j) {
          wl[r * b + j] = src[j * ws1];
          pl[r * b + j] = psrc[j * ps1] ? 1 : 0;
        }
      }
      float* wb = wl.data();
      uint8_t* pb = pl.data();
      float* eb = el.data();
      float* kb = keys.data();
      sparsegpt_sweep<int64_t>([wb, b](int64_t r, int64_t j) -> float& { return wb[r * b + j]; },
                      [pb, b](int64_t r, int64_t j) -> uint8_t& { return pb[r * b + j]; },
                      [eb, b](int64_t r, int64_t j) -> float& { return eb[r * b + j]; },
                      [up, b](int64_t i, int64_t j) -> float { return up[i * b + j]; }, d2.data(),
                      [kb](int64_t k) -> float& { return kb[k]; }, tables, b, rpg);
      for (int64_t r = 0; r < rpg; ++r) {
        float* dst = wp + rows[r] * ws0;
        bool* pdst = pp + rows[r] * ps0;
        std::copy(eb + r * b, eb + (r + 1) * b, ep + rows[r] * b);
        for (int64_t j = 0; j < b; ++j) {
          dst[j * ws1] = wl[r * b + j];
          pdst[j * ps1] = pl[r * b + j] != 0;
        }
      }
    }
  });
  return {err, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CPU, m) { m.impl("sparsegpt_block_", &sparsegpt_block_cpu); }

}  // namespace s3sparse
