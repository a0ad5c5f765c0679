// CUDA kernels of packed_to_dense and packed_linear (format: csrc/packed.h,
// semantics: csrc/cpu/packed.cpp and s3sparse/reference.py).
//
// The stream decode kernel (1..8 tokens on every reference pattern) is in
// packed_stream.cuh, the expansion kernel of larger batches on those patterns
// (W written out whole, then cuBLAS) in packed_expand.cuh, the general decode
// kernels of any pattern with a row_group promise (rowtile, gemv, finalize) in
// packed_decode.cuh; the kernel here:
//   scatter  one thread per (scope, kept block): writes the kept blocks into a
//            zero W (packed_to_dense, and the large-batch path of packed_linear,
//            which then calls cuBLAS on that workspace).
//
// Bad data (an index, code or offset out of range, a scope outside its row
// group) is never read or written through: the element is skipped, its thread
// block writes NaN into every output it owns, and the bits go to a status word.
// Unless the caller says the tables were checked (`checked`, PackedLinear does
// after its first call) or a CUDA graph is being captured, the host reads that
// word after the launch and raises the CPU kernel's ValueError.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cuda/launch.cuh"
#include "cuda/packed_common.cuh"
#include "cuda/packed_decode.cuh"
#include "cuda/packed_expand.cuh"
#include "cuda/packed_mma.cuh"
#include "cuda/packed_rowblock.cuh"
#include "cuda/packed_stream.cuh"
#include "packed.h"

