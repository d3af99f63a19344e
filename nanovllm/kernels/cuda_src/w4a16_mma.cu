// Few-row w4a16 projection on the tensor cores: out[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, g]) * scale[n, g],
// g = k / group, for m < M <= 8, in CUDA.
//
// Contract (checked by nanovllm/kernels/cuda_w4a16.py before the call): x is M <= 8 bf16 or fp16 rows of K (rows
// 16-byte aligned); q is uint8 [N, K / 2], two codes a byte (column 2b in the low nibble, 2b + 1 in the high), rows
// 16-byte aligned; scale fp16 and zero uint8 are [N, groups]; K % 128 == 0 and (group % 128 == 0 or group >= K).
// With silu_mul the weight packs [gate; up] (N = 2 * n_out) and the output is silu(gate) * up.  bias (or null) has
// N entries.  The weight is read in place (the layout the Triton kernels read): no repacked copy.
//
// One block owns a tile of 16 weight rows (with silu_mul 8 gate rows and their 8 up rows) and its warps (8 while the
// tiles fit one wave of such blocks, else 4) split K in chunks of 128 columns, x row r beside weight rows r and r + 8
// (w4a16_common.cuh: the lane layout, the exact dequantization).  The tensor cores sum each chunk in fp32, times the
// group's scale in fp32: the weight is never rounded.
#include <cuda_runtime.h>

#include "w4a16_common.cuh"

namespace {

constexpr int kUnroll = 4;  // chunks a warp loads before using the first
constexpr int kWarpsPerSm = 16;  // the registers' budget: 128 a thread

// kPerChunk: a group is one chunk (g = chunk), else g = chunk / (group / kChunk) (one group: group = K).
// kExact: the warps' rounds of kUnroll chunks cover K exactly, so no chunk is out of range.
template <typename T, int kWarps, bool SILU, bool kPerChunk, bool kExact>
__global__ void __launch_bounds__(kWarps * 32, kWarpsPerSm / kWarps)
    mma_kernel(const T* __restrict__ x, long long ldx, int m, const uint8_t* __restrict__ q, long long ldq,
               const __half* __restrict__ scale, long long lds, const uint8_t* __restrict__ zero, long long ldz,
               const T* __restrict__ bias, T* __restrict__ out, long long ldo, int n_out, int k, int group) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, t = lane & 3;
  const int row_a = SILU ? blockIdx.x * 8 + r : blockIdx.x * 16 + r;  // the output rows (features) of the lane
  const int row_b = SILU ? row_a + n_out : row_a + 8;
  const bool live_a = row_a < n_out, live_b = SILU ? live_a : row_b < n_out;
  const LaneRows w(q, ldq, scale, lds, zero, ldz, live_a ? row_a : 0, live_b ? row_b : 0, t);
  const int chunks_per_group = group / kChunk;
  const bool x_live = r < m;
  const T* xr = x + (x_live ? r : 0) * ldx + t * 32;
  const int chunks = k / kChunk;
  if (warp < chunks) {  // the first chunk's weight starts on its way to L2 while the previous kernel finishes
    asm volatile("prefetch.global.L2 [%0];" ::"l"(w.qa + warp * (kChunk / 2)));
    asm volatile("prefetch.global.L2 [%0];" ::"l"(w.qb + warp * (kChunk / 2)));
  }
  pdl_begin();  // a no-op unless launched with the PDL attribute
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int first = warp; first < chunks; first += kWarps * kUnroll) {
    Chunk ch[kUnroll];
    uint4 xv[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + u * kWarps;
      const bool in = kExact || c < chunks;
      ch[u] = w.load(c, kPerChunk ? c : c / chunks_per_group, in);
#pragma unroll
      for (int v = 0; v < 4; ++v)
        xv[u][v] = in && x_live ? __ldg(reinterpret_cast<const uint4*>(xr + c * kChunk) + v) : uint4{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!kExact && first + u * kWarps >= chunks) break;
      uint32_t a[8][4];
      weight_fragments<T>(ch[u], a);
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      chunk_mma<T>(d, a, xv[u]);
      accumulate(acc, d, ch[u]);
    }
  }
  __shared__ float partial[kWarps][4][32];
