// One packed_linear kernel alone, for benchmarks/lab/packed_mma_lab.py (built there with
// torch.utils.cpp_extension; not part of the package build): the tensor-core kernel, or
// with -DS3_LAB_SPAN the decode kernels of packed_stream.cuh (fp16, one row a group), or with
// -DS3_LAB_ROWBLOCK the row-block kernel of packed_rowblock.cuh (fp16, row groups: packed_mma_lab.py --kernel=rowblock).
#define S3SPARSE_PACKED_STREAM_IMPL
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#if defined(S3_LAB_ROWBLOCK)
#include "cuda/packed_rowblock.cuh"
#elif defined(S3_LAB_SPAN)
#include "cuda/packed_stream.cuh"
#else
#include "cuda/packed_mma.cuh"
#endif
using namespace s3sparse;
at::Tensor lab_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                      const std::optional<at::Tensor>& subsets,
                      const at::Tensor& block_off, const at::Tensor& elem_off, std::vector<int64_t> shape,
                      std::vector<int64_t> stride, int64_t bits, int64_t M, int64_t row_group) {
  PackedGeometry g = check_packed_linear(x, values, meta, subsets, block_off, elem_off, shape, stride, bits, M,
                                         row_group, std::nullopt, "lab");
  const int64_t N = x.size(0);
  at::Tensor y = at::empty({N, M}, x.options());
#if defined(S3_LAB_ROWBLOCK)
  bool ok = packed_cuda::launch_packed_rowblock<at::Half>(g, N, values, meta, std::nullopt, block_off, elem_off, x,
                                                          std::nullopt, y, nullptr, c10::cuda::getCurrentCUDAStream());
#elif defined(S3_LAB_SPAN)
  bool ok = packed_cuda::launch_packed_stream<at::Half>(g, N, values, meta, subsets, block_off, elem_off, x,
                                                        std::nullopt, y, nullptr, c10::cuda::getCurrentCUDAStream());
#else
  bool ok = packed_cuda::launch_packed_mma<at::Half>(g, N, values, meta, subsets, block_off, elem_off, x, std::nullopt,
                                                     y, nullptr, c10::cuda::getCurrentCUDAStream());
#endif
  TORCH_CHECK(ok, "not launched");
  return y;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("linear", &lab_linear); }