namespace s3sparse {
namespace {

using namespace packed_cuda;

constexpr int kThreads = 256;
constexpr int kStreamTokens = 8;   // the stream kernel up to this many tokens; above, expand + cuBLAS
constexpr int kStreamTokensGrouped = 2;
// The tensor-core kernel (packed_mma.cuh) from kMmaMinTokens to kMmaTokens
// tokens on the patterns it takes (fp16/bf16 2:4, 4:8, coupled 2:4). Measured
// on the H200 at 813a766 (2560x9728 / 9728x2560, 2:4, each path forced): 8
// tokens 31.6 / 24.0 us against the stream kernel's 49.4 / 33.9 and the
// expansion's 54.9 / 51.7; 16 tokens 33.6 / 26.7 against the expansion's 54.9
// / 53.0; 4 tokens a tie (31.4 / 23.8 against 29.0 / 26.6); 1 token the stream
// kernel (22.5 / 22.2 against 31.4 / 23.6). Above 16 tokens it would read W
// once per 16 (two launches: slower than the expansion's one GEMM).
constexpr bool kMmaAuto = true;
constexpr int64_t kMmaMinTokens = 5;
constexpr int64_t kMmaTokens = 16;  // the same with row groups of more than one row

// ------------------------------------------------------------------ scatter
// One thread per kept value, grid-stride. `row_group` > 0 also checks that
// every element lies in its scope's row group (packed_linear's promise).
// With Fast32 (every index below 2^30) the divisions are 32-bit
// multiply-shifts by the plan's divisors; 64-bit division is tens of
// instructions a value, and this kernel was bound by it.
struct ScatterPlan {
  PackedGeometry g;
  FastDivmod div_B, div_nnz, div_per_word, div_K, div_spg;
  FastDivmod div_shape[kMaxPackedScopeDims];
};

template <bool Fast32>
__device__ __forceinline__ int64_t scatter_scope_base(const ScatterPlan& p, int64_t s) {
  if constexpr (!Fast32) {
    return p.g.scope_base(s);
  } else {
    uint32_t rest = static_cast<uint32_t>(s);
    int32_t base = 0;
    for (int d = p.g.ndim - 1; d >= 0; --d) {
      const uint32_t q = p.div_shape[d].div(rest);
      base += static_cast<int32_t>(rest - q * static_cast<uint32_t>(p.g.scope_shape[d])) *
              static_cast<int32_t>(p.g.scope_stride[d]);
      rest = q;
    }
    return base;
  }
}

template <typename T, bool Fast32>
__global__ void __launch_bounds__(kThreads)
packed_scatter_kernel(const ScatterPlan p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                      const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                      const int64_t* __restrict__ elem_off, T* __restrict__ w, int* __restrict__ status) {
  const PackedGeometry& g = p.g;
  const int64_t total = g.S * g.nnz * g.B;
  const int64_t w_end = g.M * g.K;
  const int64_t spg = g.row_group > 0 ? g.S * g.row_group / g.M : 0;
  const uint32_t mask = g.meta_bits >= 32 ? 0xFFFFFFFFu : ((1u << g.meta_bits) - 1u);
  int bad = 0;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t sj, e, s, j;
    if constexpr (Fast32) {
      const uint32_t t32 = static_cast<uint32_t>(t);
      const uint32_t sj32 = p.div_B.div(t32), s32 = p.div_nnz.div(sj32);
      sj = sj32;
      e = t32 - sj32 * static_cast<uint32_t>(g.B);
      s = s32;
      j = sj32 - s32 * static_cast<uint32_t>(g.nnz);
    } else {
      sj = t / g.B;
      e = t - sj * g.B;
      s = sj / g.nnz;
      j = sj - s * g.nnz;
    }
    // Meta field i: field s (one code a scope) or sj (one index a block).
    const int64_t field = subsets != nullptr ? s : sj;
    uint32_t raw;
    if constexpr (Fast32) {
      const uint32_t word = p.div_per_word.div(static_cast<uint32_t>(field));
      const uint32_t shift = (static_cast<uint32_t>(field) - word * static_cast<uint32_t>(g.per_word)) * g.meta_bits;
      raw = (static_cast<uint32_t>(ldg(meta + word)) >> shift) & mask;
    } else {
      raw = packed_field(meta, field, g.meta_bits, g.per_word);
    }
    int64_t k;
    if (subsets != nullptr) {
      if (raw >= static_cast<uint64_t>(g.n_codes)) {
        bad |= kPackedBadCode;
        continue;
      }
      k = subsets[static_cast<int64_t>(raw) * g.nnz + j];
      if (k < 0) {
        bad |= kPackedBadIndex;
        continue;
      }
    } else {
      k = raw;
    }
    if (k >= g.G) {
      bad |= kPackedBadIndex;
      continue;
    }
    const int64_t f = scatter_scope_base<Fast32>(p, s) + block_off[k] + elem_off[e];
    if (f < 0 || f >= w_end) {
      bad |= kPackedBadOffset;
      continue;
    }
    if (spg > 0) {
      int64_t row, row_lo;
      if constexpr (Fast32) {
        row = p.div_K.div(static_cast<uint32_t>(f));
        row_lo = static_cast<int64_t>(p.div_spg.div(static_cast<uint32_t>(s))) * g.row_group;
      } else {
        row = f / g.K;
        row_lo = s / spg * g.row_group;
      }
      if (row < row_lo || row >= row_lo + g.row_group) {
        bad |= kPackedBadGroup;
        continue;
      }
    }
    w[f] = values[t];
  }
  if (bad) atomicOr(status, bad);
}

// ------------------------------------------------------------------ host side
// Raise the CPU kernel's error for nonzero status bits (one host sync).
void raise_on_bad_data(const at::Tensor& status, const PackedGeometry& g, const char* op) {
  const int bad = status.item<int>();
  S3_CHECK_VALUE(bad == 0, packed_data_error_message(bad, g, op));
}

// Without a host check: NaN everywhere in `out` when the status is nonzero (on
// the device, no sync), so bad data never passes as numbers.
void poison_on_bad_data(const at::Tensor& status, at::Tensor& out) {
  out.masked_fill_(status.ne(0), std::numeric_limits<double>::quiet_NaN());
}

// The host check of subsets (its CPU kernel's message), on a host copy.
void check_subsets_on_host(const PackedGeometry& g, const std::optional<at::Tensor>& subsets, const char* op) {
  if (subsets.has_value()) check_packed_subsets_host(g, subsets->to(at::kCPU).contiguous(), op);
}

int* status_ptr(const at::Tensor& status) { return status.mutable_data_ptr<int>(); }

void launch_scatter(const PackedGeometry& g, const at::Tensor& values, const at::Tensor& meta,
                    const std::optional<at::Tensor>& subsets, const at::Tensor& block_off, const at::Tensor& elem_off,
                    at::Tensor& w, const at::Tensor& status, cudaStream_t stream) {
  const int64_t total = g.S * g.nnz * g.B;
  if (total == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), int64_t(1) << 16));
  const int32_t* sub = subsets.has_value() ? subsets->const_data_ptr<int32_t>() : nullptr;
  ScatterPlan p;
  p.g = g;
  int64_t lo = 0, hi = 0;
  g.scope_base_range(&lo, &hi);
  // 32-bit index math when every index, offset and divisor fits (block_off and
  // elem_off are still added in 64 bits, so bad offsets are caught exactly).
  bool fast = total < kInt32Safe && g.M * g.K < kInt32Safe && g.n_fields < kInt32Safe && lo > -kInt32Safe &&
              hi < kInt32Safe;
  for (int d = 0; d < g.ndim; ++d) fast = fast && g.scope_shape[d] < kInt32Safe && g.scope_stride[d] < kInt32Safe &&
                                             g.scope_stride[d] > -kInt32Safe;
  const int64_t spg = g.row_group > 0 ? g.S * g.row_group / g.M : 0;
  if (fast) {
    p.div_B = FastDivmod(static_cast<uint32_t>(g.B));
    p.div_nnz = FastDivmod(static_cast<uint32_t>(g.nnz));
    p.div_per_word = FastDivmod(static_cast<uint32_t>(g.per_word));
    p.div_K = FastDivmod(static_cast<uint32_t>(g.K));
    p.div_spg = FastDivmod(static_cast<uint32_t>(std::max<int64_t>(spg, 1)));
    for (int d = 0; d < g.ndim; ++d) p.div_shape[d] = FastDivmod(static_cast<uint32_t>(g.scope_shape[d]));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_scatter_cuda", [&] {
    auto launch = [&](auto kernel) {
      S3_LAUNCH(blocks, kThreads, 0, stream, kernel)(
          p, values.const_data_ptr<scalar_t>(), meta.const_data_ptr<int32_t>(), sub,
          block_off.const_data_ptr<int64_t>(), elem_off.const_data_ptr<int64_t>(), w.mutable_data_ptr<scalar_t>(),
          status_ptr(status));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (fast) {
      launch(packed_scatter_kernel<scalar_t, true>);
    } else {
      launch(packed_scatter_kernel<scalar_t, false>);
    }
  });
}