#pragma unroll
  for (int j = 0; j < 4; ++j) partial[warp][j][lane] = acc[j];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[j] = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc[j] += partial[w][j][lane];
  }
  const float bias_a = bias != nullptr && live_a ? static_cast<float>(bias[row_a]) : 0.f;
  const float bias_b = bias != nullptr && live_b ? static_cast<float>(bias[row_b]) : 0.f;
#pragma unroll
  for (int e = 0; e < 2; ++e) {  // x rows 2t and 2t + 1
    const int xm = 2 * t + e;
    if (xm >= m) break;
    if (SILU) {
      const float gate = acc[e] + bias_a, up = acc[2 + e] + bias_b;
      if (live_a) out[xm * ldo + row_a] = Half<T>::out(gate / (1.0f + __expf(-gate)) * up);
    } else {
      if (live_a) out[xm * ldo + row_a] = Half<T>::out(acc[e] + bias_a);
      if (live_b) out[xm * ldo + row_b] = Half<T>::out(acc[2 + e] + bias_b);
    }
  }
}

// ---- host launch ----

template <typename T>
using Kernel = void (*)(const T*, long long, int, const uint8_t*, long long, const __half*, long long, const uint8_t*,
                        long long, const T*, T*, long long, int, int, int);

template <typename T, int W, bool S>
Kernel<T> pick(bool per_chunk, bool exact) {
  if (per_chunk) return exact ? mma_kernel<T, W, S, true, true> : mma_kernel<T, W, S, true, false>;
  return exact ? mma_kernel<T, W, S, false, true> : mma_kernel<T, W, S, false, false>;
}

int sm_count() {  // of the current device, read once
  static int sms = 0;
  if (sms == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev))
      sms = 0;
  }
  return sms;
}

template <typename T>
cudaError_t launch(const void* x, long long ldx, int m, const void* q, long long ldq, const void* scale,
                   long long lds, const void* zero, long long ldz, const void* bias, void* out, long long ldo,
                   int n_out, int k, int group, int silu, int pdl, cudaStream_t stream) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  const int rows = silu ? 8 : 16;
  const int tiles = (n_out + rows - 1) / rows;
  // 8 warps a block split K while the tiles fit one wave of such blocks; past it, 4 (a partial second wave of 8-warp
  // blocks leaves most SMs idle)
  const int warps = tiles <= kWarpsPerSm / 8 * sm_count() ? 8 : 4;
  const bool per_chunk = group == kChunk, exact = (k / kChunk) % (warps * kUnroll) == 0;
  config.gridDim = dim3(tiles);
  config.blockDim = dim3(warps * 32);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  const Kernel<T> kernel = warps == 4
                              ? (silu ? pick<T, 4, true>(per_chunk, exact) : pick<T, 4, false>(per_chunk, exact))
                              : (silu ? pick<T, 8, true>(per_chunk, exact) : pick<T, 8, false>(per_chunk, exact));
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, static_cast<const T*>(x), ldx, m,
                                             static_cast<const uint8_t*>(q), ldq, static_cast<const __half*>(scale),
                                             lds, static_cast<const uint8_t*>(zero), ldz, static_cast<const T*>(bias),
                                             static_cast<T*>(out), ldo, n_out, k, group);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 bf16, 1 fp16.  m: rows of x (1 to 8); n_out: output features (with silu, half the weight's rows).  pdl:
// launch with programmatic dependent launch (sm_90 and newer).  Returns a cudaError_t.
extern "C" int nvl_w4a16_mma(const void* x, long long ldx, int m, const void* q, long long ldq, const void* scale,
                             long long lds, const void* zero, long long ldz, const void* bias, void* out,
                             long long ldo, int n_out, int k, int group, int silu, int dtype, int pdl, void* stream) {
  if (m < 1 || m > 8 || k % kChunk != 0 || (group % kChunk != 0 && group < k)) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return launch<__nv_bfloat16>(x, ldx, m, q, ldq, scale, lds, zero, ldz, bias, out, ldo, n_out, k, group, silu,
                                 pdl, s);
  return launch<__half>(x, ldx, m, q, ldq, scale, lds, zero, ldz, bias, out, ldo, n_out, k, group, silu, pdl, s);
}
