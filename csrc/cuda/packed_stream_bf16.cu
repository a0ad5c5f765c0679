// The stream decode kernel, the expansion kernel and the tensor-core kernel of
// packed_linear (csrc/cuda/packed_stream.cuh, packed_expand.cuh, packed_mma.cuh) for
// at::BFloat16 values: one file a dtype, so the build compiles them in parallel.
#define S3SPARSE_PACKED_STREAM_IMPL
#include "cuda/packed_mma.cuh"

namespace s3sparse {
namespace packed_cuda {
template bool launch_packed_stream<at::BFloat16>(const PackedGeometry&, int64_t, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&, int*,
                                        cudaStream_t);
template bool launch_packed_expand<at::BFloat16>(const PackedGeometry&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                        at::Tensor&, int*, cudaStream_t);
template bool launch_packed_mma<at::BFloat16>(const PackedGeometry&, int64_t, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&, int*,
                                        cudaStream_t);
}  // namespace packed_cuda
}  // namespace s3sparse
