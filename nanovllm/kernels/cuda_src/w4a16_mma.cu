// Few-row w4a16 projection on the tensor cores: out[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, g]) * scale[n, g],
// g = k / group, for m < M <= 8, in CUDA.
//
// Contract (checked by nanovllm/kernels/cuda_w4a16.py before the call): x is M <= 8 bf16 or fp16 rows of K (rows
// 16-byte aligned); q is uint8 [N, K / 2], two codes a byte (column 2b in the low nibble, 2b + 1 in the high), rows
// 16-byte aligned; scale fp16 and zero uint8 are [N, groups]; K % 128 == 0 and (group % 128 == 0 or group >= K).
// With silu_mul the weight packs [gate; up] (N = 2 * n_out) and the output is silu(gate) * up.  bias (or null) has
// N entries.  The weight is read in place (the layout the Triton kernels read): no repacked copy.
//
// One block owns a tile of 16 weight rows (with silu_mul 8 gate rows and their 8 up rows) and its warps split K in
// chunks of 128 columns.  In a chunk, lane (r, t) (r = lane / 4, t = lane % 4) reads 16 bytes of rows r and r + 8
// (columns 32t .. 32t + 31) and the same 32 columns of x row r: the reduction order inside mma.m16n8k16 is free, so
// each lane's operands are its own contiguous columns.  A byte word's codes come out as exact 16-bit floats in pairs,
// (word >> s & 0x000F000F) | magic, minus the zero's magic value; x is regrouped to the same pairs with PRMT.  The
// tensor cores sum each chunk in fp32, times the group's scale in fp32: the weight is never rounded.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kUnroll = 4;  // chunks a warp loads before using the first
constexpr int kManyTiles = 1024;  // from this many tiles on, 4 warps a block split K, else 8 (the H200's best)
constexpr int kChunk = 128;  // columns of a chunk: one scale group at most

template <typename T>
struct Half;
template <>
struct Half<__nv_bfloat16> {  // 0x4300 is 128.0: 128 + q exactly for q < 16
  static constexpr uint32_t kMagic = 0x43004300u;
  static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __nv_bfloat16 out(float v) { return __float2bfloat16(v); }
};
template <>
struct Half<__half> {  // 0x6400 is 1024.0: 1024 + q exactly
  static constexpr uint32_t kMagic = 0x64006400u;
  static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __half out(float v) { return __float2half(v); }
};

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// codes (k + s/4, k + 4 + s/4) of an 8-code word as two exact 16-bit floats, less the zero
template <typename T, int S>
__device__ __forceinline__ uint32_t pair(uint32_t word, uint32_t zero2) {
  return Half<T>::sub(((word >> S) & 0x000F000Fu) | Half<T>::kMagic, zero2);
}

// one chunk: the lane's 32 columns of rows r (wa) and r + 8 (wb) against x's (xw, 16 words of two), fp32 sums of
// (row r, x rows 2t and 2t + 1) in d[0..1] and of row r + 8 in d[2..3]
template <typename T>
__device__ __forceinline__ void chunk(const uint4& wa, const uint4& wb, const uint4 (&xv)[4], uint32_t za,
                                      uint32_t zb, float (&d)[4]) {
  const uint32_t a[4] = {wa.x, wa.y, wa.z, wa.w}, b[4] = {wb.x, wb.y, wb.z, wb.w};
  const uint32_t xw[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                           xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // word i: columns 8i .. 8i + 7 of the lane's 32
    const uint32_t x0 = xw[4 * i], x1 = xw[4 * i + 1], x2 = xw[4 * i + 2], x3 = xw[4 * i + 3];
    const uint32_t lo[4] = {pair<T, 0>(a[i], za), pair<T, 0>(b[i], zb), pair<T, 4>(a[i], za), pair<T, 4>(b[i], zb)};
    Half<T>::mma(d, lo, prmt(x0, x2, 0x5410), prmt(x0, x2, 0x7632));  // columns (0, 4), (1, 5)
    const uint32_t hi[4] = {pair<T, 8>(a[i], za), pair<T, 8>(b[i], zb), pair<T, 12>(a[i], za),
                            pair<T, 12>(b[i], zb)};
    Half<T>::mma(d, hi, prmt(x1, x3, 0x5410), prmt(x1, x3, 0x7632));  // columns (2, 6), (3, 7)
  }
}

// Programmatic dependent launch (nanovllm/kernels/pdl.py's protocol): wait for the previous kernel and its writes,
// then let the next one launch.  Before waiting, only the weight (which no kernel writes) is touched.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

