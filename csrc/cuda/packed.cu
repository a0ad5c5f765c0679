// CUDA kernels of packed_to_dense and packed_linear (format: csrc/packed.h,
// semantics: csrc/cpu/packed.cpp and s3sparse/reference.py).
//
// Three kernels:
//   scatter  one thread per (scope, kept block): writes the kept blocks into a
//            zero W (packed_to_dense, and the large-batch path of packed_linear,
//            which then calls cuBLAS on that workspace).
//   gemv     the decode path of packed_linear (1..kMaxTokens tokens, a row_group
//            promise): one thread block per row group (or a share of one),
//            streaming the group's kept values once with 16-byte loads,
//            decoding meta in registers, accumulating a token's dot product in
//            fp32 registers while consecutive elements stay in one row and
//            flushing it into the group's rows in shared memory; W is never
//            materialised. Split groups add their share into an fp32 workspace
//            that `finalize` turns into y.
//   finalize y = (fp32 workspace + bias) in the output dtype.
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cuda/launch.cuh"
#include "packed.h"

namespace s3sparse {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTokens = 16;  // the gemv path: up to this many tokens (rows of x)
constexpr int kUnroll = 4;      // 16-byte loads in flight per thread
constexpr int64_t kInt32Safe = int64_t(1) << 30;
constexpr int kRowClamp = 1 << 29;  // decomposed row offsets are clamped to +-this (always out of range)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

C10_HOST_DEVICE inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// n / d and n % d for n < 2^31 by a multiply-high and a shift (Granlund and
// Montgomery): the decode path divides value indices and scope indices by
// runtime constants on every element.
struct FastDivmod {
  uint32_t d = 1, mul = 1, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t divisor) : d(divisor) {
    while ((uint64_t(1) << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  C10_HOST_DEVICE inline uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(n) * mul) >> 32);
#endif
    return (hi + n) >> shift;
  }
};

// Everything the gemv kernel needs besides pointers (passed by value).
struct GemvPlan {
  PackedGeometry g;
  FastDivmod div_scope_shape[kMaxPackedScopeDims];
  FastDivmod div_P, div_B, div_K, div_per_word;
  int32_t P = 0;                 // values per scope: nnz * B
  int32_t N = 0;                 // tokens
  int32_t R = 0;                 // rows per group
  int64_t scopes_per_group = 0;
  int64_t chunks_per_group = 0;  // VEC-value chunks of one group's values
  int64_t chunks_per_split = 0;
  bool base_fast = false;        // every scope base in [0, 2^30): 32-bit divmod by K
  bool split = false;            // groups split over several blocks (fp32 workspace)
  // Shared-memory layout (bytes): ys (R * kMaxTokens floats), then int32 tables.
  int32_t smem_boff = 0, smem_eoff = 0, smem_sub = 0, smem_total = 0;
};

template <typename T>
C10_HOST_DEVICE inline float to_float(T v) {
  return static_cast<float>(v);
}

__device__ __forceinline__ int32_t load_meta(const int32_t* meta, uint32_t word) {
#if defined(__CUDA_ARCH__)
  return __ldg(meta + word);
#else
  return meta[word];
#endif
}

template <typename T>
__device__ __forceinline__ T load_x(const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __ldg(p);
  } else {
    return *p;  // 2-byte types: through L1 as well (read-only, restrict)
  }
#else
  return *p;
#endif
}

// (row, col) of a flat offset, col in [0, K), row clamped to +-kRowClamp.
__device__ __forceinline__ void split_offset(int64_t off, int64_t K, int32_t* row, int32_t* col) {
  const int64_t r = floor_div(off, K);
  *col = static_cast<int32_t>(off - r * K);
  *row = static_cast<int32_t>(std::max<int64_t>(-kRowClamp, std::min<int64_t>(kRowClamp, r)));
}

