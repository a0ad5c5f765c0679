// Warp-level tensor-core and async-copy primitives (sm_80 and later) used by
// the tensor-core kernel of packed_linear (packed_mma.cuh):
//   cp_async16 / cp_async_ca<B>   global -> shared copies that bypass registers (B = 4 or 8 bytes)
//   prefetch_l2, grid_dependency_trigger / _wait   an L2 hint; programmatic dependent launch (sm_90)
//   ldmatrix_x2 / x4         8x8 b16 tiles from shared memory into fragments
//   mma_16816                D (16x8, fp32) += A (16x16) B (16x8), fp16 or bf16
//   mma_sp_16832             D (16x8, fp32) += A (16x32, 2:4, given as 16x16 kept
//                            values + metadata) B (32x8), fp16 or bf16 (sp24.cu)
// Fragment layouts (PTX ISA, "mma.m16n8k16"): with g = lane / 4, t = lane % 4,
//   A regs a0..a3 = A[g][2t..2t+1], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]
//   B regs b0, b1 = B[2t..2t+1][g], B[2t+8..2t+9][g]
//   D regs d0..d3 = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]
// mma.sp m16n8k32 (16-bit): A's regs as above for the 16 kept columns j of
// each row (kept value j of row r lies in column group j / 2), B regs b0..b3 =
// B[2t + 8 i .. 2t + 8 i + 1][g], i = 0..3; metadata: with selector SEL, row r's
// kept value j sits at column 4 (j / 2) + the 2-bit field j % 8 of bits
// 16 (r / 8) .. of the word of lane 4 (r % 8) + 2 SEL + j / 8 (the layout
// measured on an H100: docs/performance.md).
// Under the host emulator (tools/cuda_emu) the same calls run as warp
// collectives in C++ (s3emu_* in runtime.h), so the kernels' indexing is
// checked without a GPU; the layouts themselves are checked on the device by
// the CUDA tests.
#pragma once

#include <cstdint>
#include <cstring>

namespace s3sparse {
namespace packed_cuda {

#if defined(S3SPARSE_EMULATE_CUDA)

template <int B>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src, bool valid) {
  if (valid) {
    std::memcpy(dst, src, B);
  } else {
    std::memset(dst, 0, B);
  }
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) { cp_async_ca<16>(dst, src, valid); }
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
__device__ __forceinline__ void prefetch_l2(const void*) {}
__device__ __forceinline__ void grid_dependency_trigger() {}
__device__ __forceinline__ void grid_dependency_wait() {}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) { s3emu_ldmatrix(r, 4, row); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) { s3emu_ldmatrix(r, 2, row); }
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  s3emu_mma_16816(d, a, b, BF16);
}
template <bool BF16, int SEL>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  s3emu_mma_sp_16832(d, a, b, e, SEL, BF16);
}

#else

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes (L2 only: streamed data), or 16 zero bytes when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
// B = 4 or 8 bytes through L1 (data re-read nearby: neighbouring lanes' metadata words, x rows every block
// of a grid row reads), or B zero bytes when !valid.
template <int B>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src, bool valid) {
  static_assert(B == 4 || B == 8, "cp.async.ca copies 4, 8 or 16 bytes (16: cp_async16, through L2)");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_u32(dst)), "l"(src), "n"(B),
               "r"(valid ? B : 0));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Wait until at most N of this thread's committed groups are still in flight. ("memory": no shared-memory
// read is moved above the wait; sp24_tiled_async_kernel reads its own copies right after it, no barrier between.)
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
// A hint: the line holding p into L2 (no data reaches this thread).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#endif
}
// Programmatic dependent launch (sm_90): let the next kernel on the stream start launching (it waits for this
// one before using its results), and wait for the previous kernel's completion and memory. Both are no-ops in a
// kernel not launched as a programmatic dependent, and before sm_90.
__device__ __forceinline__ void grid_dependency_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lanes 8i..8i+7 give the row addresses of tile i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// Sparse A (2:4 along k), selector SEL (0 or 1: which lane pair of each 4 gives the metadata).
// S3_LAB_ORDERED_META=1 (lab, PTX 8.5+): the .sp::ordered_metadata form, which promises each group's
// two positions increasing. sp24.py always builds p0 < p1; a corrupt word still reaches the instruction
// before the checked kernels turn its tile into NaN, so a checked build would feed it words outside that
// promise (its result is discarded either way). ptxas advises the form for later architectures; on an
// H100 it issues at the same rate (benchmarks/lab/mma_rate.cu), so the package keeps mma.sp.
#if defined(S3_LAB_ORDERED_META) && S3_LAB_ORDERED_META
#define S3_MMA_SP "mma.sp::ordered_metadata"
#else
#define S3_MMA_SP "mma.sp"
#endif
template <bool BF16, int SEL>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (BF16) {
    asm volatile(
        S3_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e), "n"(SEL));
  } else {
    asm volatile(
        S3_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e), "n"(SEL));
  }
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

#endif  // S3SPARSE_EMULATE_CUDA

}  // namespace packed_cuda
}  // namespace s3sparse
