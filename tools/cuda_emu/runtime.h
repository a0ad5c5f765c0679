// A host emulator of the small part of CUDA the s3sparse kernels use, to run
// csrc/cuda/*.cu as plain C++ on a machine without a GPU (a development check
// of the kernels' logic: indexing, barriers, warp collectives; not of speed,
// and not of the CUDA memory model: a thread runs until it waits at a barrier).
//
// Every CUDA thread of a thread block is a fiber (ucontext) on the calling
// thread, switched at barriers; blocks run one after the other.
// __syncthreads / __syncwarp are barrier waits, warp shuffles
// and ballots go through per-warp slots between two barrier waits, __shared__
// variables are function statics (one block at a time), atomicAdd is
// std::atomic_ref. A barrier reached after a thread of the block has exited is
// recorded as a divergence error and reported when the launch ends.
//
// The c10/cuda/*.h shims next to this file include it in place of the real
// headers; it also re-points TORCH_LIBRARY_IMPL at the CPU dispatch key. Build
// (tools/cuda_emu/build.sh does exactly this):
//   g++ -std=c++20 -shared -fPIC -DS3SPARSE_EMULATE_CUDA -Ds3sparse=s3emu \
//       -I tools/cuda_emu -I csrc -I <torch include dirs> -x c++ csrc/ops.cpp csrc/cuda/*.cu ...
// which yields a library registering torch.ops.s3emu.* (the CUDA host code and
// kernels, running on CPU tensors). tests/test_ops.py runs its CUDA cases
// through it when S3SPARSE_CUDA_EMU=<path to the library> is set.
#pragma once

#ifndef S3SPARSE_EMULATE_CUDA
#error "tools/cuda_emu is only for the host emulation build (-DS3SPARSE_EMULATE_CUDA)"
#endif

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <functional>
#include <sys/mman.h>
#include <ucontext.h>
#include <vector>

// Register the "CUDA" kernels for CPU tensors (their data pointers are host memory).
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)

// ------------------------------------------------------------------ language
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static

using std::fabs;
using std::isnan;
using std::pow;
using std::sqrt;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ------------------------------------------------------------------ runtime API
using cudaStream_t = struct s3emu_stream*;
using cudaError_t = int;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return 0; }  // (launches run to the end when made)
namespace s3emu_rt {
inline std::atomic<bool> g_capturing{false};
}
// The emulator has no graphs; a test may make the stream report a capture (s3emu_set_capturing, through
// ctypes) to run the host code's capture paths, whose launches then run at once as any other.
extern "C" __attribute__((used)) inline void s3emu_set_capturing(int on) { s3emu_rt::g_capturing.store(on != 0); }
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* st) {
  *st = s3emu_rt::g_capturing.load() ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return 0;
}
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return 0;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  // few SMs: splits get exercised; an sm_90 part
  *v = attr == cudaDevAttrMultiProcessorCount ? 2 : attr == cudaDevAttrComputeCapabilityMajor ? 9 : 227 * 1024;
  return 0;
}
namespace s3emu_rt {
// Dynamic shared memory each kernel was allowed above the default 48 KiB.
inline std::mutex g_attr_mu;
inline std::map<const void*, int> g_max_dynamic_smem;
}  // namespace s3emu_rt
// A kernel's static shared memory is not known here: every kernel is taken to have 1 KiB, so that a launch
// whose dynamic memory alone is within 48 KiB but with its static memory is not must ask, as on a GPU.
constexpr size_t kStaticSmemGuess = 1024;
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
};
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F*) {
  a->sharedSizeBytes = kStaticSmemGuess;
  return 0;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > 227 * 1024) return 1;  // cudaErrorInvalidValue
    std::lock_guard<std::mutex> lock(s3emu_rt::g_attr_mu);
    s3emu_rt::g_max_dynamic_smem[reinterpret_cast<const void*>(f)] = value;
  }
  return 0;
}

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda

