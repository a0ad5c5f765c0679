// CPU kernels of block_reduce and block_scale_: strided block reductions and
// in-place block scaling, walking the view in place (never materialised).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common.h"

namespace s3sparse {
namespace {

// Calls f(storage_offset) for every element of block b, in block row-major order.
template <typename F>
inline void for_each_block_element(const StridedBlocks& v, int64_t b, F&& f) {
  int64_t base = v.offset;
  for (int d = v.ndim - 1; d >= 0; --d) {
    base += (b % v.grid[d]) * v.block[d] * v.stride[d];
    b /= v.grid[d];
  }
  int64_t idx[kMaxViewDims] = {};
  int64_t off = base;
  for (int64_t e = 0; e < v.block_numel; ++e) {
    f(off);
    // Odometer step over the block's dims, innermost first.
    for (int d = v.ndim - 1; d >= 0; --d) {
      if (++idx[d] < v.block[d]) {
        off += v.stride[d];
        break;
      }
      off -= (v.block[d] - 1) * v.stride[d];
      idx[d] = 0;
    }
  }
}

at::Tensor block_reduce_cpu(const at::Tensor& x, at::IntArrayRef size, at::IntArrayRef stride,
                            int64_t offset, at::IntArrayRef block, c10::string_view reduce,
                            double p) {
  constexpr const char* op = "s3sparse.block_reduce";
  const StridedBlocks v = make_strided_blocks(x, size, stride, offset, block, op);
  const BlockReduce kind = parse_block_reduce(reduce, p, op);
  at::Tensor out = at::empty(v.grid_shape(), x.options());
  if (v.num_blocks == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const bool p_inf = std::isinf(p);
    const acc_t pa = static_cast<acc_t>(p);
    at::parallel_for(0, v.num_blocks, 256, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t acc;
        switch (kind) {
          case BlockReduce::Min: acc = std::numeric_limits<acc_t>::infinity(); break;
          case BlockReduce::Max: acc = -std::numeric_limits<acc_t>::infinity(); break;
          default: acc = acc_t(0);
        }
        for_each_block_element(v, b, [&](int64_t o) {
          const acc_t val = static_cast<acc_t>(src[o]);
          switch (kind) {
            case BlockReduce::Sum: acc += val; break;
            case BlockReduce::Min: acc = (val < acc || std::isnan(val)) ? val : acc; break;
            case BlockReduce::Max: acc = (val > acc || std::isnan(val)) ? val : acc; break;
            case BlockReduce::Norm:
              if (p_inf) {
                const acc_t a = std::abs(val);
                acc = (a > acc || std::isnan(a)) ? a : acc;
              } else if (p == 2.0) {
                acc += val * val;
              } else if (p == 1.0) {
                acc += std::abs(val);
              } else {
                acc += std::pow(std::abs(val), pa);
              }
              break;
          }
        });
        if (kind == BlockReduce::Norm && !p_inf) {
          if (p == 2.0) acc = std::sqrt(acc);
          else if (p != 1.0) acc = std::pow(acc, acc_t(1) / pa);
        }
        dst[b] = static_cast<scalar_t>(acc);
      }
    });
  });
  return out;
}

void block_scale_cpu(at::Tensor& x, at::IntArrayRef size, at::IntArrayRef stride, int64_t offset,
                     at::IntArrayRef block, const at::Tensor& scale) {
  constexpr const char* op = "s3sparse.block_scale_";
  const StridedBlocks v = make_strided_blocks(x, size, stride, offset, block, op);
  check_block_scale(x, v, scale, op);
  if (v.num_blocks == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor s = scale.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* factors = s.const_data_ptr<acc_t>();
    scalar_t* data = x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, v.num_blocks, 256, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t f = factors[b];
        if (f == acc_t(1)) continue;
        for_each_block_element(v, b, [&](int64_t o) {
          data[o] = f == acc_t(0) ? scalar_t(0)
                                  : static_cast<scalar_t>(static_cast<acc_t>(data[o]) * f);
        });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s3sparse, CPU, m) {
  m.impl("block_reduce", &block_reduce_cpu);
  m.impl("block_scale_", &block_scale_cpu);
}

}  // namespace s3sparse