// ------------------------------------------------------------------ gemv (decode)
template <typename T, int VEC, int NT>
__global__ void __launch_bounds__(kThreads)
packed_gemv_kernel(const GemvPlan p, const T* __restrict__ values, const int32_t* __restrict__ meta,
                   const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                   const int64_t* __restrict__ elem_off, const T* __restrict__ x, const T* __restrict__ bias,
                   T* __restrict__ y, float* __restrict__ y32, int* __restrict__ status) {
  S3_DYNAMIC_SHARED(unsigned char, smem);
  __shared__ int block_bad;
  const PackedGeometry& g = p.g;
  float* ys = reinterpret_cast<float*>(smem);
  int32_t* boff = reinterpret_cast<int32_t*>(smem + p.smem_boff);  // (G, 2): row, col
  int32_t* eoff = reinterpret_cast<int32_t*>(smem + p.smem_eoff);  // (B, 2): row, col
  int32_t* sub = reinterpret_cast<int32_t*>(smem + p.smem_sub);    // (n_codes, nnz)
  const int tid = static_cast<int>(threadIdx.x);
  const int T_ = static_cast<int>(blockDim.x);
  const int32_t K = static_cast<int32_t>(g.K);
  const int32_t M = static_cast<int32_t>(g.M);
  const int32_t R = p.R;
  const int32_t N = p.N;
  const int32_t B = static_cast<int32_t>(g.B);
  const int32_t nnz = static_cast<int32_t>(g.nnz);
  const int32_t G = static_cast<int32_t>(g.G);
  int bad = 0;

  if (tid == 0) block_bad = 0;
  for (int i = tid; i < R * NT; i += T_) ys[i] = 0.f;
  for (int i = tid; i < G; i += T_) split_offset(block_off[i], g.K, &boff[2 * i], &boff[2 * i + 1]);
  for (int i = tid; i < B; i += T_) split_offset(elem_off[i], g.K, &eoff[2 * i], &eoff[2 * i + 1]);
  if (subsets != nullptr) {
    for (int64_t i = tid; i < g.n_codes * nnz; i += T_) {
      const int32_t k = subsets[i];
      const bool ok = k >= 0 && k < G;
      if (!ok) bad |= kPackedBadIndex;
      sub[i] = ok ? k : -1;
    }
  }
  __syncthreads();

  const int64_t q = blockIdx.x;
  const int32_t row0 = static_cast<int32_t>(q * R);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.chunks_per_split;
  const int64_t c1 = std::min(p.chunks_per_group, c0 + p.chunks_per_split);
  const uint32_t vbase = static_cast<uint32_t>(q * p.scopes_per_group * p.P);

  float acc[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n] = 0.f;
  int32_t cur = -1;  // the group-local row acc belongs to

  auto flush = [&]() {
    if (cur >= 0) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (NT == 1 || n < N) atomicAdd(&ys[cur * NT + n], acc[n]);
        acc[n] = 0.f;
      }
    }
  };

  // Decoding state of the current scope and block.
  const int32_t* kept = nullptr;  // the kept set (codes), else null
  bool scope_ok = false, block_ok = false;
  int32_t base_r = 0, base_c = 0, org_r = 0, org_c = 0;
  uint32_t s = 0;

  auto enter_scope = [&]() {
    scope_ok = true;
    if (subsets != nullptr) {
      const uint32_t word = p.div_per_word.div(s);
      const uint32_t slot = s - word * static_cast<uint32_t>(g.per_word);
      const uint32_t mask = g.meta_bits >= 32 ? 0xFFFFFFFFu : ((1u << g.meta_bits) - 1u);
      const uint32_t code = (static_cast<uint32_t>(load_meta(meta, word)) >> (slot * g.meta_bits)) & mask;
      if (code >= static_cast<uint64_t>(g.n_codes)) {
        bad |= kPackedBadCode;
        scope_ok = false;
        return;
      }
      kept = sub + static_cast<int64_t>(code) * nnz;
    }
    if (p.base_fast) {
      uint32_t t = s, base = 0;
      for (int d = g.ndim - 1; d >= 0; --d) {
        const uint32_t t2 = p.div_scope_shape[d].div(t);
        base += (t - t2 * static_cast<uint32_t>(g.scope_shape[d])) * static_cast<uint32_t>(g.scope_stride[d]);
        t = t2;
      }
      const uint32_t r = p.div_K.div(base);
      base_r = static_cast<int32_t>(r);
      base_c = static_cast<int32_t>(base - r * static_cast<uint32_t>(K));
    } else {
      split_offset(g.scope_base(s), g.K, &base_r, &base_c);
    }
  };
  auto enter_block = [&](int32_t j) {
    block_ok = false;
    if (!scope_ok) return;
    int32_t k;
    if (subsets != nullptr) {
      k = kept[j];
      if (k < 0) return;  // a bad subsets entry (counted above)
    } else {
      const uint32_t field = s * static_cast<uint32_t>(nnz) + static_cast<uint32_t>(j);
      const uint32_t word = p.div_per_word.div(field);
      const uint32_t slot = field - word * static_cast<uint32_t>(g.per_word);
      const uint32_t mask = g.meta_bits >= 32 ? 0xFFFFFFFFu : ((1u << g.meta_bits) - 1u);
      const uint32_t idx = (static_cast<uint32_t>(load_meta(meta, word)) >> (slot * g.meta_bits)) & mask;
      if (idx >= static_cast<uint32_t>(G)) {
        bad |= kPackedBadIndex;
        return;
      }
      k = static_cast<int32_t>(idx);
    }
    org_r = base_r + boff[2 * k];
    org_c = base_c + boff[2 * k + 1];
    if (org_c >= K) {
      org_c -= K;
      ++org_r;
    }
    block_ok = true;
  };

  // One chunk of VEC consecutive values, starting at value index i0.
  auto process = [&](const T* vals, uint32_t i0) {
    s = p.div_P.div(i0);
    const uint32_t r = i0 - s * static_cast<uint32_t>(p.P);
    int32_t j = static_cast<int32_t>(p.div_B.div(r));
    int32_t e = static_cast<int32_t>(r) - j * B;
    enter_scope();
    enter_block(j);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (v > 0 && e == 0) {
        if (j == 0) enter_scope();
        enter_block(j);
      }
      if (block_ok) {
        int32_t row = org_r + eoff[2 * e];
        int32_t col = org_c + eoff[2 * e + 1];
        if (col >= K) {
          col -= K;
          ++row;
        }
        const int32_t lr = row - row0;
        if (static_cast<uint32_t>(lr) >= static_cast<uint32_t>(R)) {
          bad |= (row < 0 || row >= M) ? kPackedBadOffset : kPackedBadGroup;
        } else {
          if (lr != cur) {
            flush();
            cur = lr;
          }
          const float w = to_float(vals[v]);
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            if (NT == 1 || n < N) acc[n] += w * to_float(load_x(x + static_cast<int64_t>(n) * K + col));
          }
        }
      }
      if (++e == B) {
        e = 0;
        if (++j == nnz) {
          j = 0;
          ++s;
        }
      }
    }
  };

  for (int64_t c = c0 + tid; c < c1; c += static_cast<int64_t>(T_) * kUnroll) {
    T vals[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t cu = c + static_cast<int64_t>(u) * T_;
      if (cu < c1) {
        const T* src = values + vbase + static_cast<uint32_t>(cu) * VEC;
        if constexpr (VEC * sizeof(T) == 16) {
          const uint4 raw = *reinterpret_cast<const uint4*>(src);
          std::memcpy(vals[u], &raw, 16);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) vals[u][v] = src[v];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t cu = c + static_cast<int64_t>(u) * T_;
      if (cu < c1) process(vals[u], vbase + static_cast<uint32_t>(cu) * VEC);
    }
  }
  flush();
  if (bad) atomicOr(&block_bad, bad);
  __syncthreads();

  const int any_bad = block_bad;
  if (any_bad && tid == 0 && status != nullptr) atomicOr(status, any_bad);
  for (int i = tid; i < R * N; i += T_) {
    const int32_t lr = i / N, n = i - lr * N;
    const int64_t out = static_cast<int64_t>(n) * M + row0 + lr;
    const float v = any_bad ? NAN : ys[lr * NT + n];
    if (p.split) {
      atomicAdd(&y32[out], v);
    } else {
      y[out] = static_cast<T>(bias != nullptr ? v + to_float(bias[row0 + lr]) : v);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
packed_finalize_kernel(const float* __restrict__ y32, const T* __restrict__ bias, T* __restrict__ y, int64_t M,
                       int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = y32[i];
    y[i] = static_cast<T>(bias != nullptr ? v + to_float(bias[i % M]) : v);
  }
}

// ------------------------------------------------------------------ scatter
// One thread per (scope, kept block j), grid-stride. `row_group` > 0 also checks
// that every element lies in its scope's row group (packed_linear's promise).
template <typename T>
__global__ void __launch_bounds__(kThreads)
packed_scatter_kernel(const PackedGeometry g, const T* __restrict__ values, const int32_t* __restrict__ meta,
                      const int32_t* __restrict__ subsets, const int64_t* __restrict__ block_off,
                      const int64_t* __restrict__ elem_off, T* __restrict__ w, int* __restrict__ status) {
  const int64_t total = g.S * g.nnz;
  const int64_t w_end = g.M * g.K;
  const int64_t spg = g.row_group > 0 ? g.S * g.row_group / g.M : 0;
  int bad = 0;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = t / g.nnz, j = t - s * g.nnz;
    int64_t k;
    if (subsets != nullptr) {
      const uint32_t code = packed_field(meta, s, g.meta_bits, g.per_word);
      if (code >= static_cast<uint64_t>(g.n_codes)) {
        bad |= kPackedBadCode;
        continue;
      }
      k = subsets[static_cast<int64_t>(code) * g.nnz + j];
      if (k < 0) {
        bad |= kPackedBadIndex;
        continue;
      }
    } else {
      k = packed_field(meta, t, g.meta_bits, g.per_word);
    }
    if (k >= g.G) {
      bad |= kPackedBadIndex;
      continue;
    }
    const int64_t origin = g.scope_base(s) + block_off[k];
    const int64_t row_lo = spg > 0 ? s / spg * g.row_group : 0;
    const int64_t row_hi = spg > 0 ? row_lo + g.row_group : g.M;
    const T* src = values + t * g.B;
    for (int64_t e = 0; e < g.B; ++e) {
      const int64_t f = origin + elem_off[e];
      if (f < 0 || f >= w_end) {
        bad |= kPackedBadOffset;
        continue;
      }
      if (spg > 0) {
        const int64_t row = f / g.K;
        if (row < row_lo || row >= row_hi) {
          bad |= kPackedBadGroup;
          continue;
        }
      }
      w[f] = src[e];
    }
  }
  if (bad) atomicOr(status, bad);
}

// ------------------------------------------------------------------ host side
bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
  return st != cudaStreamCaptureStatusNone;
}

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
  const int64_t total = g.S * g.nnz;
  if (total == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), int64_t(1) << 16));
  const int32_t* sub = subsets.has_value() ? subsets->const_data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_scatter_cuda", [&] {
    S3_LAUNCH(blocks, kThreads, 0, stream, packed_scatter_kernel<scalar_t>)(
        g, values.const_data_ptr<scalar_t>(), meta.const_data_ptr<int32_t>(), sub, block_off.const_data_ptr<int64_t>(),
        elem_off.const_data_ptr<int64_t>(), w.mutable_data_ptr<scalar_t>(), status_ptr(status));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// The gemv plan, or false when the decode path does not apply.
