// Kernel-launch spelling shared by the CUDA sources.
//
//   S3_LAUNCH(grid, block, smem, stream, kernel<T...>)(args...);
//   S3_DYNAMIC_SHARED(type, name);   // extern __shared__ type name[] (16-byte aligned)
//   launch_maybe_dependent(kernel, grid, block, smem, stream, dependent, args...)
//       S3_LAUNCH, or with dependent a programmatic dependent launch (sm_90): the kernel may start while the
//       previous kernel on the stream ends, and must call grid_dependency_wait (mma.cuh) before it reads
//       anything that kernel may write.
//
// They are plain `<<< >>>` / `extern __shared__` under nvcc. The only reason for
// the macros: tools/cuda_emu/ compiles these same files as host C++ against a
// thread-per-CUDA-thread emulator (which predefines both) to run the kernels'
// logic on a machine without a GPU.
#pragma once

#ifndef S3_LAUNCH
#define S3_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif
#ifndef S3_DYNAMIC_SHARED
#define S3_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

#if !defined(S3SPARSE_EMULATE_CUDA)
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif
#include <cstdlib>
#include <cstring>
#include <utility>

// The decode kernels (the span kernel, sp24_linear's) launched as programmatic dependents, so that a launch and
// its first loads into L2 overlap the previous kernel's end; S3SPARSE_PACKED_PDL=0 launches them plainly (read
// once). Measured on two H100s (docs/performance.md, 2026-12-07 and 12-08): sp24_linear's decode calls replayed
// back to back 10-25 % and 0-12 % faster; a model step, whose Linears follow plainly launched kernels, unchanged.
inline bool dependent_launch_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("S3SPARSE_PACKED_PDL");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

template <typename... Params, typename... Args>
void launch_maybe_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, int64_t smem, cudaStream_t stream,
                            bool dependent, Args&&... args) {
#if !defined(S3SPARSE_EMULATE_CUDA)
  if (dependent) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
    return;
  }
#endif
  S3_LAUNCH(grid, block, smem, stream, kernel)(std::forward<Args>(args)...);
}
