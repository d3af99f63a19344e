// The e4m3 weight format of the tensor-core kernels (w8a16_mma.cu: dense rows; w8a16_moe.cu: grouped experts): a
// lane's view of its two weight rows, one chunk of their codes and scales, the codes as mma fragments.
//
// Lane (r, t) holds 32 columns (32t .. 32t + 31) of weight rows r (wa) and r + 8 (wb), a byte a code.  Word s of
// them holds columns 4s .. 4s + 3, and k16 step s takes them: the A pairs (4s, 4s + 1) and (4s + 2, 4s + 3) straight
// from its bytes, the B pairs from x's words 2s and 2s + 1 (x in its own column order: no regrouping).  e4m3 becomes
// fp16 exactly (cvt), and bf16 exactly through fp32; scales are float32, one a row and group.
#pragma once
#include <cuda_fp8.h>

#include "w4a16_common.cuh"

namespace {

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

// the A fragments of a chunk's eight k16 steps
template <typename T>
__device__ __forceinline__ void weight_fragments8(const Chunk8& ch, uint32_t (&a)[8][4]) {
  const uint32_t ra[8] = {ch.wa[0].x, ch.wa[0].y, ch.wa[0].z, ch.wa[0].w, ch.wa[1].x, ch.wa[1].y, ch.wa[1].z,
                          ch.wa[1].w};
  const uint32_t rb[8] = {ch.wb[0].x, ch.wb[0].y, ch.wb[0].z, ch.wb[0].w, ch.wb[1].x, ch.wb[1].y, ch.wb[1].z,
                          ch.wb[1].w};
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    a[s][0] = fp8_pair<T>(ra[s], 0);
    a[s][1] = fp8_pair<T>(rb[s], 0);
    a[s][2] = fp8_pair<T>(ra[s], 1);
    a[s][3] = fp8_pair<T>(rb[s], 1);
  }
}

// the fp32 sums of a chunk into d (rows r, r + 8 against x rows 2t, 2t + 1) from its fragments and x's 32 columns;
// kSplit: the odd steps sum apart and join d at the end, two chains of 4 mma's rather than one of 8
template <typename T, bool kSplit = false>
__device__ __forceinline__ void chunk_mma8(float (&d)[4], const uint32_t (&a)[8][4], const uint4 (&xv)[4]) {
  const uint32_t xw[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                           xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
  float odd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const uint32_t b[2] = {xw[2 * s], xw[2 * s + 1]};
    Half<T>::mma(kSplit && (s & 1) ? odd : d, a[s], b);
  }
  if (kSplit) {
#pragma unroll
    for (int j = 0; j < 4; ++j) d[j] += odd[j];
  }
}

// d = a chunk's unscaled sums against x's words (few_rows.cuh's chunk product for e4m3 weights)
template <typename T>
__device__ __forceinline__ void chunk_product(float (&d)[4], const Chunk8& ch, const uint4 (&xv)[4]) {
  const uint32_t ra[8] = {ch.wa[0].x, ch.wa[0].y, ch.wa[0].z, ch.wa[0].w, ch.wa[1].x, ch.wa[1].y, ch.wa[1].z,
                          ch.wa[1].w};
  const uint32_t rb[8] = {ch.wb[0].x, ch.wb[0].y, ch.wb[0].z, ch.wb[0].w, ch.wb[1].x, ch.wb[1].y, ch.wb[1].z,
                          ch.wb[1].w};
  const uint32_t xw[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                           xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
#pragma unroll
  for (int s = 0; s < 8; ++s) {  // each step's codes converted beside its mma
    const uint32_t a[4] = {fp8_pair<T>(ra[s], 0), fp8_pair<T>(rb[s], 0), fp8_pair<T>(ra[s], 1),
                           fp8_pair<T>(rb[s], 1)};
    const uint32_t b[2] = {xw[2 * s], xw[2 * s + 1]};
    Half<T>::mma(d, a, b);
  }
}

}  // namespace
