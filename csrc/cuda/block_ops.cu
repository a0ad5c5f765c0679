// CUDA kernels of block_reduce and block_scale_: strided block reductions and
// in-place block scaling over a view (size, stride, offset) of a contiguous x,
// never materialised. Same validation and semantics as csrc/cpu/block_ops.cpp.
//
// block_reduce: a group of G threads per block of the view (G = 1 for small
// blocks, a warp or a whole thread block for large ones); lanes stride over the
// block's elements and combine their partial results (sums are therefore added
// in a different order than on the CPU: equal up to rounding). NaN propagates
// through min / max / inf-norm exactly as on the CPU.
// block_scale_: one thread per view element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common.h"
#include "cuda/launch.cuh"

namespace s3sparse {
namespace {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of a grid-stride launch: enough to fill the GPU, never above the limit.
inline unsigned grid_for(int64_t work_items, int64_t per_block) {
  const int64_t blocks = std::max<int64_t>(1, ceil_div(work_items, per_block));
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t(1) << 20));
}

template <typename acc_t>
struct ReduceOp {
  BlockReduce kind;
  bool p_inf;
  int p_mode;  // 2: p == 2, 1: p == 1, 0: general p
  acc_t p;

  __device__ __forceinline__ acc_t init() const {
    switch (kind) {
      case BlockReduce::Min: return acc_t(INFINITY);
      case BlockReduce::Max: return acc_t(-INFINITY);
      default: return acc_t(0);
    }
  }
  // Fold one element into the accumulator (the CPU kernel's rule, verbatim).
  __device__ __forceinline__ acc_t add(acc_t acc, acc_t val) const {
    switch (kind) {
      case BlockReduce::Sum: return acc + val;
      case BlockReduce::Min: return (val < acc || isnan(val)) ? val : acc;
      case BlockReduce::Max: return (val > acc || isnan(val)) ? val : acc;
      default: {
        const acc_t a = fabs(val);
        if (p_inf) return (a > acc || isnan(a)) ? a : acc;
        if (p_mode == 2) return acc + val * val;
        if (p_mode == 1) return acc + a;
        return acc + pow(a, p);
      }
    }
  }
  // Merge two partial accumulators (NaN wins for min / max / inf-norm).
  __device__ __forceinline__ acc_t merge(acc_t a, acc_t b) const {
    switch (kind) {
      case BlockReduce::Min: return isnan(a) ? a : ((b < a || isnan(b)) ? b : a);
      case BlockReduce::Max: return isnan(a) ? a : ((b > a || isnan(b)) ? b : a);
      case BlockReduce::Norm:
        if (p_inf) return isnan(a) ? a : ((b > a || isnan(b)) ? b : a);
        return a + b;
      default: return a + b;
    }
  }
  __device__ __forceinline__ acc_t finish(acc_t acc) const {
    if (kind == BlockReduce::Norm && !p_inf) {
      if (p_mode == 2) return sqrt(acc);
      if (p_mode == 0) return pow(acc, acc_t(1) / p);
    }
    return acc;
  }
};

// G threads reduce one block of the view: G == 1 (thread per block), 32 (warp
// per block) or the whole thread block (G == blockDim.x, shared-memory merge).
template <typename scalar_t, typename acc_t, int G>
__global__ void block_reduce_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                    StridedBlocks v, ReduceOp<acc_t> op) {
  const int lane = static_cast<int>(threadIdx.x) % G;
  const int64_t groups_per_block = blockDim.x / G;
  const int64_t group0 = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / G;
  const int64_t group_stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  // Every thread runs the same number of outer iterations when G == blockDim.x
  // (one group per thread block), so the __syncthreads below are uniform.
  for (int64_t b = group0; b < v.num_blocks; b += group_stride) {
    acc_t acc = op.init();
    for (int64_t e = lane; e < v.block_numel; e += G) {
      acc = op.add(acc, static_cast<acc_t>(x[v.element_offset(b, e)]));
    }
    if constexpr (G == 32) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc = op.merge(acc, __shfl_down_sync(0xffffffffu, acc, o));
    } else if constexpr (G > 32) {
      __shared__ acc_t partial[G];
      partial[threadIdx.x] = acc;
      __syncthreads();
      for (int o = G / 2; o > 0; o >>= 1) {
        if (lane < o) partial[lane] = op.merge(partial[lane], partial[lane + o]);
        __syncthreads();
      }
      acc = partial[0];
      __syncthreads();  // partial is reused by the next block of the view
    }
    if (lane == 0) out[b] = static_cast<scalar_t>(op.finish(acc));
  }
}

at::Tensor block_reduce_cuda(const at::Tensor& x, at::IntArrayRef size, at::IntArrayRef stride,
                             int64_t offset, at::IntArrayRef block, c10::string_view reduce,
                             double p) {
  constexpr const char* op_name = "s3sparse.block_reduce";
  const StridedBlocks v = make_strided_blocks(x, size, stride, offset, block, op_name);
  const BlockReduce kind = parse_block_reduce(reduce, p, op_name);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(v.grid_shape(), x.options());
  if (v.num_blocks == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ReduceOp<acc_t> rop;
    rop.kind = kind;
    rop.p_inf = std::isinf(p);
    rop.p_mode = p == 2.0 ? 2 : (p == 1.0 ? 1 : 0);
    rop.p = static_cast<acc_t>(p);
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    if (v.block_numel <= 16) {
      S3_LAUNCH(grid_for(v.num_blocks, kThreads), kThreads, 0, stream,
                block_reduce_kernel<scalar_t, acc_t, 1>)(src, dst, v, rop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (v.block_numel <= 4096) {
      S3_LAUNCH(grid_for(v.num_blocks, kThreads / 32), kThreads, 0, stream,
                block_reduce_kernel<scalar_t, acc_t, 32>)(src, dst, v, rop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      S3_LAUNCH(grid_for(v.num_blocks, 1), kThreads, 0, stream,
                block_reduce_kernel<scalar_t, acc_t, kThreads>)(src, dst, v, rop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// One thread per view element; a zero factor writes an exact zero, a factor of
// one leaves the element alone (as on the CPU: no rounding through acc_t).
template <typename scalar_t, typename acc_t>
__global__ void block_scale_kernel(scalar_t* __restrict__ x, const acc_t* __restrict__ factors,
                                   StridedBlocks v) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < v.numel; i += step) {
    int64_t b;
    const int64_t o = v.view_offset(i, &b);
    const acc_t f = factors[b];
    if (f == acc_t(1)) continue;
    x[o] = f == acc_t(0) ? scalar_t(0) : static_cast<scalar_t>(static_cast<acc_t>(x[o]) * f);
  }
}

void block_scale_cuda(at::Tensor& x, at::IntArrayRef size, at::IntArrayRef stride, int64_t offset,
                      at::IntArrayRef block, const at::Tensor& scale) {
  constexpr const char* op_name = "s3sparse.block_scale_";
  const StridedBlocks v = make_strided_blocks(x, size, stride, offset, block, op_name);
  check_block_scale(x, v, scale, op_name);
  if (v.num_blocks == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_scale_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // On x's device, in the stream order of the kernel below.
    const at::Tensor s = scale.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    S3_LAUNCH(grid_for(v.numel, kThreads), kThreads, 0, stream, block_scale_kernel<scalar_t, acc_t>)(
        x.mutable_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), v);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CUDA, m) {
  m.impl("block_reduce", &block_reduce_cuda);
  m.impl("block_scale_", &block_scale_cuda);
}

}  // namespace s3sparse
