// One-row w4a16 projection: out[n] = sum_k x[k] * (q[n, k] - zero[n, g]) * scale[n, g], g = k / group, in CUDA.
//
// Contract (checked by nanovllm/kernels/cuda_w4a16.py before the call): x is one bf16 or fp16 row of K; q is uint8
// [N, K / 2], two codes a byte (column 2b in the low nibble, 2b + 1 in the high), rows 16-byte aligned; scale fp16
// and zero uint8 are [N, groups]; K % 32 == 0 and (group % 32 == 0 or group >= K).  With silu_mul the weight packs
// [gate; up] (N = 2 * n_out) and the output is silu(gate) * up.  bias (or null) has N entries.
//
// Each warp owns ROWS weight rows; lane L reads 16 bytes (32 codes, one group) of every row at a time, a warp 512
// contiguous bytes.  A code becomes an exact float with one LOP3: (word & 0xF << 4i) | 0x4B000000 is 2^23 + q * 16^i,
// so subtracting 2^23 + zero * 16^i leaves (q - zero) * 16^i exactly; the four shifts i = 0..3 keep sums of their
// own, scaled by 16^-i at the end (exact).  Products and sums are fp32, the weight is never rounded.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace {

constexpr int kWarps = 4;
constexpr int kUnroll = 4;
constexpr float kMagic = 8388608.0f;  // 2^23

__device__ __forceinline__ float code(uint32_t word, uint32_t mask, float base) {
  return __uint_as_float((word & mask) | 0x4B000000u) - base;
}

template <bool BF16>
__device__ __forceinline__ void load_x(const void* x, int col, float (&xf)[32]) {
  const uint4* src = reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(x) + col);
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    uint4 p = __ldg(src + v);
    uint32_t w[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (BF16) {
        xf[8 * v + 2 * j] = __uint_as_float(w[j] << 16);
        xf[8 * v + 2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
      } else {
        float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
        xf[8 * v + 2 * j] = f.x;
        xf[8 * v + 2 * j + 1] = f.y;
      }
    }
  }
}

// sum over the lane's 32 codes of (q - zero) * x, before the group's scale
__device__ __forceinline__ float dot32(uint4 packed, uint32_t zero, const float (&xf)[32]) {
  const float z = static_cast<float>(zero);
  const float base[4] = {kMagic + z, kMagic + z * 16.0f, kMagic + z * 256.0f, kMagic + z * 4096.0f};
  float p[4] = {0.f, 0.f, 0.f, 0.f};
  uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t lo = words[j], hi = words[j] >> 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      p[i] = fmaf(code(lo, 0xFu << (4 * i), base[i]), xf[8 * j + i], p[i]);
      p[i] = fmaf(code(hi, 0xFu << (4 * i), base[i]), xf[8 * j + 4 + i], p[i]);
    }
  }
  return p[0] + p[1] * 0.0625f + p[2] * 0.00390625f + p[3] * 0.000244140625f;
}