at::Tensor packed_to_dense_cuda(const at::Tensor& values, const at::Tensor& meta,
                                const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                                const at::Tensor& elem_off, at::IntArrayRef scope_shape, at::IntArrayRef scope_stride,
                                int64_t meta_bits, int64_t out_features, int64_t in_features) {
  constexpr const char* op = "s3sparse.packed_to_dense";
  const PackedGeometry g = check_packed_to_dense(values, meta, subsets, block_off, elem_off, scope_shape, scope_stride,
                                                 meta_bits, out_features, in_features, op);
  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool capturing = stream_capturing(stream);
  if (!capturing) check_subsets_on_host(g, subsets, op);
  at::Tensor out = at::zeros({g.M, g.K}, values.options());
  if (g.S == 0 || g.nnz == 0 || g.B == 0) return out;
  at::Tensor status = at::zeros({}, values.options().dtype(at::kInt));
  launch_scatter(g, values, meta, subsets, block_off, elem_off, out, status, stream);
  if (capturing) {
    poison_on_bad_data(status, out);
  } else {
    raise_on_bad_data(status, g, op);
  }
  return out;
}


// Which kernel family packed_linear takes on the stream kernel's patterns:
// by token count (auto), or forced by S3SPARSE_PACKED_CUDA_PATH (read once).
enum class PathChoice { kAuto, kStream, kExpand, kMma };
constexpr int64_t kMaxStreamLaunchTokens = 8;  // tokens a stream launch

PathChoice path_choice() {
  static const PathChoice choice = [] {
    const char* env = std::getenv("S3SPARSE_PACKED_CUDA_PATH");
    if (env == nullptr) return PathChoice::kAuto;
    if (std::strcmp(env, "stream") == 0) return PathChoice::kStream;
    if (std::strcmp(env, "expand") == 0) return PathChoice::kExpand;
    if (std::strcmp(env, "mma") == 0) return PathChoice::kMma;
    return PathChoice::kAuto;
  }();
  return choice;
}

