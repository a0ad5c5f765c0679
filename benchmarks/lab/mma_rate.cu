// Issue rate of the tensor-core instructions the sp24 kernels use, with no memory traffic:
// mma.sync m16n8k16 (dense, fp16 in, fp32 accumulate) against mma.sp m16n8k32 (2:4 sparse,
// the same 16x8x16 products kept out of 16x8x32). Each warp runs `chains` independent
// accumulators for `iters` rounds; the table gives, for warps an SM x chains, the time and the
// rate in dense-equivalent TFLOP/s (a k32 sparse op counts as 16*8*32*2 flops) and in
// instructions an SM a cycle. This tests whether the tiled kernel's ~245 TFLOP/s at 512 tokens
// is the mma.sp issue rate (docs/performance.md, issue 17).
//   nvcc -O3 -arch=sm_90 -o /tmp/mma_rate benchmarks/lab/mma_rate.cu && /tmp/mma_rate
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

template <int C>
__global__ void dense_loop(float* out, int iters) {
  float d[C][4] = {};
  uint32_t a[4] = {0x3c003c00u + threadIdx.x, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
  uint32_t b[2] = {0x3c003c00u, 0x3c003c00u + threadIdx.x};
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < C; ++c)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < C; ++c) s += d[c][0] + d[c][1] + d[c][2] + d[c][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// One mma.sp m16n8k32 of accumulator c, the mnemonic OP ("mma.sp" or its ordered-metadata form).
#define SPARSE_MMA(OP)                                                                                 \
  asm volatile(OP ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "     \
                  "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"                                       \
               : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), \
                 "r"(e))

template <int C, bool kOrdered>
__global__ void sparse_loop(float* out, int iters) {
  float d[C][4] = {};
  uint32_t a[4] = {0x3c003c00u + threadIdx.x, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
  uint32_t b[4] = {0x3c003c00u, 0x3c003c00u + threadIdx.x, 0x3c003c00u, 0x3c003c00u};
  const uint32_t e = 0x44444444u;  // every group keeps its columns 0 and 1: valid metadata
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if constexpr (kOrdered) {  // the same op with the kept indices promised increasing (PTX 8.5)
        SPARSE_MMA("mma.sp::ordered_metadata");
      } else {
        SPARSE_MMA("mma.sp");
      }
    }
  }
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < C; ++c) s += d[c][0] + d[c][1] + d[c][2] + d[c][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

template <typename K>
static float time_ms(K kernel, int blocks, int threads, float* out, int iters) {
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  kernel<<<blocks, threads>>>(out, iters);  // warm-up
  cudaEventRecord(t0);
  for (int r = 0; r < 5; ++r) kernel<<<blocks, threads>>>(out, iters);
  cudaEventRecord(t1);
  cudaEventSynchronize(t1);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, t0, t1);
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  return ms / 5.f;
}

template <int C, bool kOrdered = false>
static void row(const char* kind, bool sparse, int sms, int clock_khz, int warps_per_sm, float* out) {
  const int iters = 4096;
  const int threads = 32 * (warps_per_sm < 8 ? warps_per_sm : 8);
  const int blocks = sms * (warps_per_sm / (threads / 32));
  float ms = sparse ? time_ms(sparse_loop<C, kOrdered>, blocks, threads, out, iters)
                    : time_ms(dense_loop<C>, blocks, threads, out, iters);
  const double insts = double(blocks) * (threads / 32) * iters * C;
  const double flops = insts * 16 * 8 * (sparse ? 32 : 16) * 2;
  const double cycles = ms * 1e-3 * clock_khz * 1e3;
  printf("| %-6s | %2d | %d | %8.3f | %7.1f | %5.3f |\n", kind, warps_per_sm, C, ms, flops / (ms * 1e-3) / 1e12,
         insts / sms / cycles);
}

int main() {
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  int clock_khz = 0;
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  printf("# %s, %d SMs, max clock %d MHz (instructions an SM a cycle use this clock)\n", p.name,
         p.multiProcessorCount, clock_khz / 1000);
  float* out;
  cudaMalloc(&out, sizeof(float) * p.multiProcessorCount * 64 * 32);
  printf("| kind | warps/SM | chains | ms | TFLOP/s (dense-eq) | inst/SM/clk |\n|---|---|---|---|---|---|\n");
  for (int w : {4, 8, 16, 32}) {
    row<1>("dense", false, p.multiProcessorCount, clock_khz, w, out);
    row<4>("dense", false, p.multiProcessorCount, clock_khz, w, out);
    row<1>("sparse", true, p.multiProcessorCount, clock_khz, w, out);
    row<2>("sparse", true, p.multiProcessorCount, clock_khz, w, out);
    row<4>("sparse", true, p.multiProcessorCount, clock_khz, w, out);
    row<8>("sparse", true, p.multiProcessorCount, clock_khz, w, out);
    row<4, true>("sp-ord", true, p.multiProcessorCount, clock_khz, w, out);
  }
  cudaError_t err = cudaDeviceSynchronize();
  printf("# %s\n", cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