template <typename T>
__device__ __forceinline__ T to_out(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half to_out<__half>(float v) { return __float2half(v); }

// Programmatic dependent launch (nanovllm/kernels/pdl.py's protocol): wait for the previous kernel and its writes,
// then let the next one launch.  Before waiting, only the weight (which no kernel writes) is touched.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

template <typename T, int ROWS, bool SILU, bool PDL>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ q,
                                                          const __half* __restrict__ scale,
                                                          const uint8_t* __restrict__ zero, const T* __restrict__ bias,
                                                          T* __restrict__ out, int n_out, int k, long long ldq,
                                                          long long lds, long long ldz, int group) {
  constexpr int kOuts = SILU ? ROWS / 2 : ROWS;  // outputs a warp writes
  const int lane = threadIdx.x & 31;
  const int first = (blockIdx.x * kWarps + threadIdx.x / 32) * kOuts;
  long long row[ROWS];
  bool live[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int o = first + (SILU ? r % kOuts : r);
    live[r] = o < n_out;
    row[r] = live[r] ? (SILU && r >= kOuts ? o + n_out : o) : 0;
  }
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    acc[r] = 0.f;
    // the first stride's weight bytes start on their way to L2 while the previous kernel finishes
    if (lane * 32 < k) asm volatile("prefetch.global.L2 [%0];" ::"l"(q + row[r] * ldq + lane * 16));
  }
  if (PDL) pdl_begin();
  // kUnroll strides of 1,024 columns at a time: every row's 16-byte loads of all of them are issued before the
  // first is used, so a lane has kUnroll * ROWS loads in flight
  for (int start = lane * 32; start < k; start += kUnroll * 32 * 32) {
    uint4 packed[kUnroll][ROWS];
    float scales[kUnroll][ROWS];
    uint32_t zeros[kUnroll][ROWS];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int col = start + u * 32 * 32;
      const int g = col / group;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const bool in = col < k;
        packed[u][r] = in ? __ldcs(reinterpret_cast<const uint4*>(q + row[r] * ldq + col / 2)) : uint4{};
        scales[u][r] = in ? __half2float(scale[row[r] * lds + g]) : 0.f;
        zeros[u][r] = in ? zero[row[r] * ldz + g] : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int col = start + u * 32 * 32;
      if (col >= k) break;
      float xf[32];
      load_x<std::is_same<T, __nv_bfloat16>::value>(x, col, xf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] = fmaf(dot32(packed[u][r], zeros[u][r], xf), scales[u][r], acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xFFFFFFFFu, acc[r], off);
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < kOuts; ++r) {
    if (!live[r]) continue;
    float v = acc[r];
    if (bias != nullptr) v += static_cast<float>(bias[row[r]]);
    if (SILU) {
      float up = acc[r + kOuts];
      if (bias != nullptr) up += static_cast<float>(bias[row[r + kOuts]]);
      v = v / (1.0f + __expf(-v)) * up;
    }
    out[first + r] = to_out<T>(v);
  }
}

template <typename T>
cudaError_t launch(const void* x, const void* q, const void* scale, const void* zero, const void* bias, void* out,
                   int n_out, int k, long long ldq, long long lds, long long ldz, int group, int silu, int rows,
                   int pdl, cudaStream_t stream) {
  const auto* xt = static_cast<const T*>(x);
  const auto* qt = static_cast<const uint8_t*>(q);
  const auto* st = static_cast<const __half*>(scale);
  const auto* zt = static_cast<const uint8_t*>(zero);
  const auto* bt = static_cast<const T*>(bias);
  auto* ot = static_cast<T*>(out);
  const int outs = silu ? rows / 2 : rows;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((n_out + kWarps * outs - 1) / (kWarps * outs));
  config.blockDim = dim3(kWarps * 32);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
#define NVL_GEMV(R, S)                                                                                             \
  (pdl ? cudaLaunchKernelEx(&config, gemv_kernel<T, R, S, true>, xt, qt, st, zt, bt, ot, n_out, k, ldq, lds, ldz,    \
                            group)                                                                                 \
       : cudaLaunchKernelEx(&config, gemv_kernel<T, R, S, false>, xt, qt, st, zt, bt, ot, n_out, k, ldq, lds, ldz,   \
                            group))
  cudaError_t err;
  if (silu && rows == 4) err = NVL_GEMV(4, true);
  else if (silu && rows == 2) err = NVL_GEMV(2, true);
  else if (!silu && rows == 4) err = NVL_GEMV(4, false);
  else if (!silu && rows == 2) err = NVL_GEMV(2, false);
  else if (!silu && rows == 1) err = NVL_GEMV(1, false);
  else return cudaErrorInvalidValue;
#undef NVL_GEMV
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 bf16, 1 fp16.  rows: weight rows a warp owns (1, 2 or 4; 2 or 4 with silu).  pdl: launch with
// programmatic dependent launch (sm_90 and newer).  Returns a cudaError_t.
extern "C" int nvl_w4a16_gemv(const void* x, const void* q, const void* scale, const void* zero, const void* bias,
                              void* out, int n_out, int k, long long ldq, long long lds, long long ldz, int group,
                              int silu, int dtype, int rows, int pdl, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return launch<__nv_bfloat16>(x, q, scale, zero, bias, out, n_out, k, ldq, lds, ldz, group, silu, rows, pdl, s);
  return launch<__half>(x, q, scale, zero, bias, out, n_out, k, ldq, lds, ldz, group, silu, rows, pdl, s);
}