at::Tensor packed_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                              const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                              const at::Tensor& elem_off, at::IntArrayRef scope_shape, at::IntArrayRef scope_stride,
                              int64_t meta_bits, int64_t out_features, int64_t row_group,
                              const std::optional<at::Tensor>& bias_arg, bool checked) {
  constexpr const char* op = "s3sparse.packed_linear";
  const PackedGeometry g = check_packed_linear(x, values, meta, subsets, block_off, elem_off, scope_shape,
                                               scope_stride, meta_bits, out_features, row_group, bias_arg, op);
  const std::optional<at::Tensor> bias = contiguous_bias(bias_arg);  // (the kernels index bias[row])
  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Host-side checks (one sync) unless the caller checked these tables before,
  // or a graph is being captured.
  const bool check = !checked && !stream_capturing(stream);
  if (check) check_subsets_on_host(g, subsets, op);
  // (A decode call's host time is the point: no view is made that a 2-D x does not need.)
  const bool x_2d = x.dim() == 2;
  const int64_t N = x_2d ? x.size(0) : c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const auto shaped_like_x = [&](const at::Tensor& y2) {  // (N, M) -> (..., M)
    if (x_2d) return y2;
    std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
    out_sizes.push_back(g.M);
    return y2.view(out_sizes);
  };
  if (N == 0 || g.M == 0) return shaped_like_x(at::empty({N, g.M}, x.options()));
  const bool no_terms = g.S == 0 || g.nnz == 0 || g.B == 0 || g.K == 0;
  if (no_terms) {
    // (clone: for one token, contiguous() would hand back the bias itself, an output aliasing an input)
    at::Tensor y = bias.has_value() ? bias->expand({N, g.M}).clone(at::MemoryFormat::Contiguous)
                                    : at::zeros({N, g.M}, x.options());
    return shaped_like_x(y);
  }
  at::Tensor status = check ? at::zeros({}, values.options().dtype(at::kInt)) : at::Tensor();
  int* st = check ? status_ptr(status) : nullptr;
  const at::Tensor x2 = x_2d && x.is_contiguous() ? x : x.reshape({N, g.K}).contiguous();

  // Up to kStreamTokens tokens on every reference pattern: the stream kernel
  // (packed_stream.cuh). S3SPARSE_PACKED_CUDA_PATH=stream|expand overrides the
  // choice, for benchmarks that measure the crossover.
  const PathChoice path = path_choice();
  // The tensor-core kernel (fp16 / bf16 span patterns: 2:4, 4:8, coupled 2:4),
  // 16 tokens a launch: forced (S3SPARSE_PACKED_CUDA_PATH=mma, up to 64 tokens)
  // or, once kMmaAuto, from kMmaMinTokens to kMmaTokens tokens.
  const bool mma_first = path == PathChoice::kMma ? N <= kMmaMaxTokens * 4
                         : path == PathChoice::kAuto && kMmaAuto ? (N >= kMmaMinTokens && N <= kMmaTokens)
                                                                : false;
  // y from a kernel launched on slices of at most `per_launch` tokens, or
  // nothing when `launch` (a slice's x and y) says the kernel does not apply.
  auto sliced = [&](int64_t per_launch, auto&& launch) -> std::optional<at::Tensor> {
    at::Tensor y = at::empty({N, g.M}, x.options());
    if (N <= per_launch) {  // (one launch: no slices)
      if (!launch(x2, y)) return std::nullopt;
    } else {
      for (int64_t n0 = 0; n0 < N; n0 += per_launch) {
        const int64_t n = std::min<int64_t>(per_launch, N - n0);
        at::Tensor ys = y.narrow(0, n0, n);
        if (!launch(x2.narrow(0, n0, n), ys)) return std::nullopt;
      }
    }
    if (check) raise_on_bad_data(status, g, op);  // (without: the kernel wrote NaN)
    return shaped_like_x(y);
  };
  if (mma_first) {
    auto y = sliced(kMmaMaxTokens, [&](const at::Tensor& xs, at::Tensor& ys) {
      bool launched = false;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_mma_cuda", [&] {
        if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
          launched = launch_packed_mma<scalar_t>(g, xs.size(0), values, meta, subsets, block_off, elem_off, xs, bias,
                                                 ys, st, stream);
        }
      });
      return launched;
    });
    if (y) return *y;
  }
  // Row-coupled runs (block16-rows: a scope of G rows sharing B columns, one kept):
  // the row-block kernel (packed_rowblock.cuh), up to 16 tokens (fp16/bf16 runs of
  // 16: its tensor-core form from 3 tokens) or 8 (its FMA form: fp32, runs of 8).
  // Measured on an H100 (benchmarks/results/packed-rowblock-lab-h100.txt, fp16
  // block16-rows, 2560x9728 / 9728x2560): the FMA form 10.5 / 12.3 us at 1 token,
  // 54.1 / 40.2 at 8, against 47.1 / 35.2 and 73.9 / 57.2 for the paths below.
  const int64_t rowblock_max = rowblock_tokens(g, values.scalar_type());
  if (path == PathChoice::kAuto && N <= rowblock_max && !subsets.has_value() &&
      values.scalar_type() != at::kDouble && rowblock_sets(g) > 0) {
    auto y = sliced(rowblock_max, [&](const at::Tensor& xs, at::Tensor& ys) {
      bool launched = false;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_rowblock_cuda", [&] {
        launched = launch_packed_rowblock<scalar_t>(g, xs.size(0), values, meta, subsets, block_off, elem_off, xs,
                                                    bias, ys, st, stream);
      });
      return launched;
    });
    if (y) return *y;
  }
  // Row groups of more than one row (block16-rows) decode slower (a block a
  // group) and expand no slower: their crossover is lower.
  const int64_t stream_tokens = g.row_group == 1 ? kStreamTokens : kStreamTokensGrouped;
  const bool stream_first = path == PathChoice::kStream ? N <= kMaxStreamLaunchTokens * 4 : N <= stream_tokens;
  if (stream_first && path != PathChoice::kExpand) {
    auto y = sliced(kMaxStreamLaunchTokens, [&](const at::Tensor& xs, at::Tensor& ys) {
      bool launched = false;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_stream_cuda", [&] {
        if constexpr (!std::is_same_v<scalar_t, double>) {
          launched = launch_packed_stream<scalar_t>(g, xs.size(0), values, meta, subsets, block_off, elem_off, xs,
                                                    bias, ys, st, stream);
        }
      });
      return launched;
    });
    if (y) return *y;
  }

  // The workspace paths below raise on bad data after the expansion (check),
  // or poison y from their own status word.
  at::Tensor ws_status;
  auto workspace_status = [&]() -> at::Tensor {
    if (!ws_status.defined()) ws_status = check ? status : at::zeros({}, values.options().dtype(at::kInt));
    return ws_status;
  };
  auto workspace_linear = [&](const at::Tensor& w) {
    if (check) raise_on_bad_data(status, g, op);
    at::Tensor y;
    if (bias.has_value() && (x2.scalar_type() == at::kHalf || x2.scalar_type() == at::kBFloat16)) {
      // One rounding, as the kernels: cuBLAS's 16-bit addmm can round x Wᵀ to the output dtype before
      // adding the bias (seen at 1 token in bf16 on an H100 and an H200: round(round(x Wᵀ) + b), far
      // off where the bias cancels x Wᵀ), so the sum is taken in fp32 and rounded once.
#ifdef S3SPARSE_EMULATE_CUDA  // (the CPU has no mm.dtype: the same fp32 products and sums)
      y = at::mm(x2.to(at::kFloat), w.t().to(at::kFloat)).add_(*bias).to(x2.scalar_type());
#else
      y = at::mm(x2, w.t(), at::kFloat).add_(*bias).to(x2.scalar_type());
#endif
    } else {
      y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
    }
    if (!check) poison_on_bad_data(ws_status, y);
    return shaped_like_x(y);
  };

  // More tokens on those patterns: W written out by the expansion kernel, then cuBLAS.
  if (N > stream_tokens || path == PathChoice::kExpand) {
    at::Tensor w = at::empty({g.M, g.K}, values.options());
    bool expanded = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_expand_cuda", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        expanded = launch_packed_expand<scalar_t>(g, values, meta, subsets, block_off, elem_off, w,
                                                  status_ptr(workspace_status()), stream);
      }
    });
    if (expanded) return workspace_linear(w);
  }

  decode::GemvPlan plan;
  if (decode::plan_decode(g, N, values, &plan)) {
    at::Tensor y = at::empty({N, g.M}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_gemv_cuda", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        decode::launch_decode<scalar_t>(plan, values, meta, subsets, block_off, elem_off, x2, bias, y, st, stream);
      }
    });
    if (check) raise_on_bad_data(status, g, op);  // (without: the kernel wrote NaN)
    return shaped_like_x(y);
  }

  // Large batches (and fp64, no row_group promise, very large W): W expanded
  // into a workspace, then one cuBLAS GEMM (fp32 accumulation).
  at::Tensor w = at::zeros({g.M, g.K}, values.options());
  launch_scatter(g, values, meta, subsets, block_off, elem_off, w, workspace_status(), stream);
  return workspace_linear(w);
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) {
  m.impl("packed_to_dense", &packed_to_dense_cuda);
  m.impl("packed_linear", &packed_linear_cuda);
}

}  // namespace s3sparse
