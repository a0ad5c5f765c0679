// The tensor-core kernel of packed_linear alone, for benchmarks/lab/packed_mma_lab.py
// (built there with torch.utils.cpp_extension; not part of the package build).
#define S3SPARSE_PACKED_STREAM_IMPL
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda/packed_mma.cuh"
using namespace s3sparse;
at::Tensor mma_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, const at::Tensor& subsets,
                      const at::Tensor& block_off, const at::Tensor& elem_off, std::vector<int64_t> shape,
                      std::vector<int64_t> stride, int64_t bits, int64_t M) {
  PackedGeometry g = check_packed_linear(x, values, meta, subsets, block_off, elem_off, shape, stride, bits, M, 1,
                                         std::nullopt, "lab");
  const int64_t N = x.size(0);
  at::Tensor y = at::empty({N, M}, x.options());
  bool ok = packed_cuda::launch_packed_mma<at::Half>(g, N, values, meta, subsets, block_off, elem_off, x, std::nullopt,
                                                     y, nullptr, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(ok, "not launched");
  return y;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mma_linear", &mma_linear);
  m.def("linear", &mma_linear);
}
