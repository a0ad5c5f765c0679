// The emulator's own checks (tools/cuda_emu/build.sh compiles and runs this after the library):
// block and warp barriers order shared-memory traffic, shuffles and ballots see the right lanes, a
// barrier after a thread exited is reported, an exception in a kernel reaches the launch, and a
// deep stack of locals fits a fiber's stack.
#include "runtime.h"

#include <cstdio>

namespace {

int failures = 0;
void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "s3emu selftest FAILED: %s\n", what);
    ++failures;
  }
}

// Tree sum of 256 values in shared memory: right only if every __syncthreads orders the steps.
__global__ void block_sum(const int* in, int* out) {
  __shared__ int s[256];
  const unsigned t = threadIdx.x;
  s[t] = in[blockIdx.x * 256 + t];
  __syncthreads();
  for (unsigned h = 128; h > 0; h >>= 1) {
    if (t < h) s[t] += s[t + h];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Warp collectives: each lane's sum over its warp by shuffles, and a ballot of the odd lanes.
__global__ void warp_ops(int* sums, unsigned* ballots) {
  const unsigned t = threadIdx.x;
  int v = static_cast<int>(t);
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  sums[t] = v;
  ballots[t] = __ballot_sync(0xffffffffu, (t & 1) != 0);
}

// Lane 0 returns, the rest wait at a barrier: divergent code, to be reported.
__global__ void divergent(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void throws(int*) {
  if (threadIdx.x == 5) throw std::runtime_error("lane 5");
  __syncthreads();
}

// 64 KiB of locals a thread, live across a barrier.
__global__ void deep_stack(int* out) {
  volatile int big[16384];
  for (int i = 0; i < 16384; ++i) big[i] = i + static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = big[16383];
}

}  // namespace

int main() {
  std::vector<int> in(3 * 256), sums(3, 0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i % 97) - 40;
  S3_LAUNCH(3, 256, 0, nullptr, block_sum)(in.data(), sums.data());
  for (int b = 0; b < 3; ++b) {
    int want = 0;
    for (int i = 0; i < 256; ++i) want += in[256 * b + i];
    expect(sums[b] == want, "block_sum: barriers order shared memory");
  }

  std::vector<int> wsum(64, 0);
  std::vector<unsigned> ballot(64, 0);
  S3_LAUNCH(1, 64, 0, nullptr, warp_ops)(wsum.data(), ballot.data());
  for (int t = 0; t < 64; ++t) {
    expect(wsum[t] == (t < 32 ? 496 : 32 * 32 + 496), "warp_ops: shuffle sums stay in the warp");
    expect(ballot[t] == 0xAAAAAAAAu, "warp_ops: ballot of the odd lanes");
  }

  std::vector<int> out(256, 0);
  bool reported = false;
  try {
    S3_LAUNCH(1, 64, 0, nullptr, divergent)(out.data());
  } catch (const std::runtime_error& e) {
    reported = std::string(e.what()).find("after a thread of its block had exited") != std::string::npos;
  }
  expect(reported, "divergent: a barrier after an exit is reported");

  reported = false;
  try {
    S3_LAUNCH(2, 32, 0, nullptr, throws)(out.data());
  } catch (const std::runtime_error& e) {
    reported = std::string(e.what()).find("lane 5") != std::string::npos;
  }
  expect(reported, "throws: a kernel's exception reaches the launch");

  S3_LAUNCH(1, 128, 0, nullptr, deep_stack)(out.data());
  for (int t = 0; t < 128; ++t) expect(out[t] == 16383 + t, "deep_stack: 64 KiB of locals a thread");

  if (failures == 0) std::printf("s3emu selftest: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
