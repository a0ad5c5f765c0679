// The general decode kernels of packed_linear (csrc/cuda/packed_decode.cuh) for float
// values: one file a dtype, so the build compiles them in parallel.
#define S3SPARSE_PACKED_DECODE_IMPL
#include "cuda/packed_decode.cuh"

namespace s3sparse {
namespace packed_cuda {
namespace decode {
template void launch_decode<float>(const GemvPlan&, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&, int*, cudaStream_t);
}  // namespace decode
}  // namespace packed_cuda
}  // namespace s3sparse
