// Few-row FP8 weight-only projection on the tensor cores: out[m, n] = sum_k x[m, k] * w[n, k] * scale[n, k / group],
// for m < M <= 8, in CUDA (nanovllm/kernels/weight_quant.py's format).
//
// Contract (checked by nanovllm/kernels/cuda_w8a16.py before the call): x is M <= 8 bf16 or fp16 rows of K (rows
// 16-byte aligned); w is e4m3 bytes [N, K], rows 16-byte aligned; scale is float32 [N, groups]; K % 128 == 0 and
// (group % 128 == 0 or group >= K).  With silu_mul the weight packs [gate; up] (N = 2 * n_out) and the output is
// silu(gate) * up.  bias (or null) has N entries.  The weight is read in place: no repacked copy.
//
// The layout is w4a16_mma.cu's: one block owns 16 weight rows (with silu_mul 8 gate rows and their 8 up rows), its
// warps split K in chunks of 128 columns, and lane (r, t) holds 32 columns (32t .. 32t + 31) of weight rows r and
// r + 8 and of x row r.  With a byte a code, a lane's columns are eight words: word s holds columns 4s .. 4s + 3, and
// k16 step s takes them, the A pairs (4s, 4s + 1) and (4s + 2, 4s + 3) straight from its bytes and the B pairs from
// x's words 2s and 2s + 1, so x needs no regrouping.  e4m3 becomes fp16 exactly (cvt), and bf16 exactly through
// fp32; the tensor cores sum in fp32, times the group's scale in fp32.
#include <cuda_fp8.h>

#include "few_rows.cuh"