#define C10_CUDA_CHECK(expr)                                                  \
  do {                                                                        \
    if ((expr) != 0) throw std::runtime_error("s3emu: CUDA call failed: " #expr); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

// ------------------------------------------------------------------ execution
namespace s3emu_rt {

constexpr unsigned kMaxThreads = 1024;
constexpr size_t kMaxDefaultSmem = 48 * 1024;
constexpr size_t kFiberStack = 256 * 1024;  // a CUDA thread's stack (the kernels' locals and the collectives')

// The threads of a block are fibers (ucontext) on the calling thread, switched only where a thread
// waits at a barrier: no OS threads, no futexes (the threads-and-std::barrier form spent nearly all
// its time in the kernel). A fiber waiting at a barrier is resumed only once its phase has moved on.
struct Fiber {
  ucontext_t ctx{};
  bool done = false;
  const uint64_t* wait_on = nullptr;  // the barrier phase this fiber waits to see change
  uint64_t wait_phase = 0;
};

struct Fibers {
  ucontext_t sched{};
  std::vector<Fiber> fibers;
  unsigned current = 0;
  char* stacks = nullptr;
  size_t capacity = 0;  // fibers whose stacks are mapped
  ~Fibers() {
    if (stacks != nullptr) munmap(stacks, capacity * (kFiberStack + kPage));
  }
  static constexpr size_t kPage = 4096;
  // Stacks for n fibers, each below a guard page (an overflow faults instead of corrupting its neighbour).
  char* stack(unsigned t, unsigned n) {
    if (n > capacity) {
      if (stacks != nullptr) munmap(stacks, capacity * (kFiberStack + kPage));
      const size_t bytes = n * (kFiberStack + kPage);
      void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("s3emu: cannot map the fibers' stacks");
      stacks = static_cast<char*>(p);
      capacity = n;
      for (unsigned i = 0; i < n; ++i) mprotect(stacks + i * (kFiberStack + kPage), kPage, PROT_NONE);
    }
    return stacks + t * (kFiberStack + kPage) + kPage;
  }
};
inline Fibers g_fibers;

// Wait (the calling fiber) until *phase differs from `seen`.
inline void wait_phase_change(const uint64_t* phase, uint64_t seen) {
  Fiber& f = g_fibers.fibers[g_fibers.current];
  f.wait_on = phase;
  f.wait_phase = seen;
  swapcontext(&f.ctx, &g_fibers.sched);
  f.wait_on = nullptr;
}

// std::barrier's arrive_and_wait / arrive_and_drop for fibers.
struct Barrier {
  unsigned expected;
  unsigned arrived = 0;
  uint64_t phase = 0;
  explicit Barrier(unsigned n) : expected(n) {}
  void complete_if_full() {
    if (expected > 0 && arrived == expected) arrived = 0, ++phase;
  }
  void arrive_and_wait() {
    const uint64_t seen = phase;
    ++arrived;
    complete_if_full();
    if (phase == seen) wait_phase_change(&phase, seen);
  }
  void arrive_and_drop() {
    --expected;
    complete_if_full();
  }
};

struct Block {
  unsigned nthreads;
  Barrier bar;
  std::vector<Barrier> warp_bar;
  std::vector<unsigned char> slot;  // 16 bytes per thread, for warp collectives
  std::vector<unsigned char> wide;  // 64 bytes per thread, for the tensor-core collectives
  std::vector<unsigned char> dyn_smem;
  unsigned exited = 0;                     // threads of the block that returned
  std::vector<unsigned> warp_exited;        // the same, per warp
  bool divergent = false;
  std::string error;

  Block(unsigned n, size_t smem)
      : nthreads(n), bar(n), slot(16 * n), wide(64 * n), dyn_smem(smem + 16), warp_exited((n + 31) / 32, 0) {
    for (unsigned w = 0; w < (n + 31) / 32; ++w) warp_bar.emplace_back(std::min(32u, n - 32 * w));
  }
};

inline dim3 tl_thread, tl_block;
inline dim3 g_block_dim, g_grid_dim;
inline Block* g_blk = nullptr;
inline std::atomic<long> g_divergences{0};
inline const std::function<void()>* g_body = nullptr;

inline unsigned flat_tid() {
  return tl_thread.x + g_block_dim.x * (tl_thread.y + g_block_dim.y * tl_thread.z);
}
inline Barrier& warp_barrier() { return g_blk->warp_bar[flat_tid() / 32]; }

// A block barrier after any thread of the block returned, or a warp barrier
// after a thread of the same warp returned, is divergent code.
inline void check_block_not_divergent() {
  if (g_blk->exited != 0) g_blk->divergent = true;
}
inline void check_warp_not_divergent() {
  if (g_blk->warp_exited[flat_tid() / 32] != 0) g_blk->divergent = true;
}

// A fiber's whole life: the kernel body, then leaving its barriers (returns to the scheduler through uc_link).
inline void fiber_main() {
  const unsigned t = g_fibers.current;
  Block& blk = *g_blk;
  try {
    (*g_body)();
  } catch (const std::exception& e) {
    blk.error = e.what();
  } catch (...) {
    blk.error = "an exception that is not a std::exception";
  }
  ++blk.exited;
  ++blk.warp_exited[t / 32];
  // Let the others pass any later barrier (recorded as divergence).
  blk.warp_bar[t / 32].arrive_and_drop();
  blk.bar.arrive_and_drop();
  g_fibers.fibers[t].done = true;
}

// Run the n threads of one block to their ends.
inline void run_block(unsigned n, dim3 block, dim3 index) {
  Fibers& fs = g_fibers;
  fs.fibers.assign(n, Fiber{});
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = fs.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = fs.stack(t, n);
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = &fs.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  tl_block = index;
  for (unsigned alive = n; alive > 0;) {
    bool resumed = false;
    alive = 0;
    for (unsigned t = 0; t < n; ++t) {
      Fiber& f = fs.fibers[t];
      if (f.done) continue;
      if (f.wait_on == nullptr || *f.wait_on != f.wait_phase) {
        fs.current = t;
        tl_thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        swapcontext(&fs.sched, &f.ctx);
        resumed = true;
      }
      alive += f.done ? 0 : 1;
    }
    if (alive > 0 && !resumed) throw std::runtime_error("s3emu: every live thread of a block waits at a barrier");
  }
}

template <typename Fn>
void run(const void* kernel, dim3 grid, dim3 block, size_t smem, Fn&& body) {
  if (smem + kStaticSmemGuess > kMaxDefaultSmem) {
    std::lock_guard<std::mutex> lock(g_attr_mu);
    auto it = g_max_dynamic_smem.find(kernel);
    if (it == g_max_dynamic_smem.end() || smem > static_cast<size_t>(it->second))
      throw std::runtime_error("s3emu: launch with " + std::to_string(smem) +
                               " bytes of dynamic shared memory, above 48 KiB with the static, without "
                               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize) allowing it");
  }
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > kMaxThreads) throw std::runtime_error("s3emu: bad block size " + std::to_string(n));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("s3emu: empty grid");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("s3emu: grid.y / grid.z above 65535");
  static std::mutex launch_mu;  // (one launch at a time: the fibers and the block are globals)
  std::lock_guard<std::mutex> launch_lock(launch_mu);
  g_block_dim = block;
  g_grid_dim = grid;
  const std::function<void()> fn = [&] { body(); };
  g_body = &fn;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(n, smem);
        g_blk = &blk;
        run_block(n, block, dim3(bx, by, bz));
        g_blk = nullptr;
        if (!blk.error.empty()) throw std::runtime_error("s3emu: kernel threw: " + blk.error);
        if (blk.divergent) {
          g_divergences.fetch_add(1);
          throw std::runtime_error("s3emu: a barrier was reached after a thread of its block had exited");
        }
      }
}

template <typename... KArgs>
struct Launch {
  void (*kernel)(KArgs...);
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(KArgs), "s3emu: wrong number of kernel arguments");
    // Arguments are copied once, as a launch copies them to the device.
    std::tuple<KArgs...> params(static_cast<KArgs>(args)...);
    run(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(kernel, params); });
  }
};

