// Kernel-launch spelling shared by the CUDA sources.
//
//   S3_LAUNCH(grid, block, smem, stream, kernel<T...>)(args...);
//   S3_DYNAMIC_SHARED(type, name);   // extern __shared__ type name[] (16-byte aligned)
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