template <typename T, int kWarps, bool SILU, bool PDL>
__global__ void __launch_bounds__(kWarps * 32)
    mma_kernel(const T* __restrict__ x, long long ldx, int m, const uint8_t* __restrict__ q, long long ldq,
               const __half* __restrict__ scale, long long lds, const uint8_t* __restrict__ zero, long long ldz,
               const T* __restrict__ bias, T* __restrict__ out, long long ldo, int n_out, int k, int group) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, t = lane & 3;
  const int row_a = SILU ? blockIdx.x * 8 + r : blockIdx.x * 16 + r;  // the output rows (features) of the lane
  const int row_b = SILU ? row_a + n_out : row_a + 8;
  const bool live_a = row_a < n_out, live_b = SILU ? live_a : row_b < n_out;
  const long long wa_row = live_a ? row_a : 0, wb_row = live_b ? row_b : 0;
  const uint8_t* qa = q + wa_row * ldq + t * 16;
  const uint8_t* qb = q + wb_row * ldq + t * 16;
  const bool x_live = r < m;
  const T* xr = x + (x_live ? r : 0) * ldx + t * 32;
  const int chunks = k / kChunk;
  if (warp < chunks) {  // the first chunk's weight starts on its way to L2 while the previous kernel finishes
    asm volatile("prefetch.global.L2 [%0];" ::"l"(qa + warp * (kChunk / 2)));
    asm volatile("prefetch.global.L2 [%0];" ::"l"(qb + warp * (kChunk / 2)));
  }
  if (PDL) pdl_begin();
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int first = warp; first < chunks; first += kWarps * kUnroll) {
    uint4 wa[kUnroll], wb[kUnroll], xv[kUnroll][4];
    float sa[kUnroll], sb[kUnroll];
    uint32_t za[kUnroll], zb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + u * kWarps;
      const bool in = c < chunks;
      const int col = c * kChunk, g = col / group;
      wa[u] = in ? __ldcs(reinterpret_cast<const uint4*>(qa + col / 2)) : uint4{};
      wb[u] = in ? __ldcs(reinterpret_cast<const uint4*>(qb + col / 2)) : uint4{};
#pragma unroll
      for (int v = 0; v < 4; ++v)
        xv[u][v] = in && x_live ? __ldg(reinterpret_cast<const uint4*>(xr + col) + v) : uint4{};
      sa[u] = in ? __half2float(scale[wa_row * lds + g]) : 0.f;
      sb[u] = in ? __half2float(scale[wb_row * lds + g]) : 0.f;
      za[u] = in ? zero[wa_row * ldz + g] : 0u;
      zb[u] = in ? zero[wb_row * ldz + g] : 0u;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (first + u * kWarps >= chunks) break;
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      chunk<T>(wa[u], wb[u], xv[u], (Half<T>::kMagic & 0xFFFFu | za[u]) * 0x10001u,
               (Half<T>::kMagic & 0xFFFFu | zb[u]) * 0x10001u, d);
      acc[0] = fmaf(d[0], sa[u], acc[0]);
      acc[1] = fmaf(d[1], sa[u], acc[1]);
      acc[2] = fmaf(d[2], sb[u], acc[2]);
      acc[3] = fmaf(d[3], sb[u], acc[3]);
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
cudaError_t launch(const void* x, long long ldx, int m, const void* q, long long ldq, const void* scale,
                   long long lds, const void* zero, long long ldz, const void* bias, void* out, long long ldo,
                   int n_out, int k, int group, int silu, int pdl, cudaStream_t stream) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  const int rows = silu ? 8 : 16;
  const int tiles = (n_out + rows - 1) / rows;
  const int warps = tiles >= kManyTiles ? 4 : 8;
  config.gridDim = dim3(tiles);
  config.blockDim = dim3(warps * 32);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  const auto* xt = static_cast<const T*>(x);
  const auto* qt = static_cast<const uint8_t*>(q);
  const auto* st = static_cast<const __half*>(scale);
  const auto* zt = static_cast<const uint8_t*>(zero);
  const auto* bt = static_cast<const T*>(bias);
  auto* ot = static_cast<T*>(out);
#define NVL_MMA(W, S, P) \
  cudaLaunchKernelEx(&config, mma_kernel<T, W, S, P>, xt, ldx, m, qt, ldq, st, lds, zt, ldz, bt, ot, ldo, n_out, k, \
                     group)
#define NVL_MMA_W(S, P) (warps == 4 ? NVL_MMA(4, S, P) : NVL_MMA(8, S, P))
  cudaError_t err = silu ? (pdl ? NVL_MMA_W(true, true) : NVL_MMA_W(true, false))
                         : (pdl ? NVL_MMA_W(false, true) : NVL_MMA_W(false, false));
#undef NVL_MMA_W
#undef NVL_MMA
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