template <typename... KArgs>
Launch<KArgs...> make_launch(dim3 grid, dim3 block, size_t smem, void (*kernel)(KArgs...)) {
  return Launch<KArgs...>{kernel, grid, block, smem};
}

}  // namespace s3emu_rt

#define threadIdx (::s3emu_rt::tl_thread)
#define blockIdx (::s3emu_rt::tl_block)
#define blockDim (::s3emu_rt::g_block_dim)
#define gridDim (::s3emu_rt::g_grid_dim)

#define S3_LAUNCH(grid, block, smem, stream, ...) \
  ::s3emu_rt::make_launch(dim3(grid), dim3(block), static_cast<size_t>(smem), __VA_ARGS__)
#define S3_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::s3emu_rt::g_blk->dyn_smem.data())

// ------------------------------------------------------------------ intrinsics
inline void __syncthreads() {
  ::s3emu_rt::check_block_not_divergent();
  ::s3emu_rt::g_blk->bar.arrive_and_wait();
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  ::s3emu_rt::check_warp_not_divergent();
  ::s3emu_rt::warp_barrier().arrive_and_wait();
}
inline unsigned __ballot_sync(unsigned, bool pred) {
  using namespace ::s3emu_rt;
  const unsigned t = flat_tid(), w0 = t / 32 * 32;
  check_warp_not_divergent();
  g_blk->slot[16 * t] = pred ? 1 : 0;
  warp_barrier().arrive_and_wait();
  unsigned r = 0;
  for (unsigned l = 0; l < 32 && w0 + l < g_blk->nthreads; ++l)
    if (g_blk->slot[16 * (w0 + l)]) r |= 1u << l;
  warp_barrier().arrive_and_wait();
  return r;
}
namespace s3emu_rt {
// Every lane of the warp offers v; returns the value of lane `src` of the warp (v when src is past its end).
template <typename T>
T warp_exchange(T v, unsigned src) {
  static_assert(sizeof(T) <= 16, "s3emu: shuffle of a type above 16 bytes");
  const unsigned t = flat_tid(), w0 = t - t % 32;
  check_warp_not_divergent();
  std::memcpy(&g_blk->slot[16 * t], &v, sizeof(T));
  warp_barrier().arrive_and_wait();
  T out = v;
  if (src < 32 && w0 + src < g_blk->nthreads) std::memcpy(&out, &g_blk->slot[16 * (w0 + src)], sizeof(T));
  warp_barrier().arrive_and_wait();
  return out;
}
}  // namespace s3emu_rt
template <typename T>
T __shfl_down_sync(unsigned, T v, int delta) {
  return ::s3emu_rt::warp_exchange(v, ::s3emu_rt::flat_tid() % 32 + static_cast<unsigned>(delta));
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return ::s3emu_rt::warp_exchange(v, (::s3emu_rt::flat_tid() % 32) ^ static_cast<unsigned>(lane_mask));
}
template <typename T>
T __shfl_sync(unsigned, T v, int src_lane) {
  return ::s3emu_rt::warp_exchange(v, static_cast<unsigned>(src_lane) % 32);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int __popc(unsigned x) { return std::popcount(x); }
// Byte n of the result is byte (s >> 4n) & 7 of the 8 bytes (y:x).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xFFu) << (8 * n);
  return r;
}
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
template <typename T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicOr(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_or(v);
}