namespace {

constexpr int kUnroll8 = 2;  // chunks a warp loads before using the first: 64 bytes a lane each, int4's 4 x 32
constexpr int kWarpsPerSm8 = 16;  // the registers' budget: 128 a thread

// bytes 2h and 2h + 1 of a word of e4m3 codes as the pair of T (the low byte in the low half)
template <typename T>
__device__ __forceinline__ uint32_t fp8_pair(uint32_t word, int h) {
  const auto codes = static_cast<__nv_fp8x2_storage_t>(h ? word >> 16 : word & 0xFFFFu);
  __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(codes, __NV_E4M3);
  if constexpr (Half<T>::kBf16) {
    const float2 f = __half22float2(*reinterpret_cast<__half2*>(&raw));
    __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return *reinterpret_cast<uint32_t*>(&b);
  } else {
    return *reinterpret_cast<uint32_t*>(&raw);
  }
}

// a lane's part of one chunk: 32 codes of rows r (wa) and r + 8 (wb), and their groups' scales
struct Chunk8 {
  uint4 wa[2], wb[2];
  float sa, sb;
};

struct LaneRows8 {
  const uint8_t *qa, *qb;
  const float *sa, *sb;
  __device__ __forceinline__ LaneRows8(const uint8_t* q, long long ldq, const float* scale, long long lds,
                                       long long row_a, long long row_b, int t)
      : qa(q + row_a * ldq + t * 32), qb(q + row_b * ldq + t * 32), sa(scale + row_a * lds), sb(scale + row_b * lds) {}
  __device__ __forceinline__ void prefetch(int c) const {  // chunk c's codes towards L2
    asm volatile("prefetch.global.L2 [%0];" ::"l"(qa + c * kChunk));
    asm volatile("prefetch.global.L2 [%0];" ::"l"(qb + c * kChunk));
  }
  // chunk c, of scale group g; zeros where !in (nothing is read)
  __device__ __forceinline__ Chunk8 load(int c, int g, bool in) const {
    const uint4* a = reinterpret_cast<const uint4*>(qa + c * kChunk);
    const uint4* b = reinterpret_cast<const uint4*>(qb + c * kChunk);
    Chunk8 k;
    k.wa[0] = in ? __ldcs(a) : uint4{};
    k.wa[1] = in ? __ldcs(a + 1) : uint4{};
    k.wb[0] = in ? __ldcs(b) : uint4{};
    k.wb[1] = in ? __ldcs(b + 1) : uint4{};
    k.sa = in ? sa[g] : 0.f;
    k.sb = in ? sb[g] : 0.f;
    return k;
  }
};

// the fp32 sums of a chunk into d (rows r, r + 8 against x rows 2t, 2t + 1): few_rows.cuh's chunk product for e4m3
template <typename T>
__device__ __forceinline__ void chunk_product(float (&d)[4], const Chunk8& ch, const uint4 (&xv)[4]) {
  const uint32_t ra[8] = {ch.wa[0].x, ch.wa[0].y, ch.wa[0].z, ch.wa[0].w, ch.wa[1].x, ch.wa[1].y, ch.wa[1].z,
                          ch.wa[1].w};
  const uint32_t rb[8] = {ch.wb[0].x, ch.wb[0].y, ch.wb[0].z, ch.wb[0].w, ch.wb[1].x, ch.wb[1].y, ch.wb[1].z,
                          ch.wb[1].w};
  const uint32_t xw[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                           xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const uint32_t a[4] = {fp8_pair<T>(ra[s], 0), fp8_pair<T>(rb[s], 0), fp8_pair<T>(ra[s], 1),
                           fp8_pair<T>(rb[s], 1)};
    const uint32_t b[2] = {xw[2 * s], xw[2 * s + 1]};
    Half<T>::mma(d, a, b);
  }
}

template <typename T, int kWarps, bool SILU, bool kPerChunk, bool kExact>
__global__ void __launch_bounds__(kWarps * 32, kWarpsPerSm8 / kWarps)
    mma8_kernel(const T* __restrict__ x, long long ldx, int m, const uint8_t* __restrict__ q, long long ldq,
                const float* __restrict__ scale, long long lds, const T* __restrict__ bias, T* __restrict__ out,
                long long ldo, int n_out, int k, int group) {
  const Tile<T, SILU> tile(x, ldx, m, n_out);
  const LaneRows8 w(q, ldq, scale, lds, tile.live_a ? tile.row_a : 0, tile.live_b ? tile.row_b : 0, tile.t);
  float acc[4];
  lane_sums<T, kWarps, kUnroll8, kPerChunk, kExact>(acc, w, tile.xr, tile.x_live, k, group);
  finish_tile<T, kWarps, SILU>(acc, m, bias, out, ldo, tile.row_a, tile.row_b, tile.live_a, tile.live_b);
}

// ---- host launch ----

template <typename T>
using Kernel8 = void (*)(const T*, long long, int, const uint8_t*, long long, const float*, long long, const T*, T*,
                         long long, int, int, int);

template <typename T, int W, bool S>
Kernel8<T> pick8(bool per_chunk, bool exact) {
  if (per_chunk) return exact ? mma8_kernel<T, W, S, true, true> : mma8_kernel<T, W, S, true, false>;
  return exact ? mma8_kernel<T, W, S, false, true> : mma8_kernel<T, W, S, false, false>;
}

template <typename T>
cudaError_t launch8(const void* x, long long ldx, int m, const void* q, long long ldq, const void* scale,
                    long long lds, const void* bias, void* out, long long ldo, int n_out, int k, int group, int silu,
                    int pdl, cudaStream_t stream) {
  const int rows = silu ? 8 : 16;
  const int tiles = (n_out + rows - 1) / rows, warps = warps_for(tiles, kWarpsPerSm8);
  const bool per_chunk = group == kChunk, exact = (k / kChunk) % (warps * kUnroll8) == 0;
  const Kernel8<T> kernel = warps == 4
                               ? (silu ? pick8<T, 4, true>(per_chunk, exact) : pick8<T, 4, false>(per_chunk, exact))
                               : (silu ? pick8<T, 8, true>(per_chunk, exact) : pick8<T, 8, false>(per_chunk, exact));
  return launch_tiles(kernel, tiles, warps, pdl, stream, x, ldx, m, q, ldq, scale, lds, bias, out, ldo, n_out, k,
                      group);
}

}  // namespace

// dtype: 0 bf16, 1 fp16.  m: rows of x (1 to 8); n_out: output features (with silu, half the weight's rows); group:
// columns a scale (at most K).  pdl: launch with programmatic dependent launch (sm_90 and newer).  A cudaError_t.
extern "C" int nvl_w8a16_mma(const void* x, long long ldx, int m, const void* q, long long ldq, const void* scale,
                             long long lds, const void* bias, void* out, long long ldo, int n_out, int k, int group,
                             int silu, int dtype, int pdl, void* stream) {
  if (m < 1 || m > 8 || k % kChunk != 0 || group > k || (group % kChunk != 0 && group < k))
    return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return launch8<__nv_bfloat16>(x, ldx, m, q, ldq, scale, lds, bias, out, ldo, n_out, k, group, silu, pdl, s);
  return launch8<__half>(x, ldx, m, q, ldq, scale, lds, bias, out, ldo, n_out, k, group, silu, pdl, s);
}
