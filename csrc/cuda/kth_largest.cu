// CUDA kernel of kth_largest, with the CPU kernel's exact results: along the
// last dim, the k-th largest value and a mask of exactly the k largest entries,
// ties going to the lower index, NaN ranking as -inf (and the value reported
// for a NaN being -inf), -0.0 and +0.0 being equal values.
//
// Two paths, both exact:
//  * short rows (n <= kRankMaxN): one thread per element computes its rank in
//    the total order (value descending, index ascending) by comparing with the
//    whole row; rank < k keeps it, rank == k-1 writes the value.
//  * long rows: one thread block per row. A radix select (8-bit digits, most
//    significant first) on order-preserving unsigned keys finds the key T of the
//    k-th largest and how many entries equal to T are kept; a final pass in
//    index order keeps every key > T and the lowest-index entries equal to T
//    (a block-wide prefix count of the equal ones).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common.h"
#include "cuda/launch.cuh"

namespace s3sparse {
namespace {

constexpr int64_t kRankMaxN = 128;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The value an entry is ranked by: NaN -> -inf, everything else unchanged.
// fp16/bf16/fp32 compare in fp32 (exact), fp64 in fp64.
template <typename val_t, typename scalar_t>
__device__ __forceinline__ val_t rank_value(scalar_t x) {
  const val_t v = static_cast<val_t>(x);
  return isnan(v) ? val_t(-INFINITY) : v;
}

// Order-preserving unsigned key of a ranked value; -0.0 maps to +0.0's key so
// that both zeros tie, as they compare equal on the CPU.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v == 0.0f) v = 0.0f;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t order_key(double v) {
  if (v == 0.0) v = 0.0;
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// ------------------------------------------------------------------ short rows
template <typename scalar_t, typename val_t>
__global__ void kth_rank_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ values,
                                bool* __restrict__ keep, int64_t rows, int64_t n, int64_t k) {
  const int64_t total = rows * n;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += step) {
    const int64_t r = t / n, i = t - r * n;
    const scalar_t* row = x + r * n;
    const val_t vi = rank_value<val_t>(row[i]);
    int64_t rank = 0;
    for (int64_t j = 0; j < n; ++j) {
      const val_t vj = rank_value<val_t>(row[j]);
      rank += (vj > vi || (vj == vi && j < i)) ? 1 : 0;
    }
    keep[t] = rank < k;
    if (rank == k - 1) values[r] = static_cast<scalar_t>(vi);
  }
}

// ------------------------------------------------------------------ long rows
template <int kBlock, typename scalar_t, typename val_t, typename key_t>
__global__ void __launch_bounds__(kBlock)
kth_radix_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ values,
                 bool* __restrict__ keep, int64_t rows, int64_t n, int64_t k) {
  constexpr int kKeyBits = 8 * static_cast<int>(sizeof(key_t));
  constexpr int kWarps = kBlock / 32;
  __shared__ unsigned long long hist[256];
  __shared__ int64_t warp_count[kWarps];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* row = x + r * n;
    // Every thread tracks the same prefix / remaining count (computed from the
    // same shared histogram), so all control flow below is block-uniform.
    key_t prefix = 0, mask = 0;
    int64_t remaining = k;  // how many of the entries matching `prefix` are kept
    for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
      for (int d = tid; d < 256; d += kBlock) hist[d] = 0;
      __syncthreads();
      for (int64_t i = tid; i < n; i += kBlock) {
        const key_t key = order_key(rank_value<val_t>(row[i]));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xff], 1ull);
      }
      __syncthreads();
      // Walk the digits from the largest down until `remaining` are covered.
      int64_t above = 0;
      int digit = 0;
      for (int d = 255; d >= 0; --d) {
        const int64_t c = static_cast<int64_t>(hist[d]);
        if (above + c >= remaining) {
          digit = d;
          break;
        }
        above += c;
      }
      remaining -= above;
      prefix |= static_cast<key_t>(digit) << shift;
      mask |= static_cast<key_t>(0xff) << shift;
      __syncthreads();  // hist is cleared again by the next digit / row
    }
    // prefix == key of the k-th largest; keep every larger key and the first
    // `remaining` (>= 1) entries equal to it, in index order.
    const key_t kth = prefix;
    int64_t seen = 0;  // entries equal to kth in earlier chunks
    for (int64_t base = 0; base < n; base += kBlock) {
      const int64_t i = base + tid;
      bool eq = false, gt = false;
      val_t v = 0;
      if (i < n) {
        v = rank_value<val_t>(row[i]);
        const key_t key = order_key(v);
        eq = key == kth;
        gt = key > kth;
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, eq);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();
      int64_t before = 0, chunk = 0;
      for (int w = 0; w < kWarps; ++w) {
        if (w < warp) before += warp_count[w];
        chunk += warp_count[w];
      }
      const int64_t ord = seen + before + __popc(ballot & ((1u << lane) - 1u));
      if (i < n) {
        keep[r * n + i] = gt || (eq && ord < remaining);
        if (eq && ord == remaining - 1) values[r] = static_cast<scalar_t>(v);
      }
      seen += chunk;
      __syncthreads();  // warp_count is rewritten by the next chunk
    }
  }
}

template <int kBlock, typename scalar_t, typename val_t, typename key_t>
void launch_radix(const scalar_t* x, scalar_t* values, bool* keep, int64_t rows, int64_t n, int64_t k,
                  cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, int64_t(1) << 20));
  S3_LAUNCH(grid, kBlock, 0, stream, kth_radix_kernel<kBlock, scalar_t, val_t, key_t>)(x, values, keep, rows, n, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> kth_largest_cuda(const at::Tensor& x_in, int64_t k) {
  check_kth_largest(x_in, k, "s3sparse.kth_largest");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1);
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  at::Tensor values = at::empty(x.sizes().slice(0, x.dim() - 1), x.options());
  at::Tensor keep = at::zeros(x.sizes(), x.options().dtype(at::kBool));
  if (rows == 0) return {values, keep};
  if (k == 0) {
    values.fill_(std::numeric_limits<double>::infinity());
    return {values, keep};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kth_largest_cuda", [&] {
    using val_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using key_t = std::conditional_t<std::is_same_v<scalar_t, double>, uint64_t, uint32_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* vout = values.mutable_data_ptr<scalar_t>();
    bool* kout = keep.mutable_data_ptr<bool>();
    if (n <= kRankMaxN) {
      constexpr int threads = 256;
      const int64_t blocks = std::min<int64_t>(ceil_div(rows * n, threads), int64_t(1) << 20);
      S3_LAUNCH(static_cast<unsigned>(blocks), threads, 0, stream, kth_rank_kernel<scalar_t, val_t>)(
          src, vout, kout, rows, n, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (n <= 16384) {
      launch_radix<256, scalar_t, val_t, key_t>(src, vout, kout, rows, n, k, stream);
    } else {
      launch_radix<1024, scalar_t, val_t, key_t>(src, vout, kout, rows, n, k, stream);
    }
  });
  return {values, keep};
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) { m.impl("kth_largest", &kth_largest_cuda); }

}  // namespace s3sparse