// ldmatrix (m8n8, b16, no transpose) of `count` tiles: lanes 8i..8i+7 give the
// row addresses of tile i; lane l gets, of every tile, row l / 4, elements
// 2 (l % 4) and 2 (l % 4) + 1.
inline void s3emu_ldmatrix(uint32_t* r, int count, const void* row) {
  using namespace ::s3emu_rt;
  const unsigned t = flat_tid(), lane = t % 32, w0 = t - lane;
  check_warp_not_divergent();
  std::memcpy(&g_blk->wide[64 * t], &row, sizeof(row));
  warp_barrier().arrive_and_wait();
  for (int i = 0; i < count; ++i) {
    const void* src = nullptr;
    std::memcpy(&src, &g_blk->wide[64 * (w0 + 8 * i + lane / 4)], sizeof(src));
    std::memcpy(&r[i], static_cast<const unsigned char*>(src) + 4 * (lane % 4), 4);
  }
  warp_barrier().arrive_and_wait();
}

// mma.m16n8k16.row.col, fp32 accumulators, fp16 or bf16 inputs (layouts in
// csrc/cuda/mma.cuh), as a warp collective.
inline void s3emu_mma_16816(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
  using namespace ::s3emu_rt;
  const unsigned t = flat_tid(), lane = t % 32, w0 = t - lane;
  check_warp_not_divergent();
  std::memcpy(&g_blk->wide[64 * t], a, 16);
  std::memcpy(&g_blk->wide[64 * t + 16], b, 8);
  warp_barrier().arrive_and_wait();
  auto half_at = [&](unsigned src_lane, int byte) {
    uint16_t bits = 0;
    std::memcpy(&bits, &g_blk->wide[64 * (w0 + src_lane) + byte], 2);
    return bf16 ? static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()))
                : static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  };
  // A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register (r / 8) + 2 (k / 8), half k % 2.
  auto A = [&](int r, int k) { return half_at((r % 8) * 4 + (k % 8) / 2, 4 * ((r / 8) + 2 * (k / 8)) + 2 * (k % 2)); };
  // B[k][n]: lane n * 4 + (k % 8) / 2, register k / 8, half k % 2.
  auto B = [&](int k, int n) { return half_at(n * 4 + (k % 8) / 2, 16 + 4 * (k / 8) + 2 * (k % 2)); };
  const int g = static_cast<int>(lane / 4), q = static_cast<int>(lane % 4);
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), n = 2 * q + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    d[i] = acc;
  }
  warp_barrier().arrive_and_wait();
}