bool plan_gemv(const PackedGeometry& g, int64_t N, const at::Tensor& values, GemvPlan* out) {
  if (g.row_group <= 0 || N < 1 || N > kMaxTokens || g.M == 0 || g.K == 0) return false;
  if (values.scalar_type() == at::kDouble) return false;
  if (g.M * g.K >= kInt32Safe || g.S * g.nnz * g.B >= kInt32Safe || g.S >= kInt32Safe) return false;
  if (g.G >= kInt32Safe || g.n_codes * g.nnz >= kInt32Safe) return false;
  GemvPlan p;
  p.g = g;
  p.N = static_cast<int32_t>(N);
  p.R = static_cast<int32_t>(g.row_group);
  p.P = static_cast<int32_t>(g.nnz * g.B);
  if (p.P == 0) return false;
  p.div_P = FastDivmod(static_cast<uint32_t>(p.P));
  p.div_B = FastDivmod(static_cast<uint32_t>(g.B));
  p.div_K = FastDivmod(static_cast<uint32_t>(g.K));
  p.div_per_word = FastDivmod(static_cast<uint32_t>(g.per_word));
  int64_t lo = 0, hi = 0;
  g.scope_base_range(&lo, &hi);
  p.base_fast = lo >= 0 && hi < kInt32Safe;
  for (int d = 0; d < g.ndim; ++d) {
    if (g.scope_shape[d] <= 0) return false;
    p.div_scope_shape[d] = FastDivmod(static_cast<uint32_t>(g.scope_shape[d]));
    if (g.scope_stride[d] < 0) p.base_fast = false;
  }
  const int64_t groups = g.M / g.row_group;
  p.scopes_per_group = g.S / groups;
  // Shared memory: ys, then the (row, col) tables of block_off and elem_off, then subsets.
  const int64_t ys_bytes = int64_t(g.row_group) * kMaxTokens * 4;
  const int64_t boff = ys_bytes, eoff = boff + 8 * g.G, sub = eoff + 8 * g.B;
  const int64_t total = sub + 4 * g.n_codes * g.nnz;
  if (total > 48 * 1024) return false;
  p.smem_boff = static_cast<int32_t>(boff);
  p.smem_eoff = static_cast<int32_t>(eoff);
  p.smem_sub = static_cast<int32_t>(sub);
  p.smem_total = static_cast<int32_t>(total);
  *out = p;
  return true;
}

