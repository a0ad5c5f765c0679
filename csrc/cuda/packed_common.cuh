// Small device helpers shared by the packed-weight kernels (packed.cu, the general decode kernels of
// packed_decode.cuh and the stream decode kernel of packed_stream.cuh).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/launch.cuh"

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace s3sparse {
namespace packed_cuda {

constexpr int64_t kInt32Safe = int64_t(1) << 30;
constexpr int kRowClamp = 1 << 29;  // decomposed row offsets are clamped to +-this (out of range: the plans
                                    // that decompose offsets take M < kRowClamp only)
// A code-table entry whose subsets entry is bad (also out of range; kept apart from
// kRowClamp so that an offset far outside W is reported as one, not as a bad index).
constexpr int kRowBadEntry = kRowClamp + 1;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

C10_HOST_DEVICE inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// n / d and n % d for n < 2^31 by a multiply-high and a shift (Granlund and
// Montgomery): the decode paths divide value and scope indices by runtime
// constants on every element or chunk.
struct FastDivmod {
  uint32_t d = 1, mul = 1, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t divisor) : d(divisor) {
    while ((uint64_t(1) << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  C10_HOST_DEVICE inline uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(n) * mul) >> 32);
#endif
    return (hi + n) >> shift;
  }
};

template <typename T>
C10_HOST_DEVICE inline float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T ldg(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// (row, col) of a flat offset, col in [0, K), row clamped to +-kRowClamp.
__device__ __forceinline__ void split_offset(int64_t off, int64_t K, int32_t* row, int32_t* col) {
  const int64_t r = floor_div(off, K);
  *col = static_cast<int32_t>(off - r * K);
  *row = static_cast<int32_t>(std::max<int64_t>(-kRowClamp, std::min<int64_t>(kRowClamp, r)));
}

// ------------------------------------------------------------------ host
constexpr int kMaxDevices = 64;

inline int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// An attribute of the current device, asked once per device (the callers are
// on every call's path).
template <cudaDeviceAttr Attr>
int device_attribute() {
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not asked yet (every attribute used is >= 1)
  const int device = current_device();
  int v = device < kMaxDevices ? cached[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, Attr, device));
    v = std::max(v, 1);
    if (device < kMaxDevices) cached[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

inline int multiprocessors() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// Whether the current device has the mma.sync instructions (sm_80 and later): on older cards the
// tensor-core kernels are compiled to a trap, so their launchers decline there.
inline bool device_has_mma() { return device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 8; }

// Whether a decode kernel is launched as a programmatic dependent (launch.cuh): switched on, and on sm_90 or
// later, where its griddepcontrol instructions exist.
inline bool launch_as_dependent() {
  return dependent_launch_enabled() && device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9;
}

// Whether `stream` is capturing a CUDA graph (no host sync, no per-call state may be made then).
inline bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
  return st != cudaStreamCaptureStatusNone;
}

// Let Kernel take `bytes` of dynamic shared memory. The limit each kernel was
// given is remembered per device (the call would otherwise be made on every
// launch); it only ever grows. The kernel is a template argument so that every
// kernel has its own record (kernels of one signature share a pointer type).
// The 48 KiB a launch gets without asking covers static and dynamic shared
// memory together: a kernel with static shared memory must ask from 48 KiB
// minus that (at exactly 48 KiB of dynamic memory the span kernel's 16 static
// bytes failed its launch with "invalid argument").
template <auto Kernel>
void allow_shared(int64_t bytes) {
  static const int64_t static_bytes = [] {
    cudaFuncAttributes a{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&a, Kernel));
    return static_cast<int64_t>(a.sharedSizeBytes);
  }();
  if (bytes + static_bytes <= 48 * 1024) return;
  static std::atomic<int> allowed[kMaxDevices] = {};
  const int device = current_device();
  const int want = static_cast<int>(bytes);
  if (device < kMaxDevices && allowed[device].load(std::memory_order_relaxed) >= want) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, want));
  if (device < kMaxDevices) {
    int seen = allowed[device].load(std::memory_order_relaxed);
    while (seen < want && !allowed[device].compare_exchange_weak(seen, want)) {
    }
  }
}

}  // namespace packed_cuda
}  // namespace s3sparse