// mma.sp.m16n8k32.row.col, fp32 accumulators, fp16 or bf16 inputs, A 2:4 along k
// (its 16 kept columns a row in the registers of mma.m16n8k16's A, the metadata
// word e of lane 4 (r % 8) + 2 sel + j / 8 placing row r's kept value j: bits
// 16 (r / 8) + 2 (j % 8), a column in group j / 2; layouts in csrc/cuda/mma.cuh).
inline void s3emu_mma_sp_16832(float* d, const uint32_t* a, const uint32_t* b, uint32_t e, int sel, bool bf16) {
  using namespace ::s3emu_rt;
  const unsigned t = flat_tid(), lane = t % 32, w0 = t - lane;
  check_warp_not_divergent();
  std::memcpy(&g_blk->wide[64 * t], a, 16);
  std::memcpy(&g_blk->wide[64 * t + 16], b, 16);
  std::memcpy(&g_blk->wide[64 * t + 32], &e, 4);
  warp_barrier().arrive_and_wait();
  auto half_at = [&](unsigned src_lane, int byte) {
    uint16_t bits = 0;
    std::memcpy(&bits, &g_blk->wide[64 * (w0 + src_lane) + byte], 2);
    return bf16 ? static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()))
                : static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  };
  float A[16][32] = {};
  for (int r = 0; r < 16; ++r) {
    for (int j = 0; j < 16; ++j) {
      uint32_t word = 0;
      std::memcpy(&word, &g_blk->wide[64 * (w0 + 4 * (r % 8) + 2 * sel + j / 8) + 32], 4);
      const int col = 4 * (j / 2) + static_cast<int>((word >> (16 * (r / 8) + 2 * (j % 8))) & 3u);
      // kept value j of row r: mma.m16n8k16's A[r][j] (lane (r % 8) * 4 + (j % 8) / 2, register r / 8 + 2 (j / 8))
      A[r][col] += half_at((r % 8) * 4 + (j % 8) / 2, 4 * ((r / 8) + 2 * (j / 8)) + 2 * (j % 2));
    }
  }
  // B[k][n]: lane n * 4 + (k % 8) / 2, register k / 8, half k % 2.
  auto B = [&](int k, int n) { return half_at(n * 4 + (k % 8) / 2, 16 + 4 * (k / 8) + 2 * (k % 2)); };
  const int g = static_cast<int>(lane / 4), q = static_cast<int>(lane % 4);
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), n = 2 * q + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 32; ++k) acc += A[r][k] * B(k, n);
    d[i] = acc;
  }
  warp_barrier().arrive_and_wait();
}