template <typename T, int VEC, int NT>
void launch_gemv_nt(GemvPlan p, const at::Tensor& values, const at::Tensor& meta,
                    const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                    const at::Tensor& elem_off, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                    at::Tensor& y, int* status, cudaStream_t stream) {
  const int64_t groups = p.g.M / p.g.row_group;
  const int64_t values_per_group = p.scopes_per_group * p.P;
  p.chunks_per_group = values_per_group / VEC;
  // Split groups over blocks when there are too few to fill the GPU (about 4
  // blocks per SM), never below 2048 values a block.
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t want_blocks = 4 * std::max(sms, 1);
  int64_t splits = 1;
  if (groups < want_blocks) {
    splits = std::min(ceil_div(want_blocks, groups), std::max<int64_t>(1, values_per_group / 2048));
  }
  splits = std::min<int64_t>(splits, 65535);
  p.chunks_per_split = std::max<int64_t>(1, ceil_div(p.chunks_per_group, splits));
  splits = std::max<int64_t>(1, ceil_div(p.chunks_per_group, p.chunks_per_split));
  p.split = splits > 1;
  at::Tensor y32;
  if (p.split) y32 = at::zeros({p.N, p.g.M}, x2.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(splits));
  S3_LAUNCH(grid, kThreads, p.smem_total, stream, packed_gemv_kernel<T, VEC, NT>)(
      p, values.const_data_ptr<T>(), meta.const_data_ptr<int32_t>(),
      subsets.has_value() ? subsets->const_data_ptr<int32_t>() : nullptr, block_off.const_data_ptr<int64_t>(),
      elem_off.const_data_ptr<int64_t>(), x2.const_data_ptr<T>(),
      bias.has_value() ? bias->const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(),
      p.split ? y32.mutable_data_ptr<float>() : nullptr, status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.split) {
    const int64_t total = p.N * p.g.M;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), 4096));
    S3_LAUNCH(blocks, kThreads, 0, stream, packed_finalize_kernel<T>)(
        y32.const_data_ptr<float>(), bias.has_value() ? bias->const_data_ptr<T>() : nullptr,
        y.mutable_data_ptr<T>(), p.g.M, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int VEC>
void launch_gemv_vec(const GemvPlan& p, const at::Tensor& values, const at::Tensor& meta,
                     const std::optional<at::Tensor>& subsets, const at::Tensor& block_off, const at::Tensor& elem_off,
                     const at::Tensor& x2, const std::optional<at::Tensor>& bias, at::Tensor& y, int* status,
                     cudaStream_t stream) {
  if (p.N == 1) {
    launch_gemv_nt<T, VEC, 1>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else if (p.N == 2) {
    launch_gemv_nt<T, VEC, 2>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else if (p.N <= 4) {
    launch_gemv_nt<T, VEC, 4>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else if (p.N <= 8) {
    launch_gemv_nt<T, VEC, 8>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else {
    launch_gemv_nt<T, VEC, 16>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  }
}

template <typename T>
void launch_gemv(const GemvPlan& p, const at::Tensor& values, const at::Tensor& meta,
                 const std::optional<at::Tensor>& subsets, const at::Tensor& block_off, const at::Tensor& elem_off,
                 const at::Tensor& x2, const std::optional<at::Tensor>& bias, at::Tensor& y, int* status,
                 cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // 16-byte loads when every group's values start 16-byte aligned and are whole chunks.
  const bool vec = reinterpret_cast<uintptr_t>(values.const_data_ptr<T>()) % 16 == 0 &&
                   (p.scopes_per_group * p.P) % kVec == 0;
  if (vec) {
    launch_gemv_vec<T, kVec>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  } else {
    launch_gemv_vec<T, 1>(p, values, meta, subsets, block_off, elem_off, x2, bias, y, status, stream);
  }
}

at::Tensor packed_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                              const std::optional<at::Tensor>& subsets, const at::Tensor& block_off,
                              const at::Tensor& elem_off, at::IntArrayRef scope_shape, at::IntArrayRef scope_stride,
                              int64_t meta_bits, int64_t out_features, int64_t row_group,
                              const std::optional<at::Tensor>& bias, bool checked) {
  constexpr const char* op = "s3sparse.packed_linear";
  const PackedGeometry g = check_packed_linear(x, values, meta, subsets, block_off, elem_off, scope_shape,
                                               scope_stride, meta_bits, out_features, row_group, bias, op);
  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Host-side checks (one sync) unless the caller checked these tables before,
  // or a graph is being captured.
  const bool check = !checked && !stream_capturing(stream);
  if (check) check_subsets_on_host(g, subsets, op);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(g.M);
  const int64_t N = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  if (N == 0 || g.M == 0) return at::empty(out_sizes, x.options());
  const bool no_terms = g.S == 0 || g.nnz == 0 || g.B == 0 || g.K == 0;
  if (no_terms) {
    at::Tensor y = bias.has_value() ? bias->expand({N, g.M}).contiguous() : at::zeros({N, g.M}, x.options());
    return y.view(out_sizes);
  }
  at::Tensor status = check ? at::zeros({}, values.options().dtype(at::kInt)) : at::Tensor();
  int* st = check ? status_ptr(status) : nullptr;
  const at::Tensor x2 = x.reshape({N, g.K}).contiguous();

  GemvPlan plan;
  if (plan_gemv(g, N, values, &plan)) {
    at::Tensor y = at::empty({N, g.M}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "packed_gemv_cuda", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        launch_gemv<scalar_t>(plan, values, meta, subsets, block_off, elem_off, x2, bias, y, st, stream);
      }
    });
    if (check) raise_on_bad_data(status, g, op);  // (without: the kernel wrote NaN)
    return y.view(out_sizes);
  }

  // Large batches (and fp64, no row_group promise, very large W): W expanded
  // into a workspace, then one cuBLAS GEMM (fp32 accumulation).
  at::Tensor w = at::zeros({g.M, g.K}, values.options());
  at::Tensor scatter_status = check ? status : at::zeros({}, values.options().dtype(at::kInt));
  launch_scatter(g, values, meta, subsets, block_off, elem_off, w, scatter_status, stream);
  if (check) raise_on_bad_data(status, g, op);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  if (!check) poison_on_bad_data(scatter_status, y);
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) {
  m.impl("packed_to_dense", &packed_to_dense_cuda);
  m.impl("packed_linear", &packed_linear_cuda);
}

}  // namespace s3sparse
