// What the int4 tensor-core kernels share (w4a16_mma.cu: dense rows; w4a16_moe.cu: grouped experts): the 16-bit
// float traits, the dequantization of a lane's codes, the regrouping of x, the mma.m16n8k16 of one chunk and its
// scaled sum.
//
// A chunk is 128 columns of 16 weight rows.  Lane (r, t) (r = lane / 4, t = lane % 4) holds 16 bytes of rows r
// (wa) and r + 8 (wb): columns 32t .. 32t + 31, two codes a byte (column 2b in the low nibble, 2b + 1 in the high),
// and the same 32 columns of one x row (xv, 64 bytes).  The reduction order inside an mma is free, so the eight k16
// steps of a chunk take the lane's own columns: step 2i takes columns (8i, 8i + 4) and (8i + 1, 8i + 5) of its 32,
// step 2i + 1 (8i + 2, 8i + 6) and (8i + 3, 8i + 7).  Codes become exact 16-bit floats in pairs,
// (word >> s & 0x000F000F) | magic, minus the zero's magic value (zero2); x is regrouped to the same pairs with PRMT.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kChunk = 128;  // columns of a chunk: one scale group at most

// T is __nv_bfloat16 or __half.  kMagic: 128.0 (0x4300) or 1024.0 (0x6400) twice, so magic + q is exact for q < 16.
template <typename T>
struct Pair {
  using type = __half2;
  static constexpr bool kBf16 = false;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr bool kBf16 = true;
};
template <typename T>
struct Half {
  using T2 = typename Pair<T>::type;
  static constexpr bool kBf16 = Pair<T>::kBf16;
  static constexpr uint32_t kMagic = kBf16 ? 0x43004300u : 0x64006400u;
  static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    T2 r = __hsub2(*reinterpret_cast<T2*>(&a), *reinterpret_cast<T2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (kBf16)
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                   "{%0,%1,%2,%3};"
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                   "{%0,%1,%2,%3};"
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ T out(float v) {
    if constexpr (kBf16)
      return __float2bfloat16(v);
    else
      return __float2half(v);
  }
};

// a zero code z as the pair of 16-bit floats the codes are reduced by (magic + z, twice)
template <typename T>
__device__ __forceinline__ uint32_t zero2(uint32_t z) {
  return (Half<T>::kMagic & 0xFFFFu | z) * 0x10001u;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// codes (s/4, 4 + s/4) of an 8-code word as two exact 16-bit floats, less the zero
template <typename T, int S>
__device__ __forceinline__ uint32_t pair(uint32_t word, uint32_t zero2) {
  uint32_t r;  // one LOP3: C++'s & and | with two immediates compile to two
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(S ? word >> S : word), "n"(0x000F000F), "n"(Half<T>::kMagic));
  return Half<T>::sub(r, zero2);
}

// a lane's part of one chunk: its 16 bytes of codes in rows r (wa) and r + 8 (wb), their scales and zero codes
struct Chunk {
  uint4 wa, wb;
  float sa, sb;
  uint32_t za, zb;
};

// where a lane's two weight rows start (q, scale and zero at the lane's matrix): codes from column 32t on
struct LaneRows {
  const uint8_t *qa, *qb;
  const __half *sa, *sb;
  const uint8_t *za, *zb;
  __device__ __forceinline__ LaneRows(const uint8_t* q, long long ldq, const __half* scale, long long lds,
                                      const uint8_t* zero, long long ldz, long long row_a, long long row_b, int t)
      : qa(q + row_a * ldq + t * 16), qb(q + row_b * ldq + t * 16), sa(scale + row_a * lds),
        sb(scale + row_b * lds), za(zero + row_a * ldz), zb(zero + row_b * ldz) {}
  __device__ __forceinline__ void prefetch(int c) const {  // chunk c's codes towards L2
    asm volatile("prefetch.global.L2 [%0];" ::"l"(qa + c * (kChunk / 2)));
    asm volatile("prefetch.global.L2 [%0];" ::"l"(qb + c * (kChunk / 2)));
  }
  // chunk c, of scale group g; zeros where !in (nothing is read)
  __device__ __forceinline__ Chunk load(int c, int g, bool in) const {
    const int col = c * kChunk;
    Chunk k;
    k.wa = in ? __ldcs(reinterpret_cast<const uint4*>(qa + col / 2)) : uint4{};
    k.wb = in ? __ldcs(reinterpret_cast<const uint4*>(qb + col / 2)) : uint4{};
    k.sa = in ? __half2float(sa[g]) : 0.f;
    k.sb = in ? __half2float(sb[g]) : 0.f;
    k.za = in ? za[g] : 0u;
    k.zb = in ? zb[g] : 0u;
    return k;
  }
};

// the A fragments of a chunk's eight k16 steps, from the lane's words of rows r (wa) and r + 8 (wb)
template <typename T>
__device__ __forceinline__ void weight_fragments(const Chunk& ch, uint32_t (&a)[8][4]) {
  const uint32_t za = zero2<T>(ch.za), zb = zero2<T>(ch.zb);
  const uint32_t ra[4] = {ch.wa.x, ch.wa.y, ch.wa.z, ch.wa.w}, rb[4] = {ch.wb.x, ch.wb.y, ch.wb.z, ch.wb.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    a[2 * i][0] = pair<T, 0>(ra[i], za);
    a[2 * i][1] = pair<T, 0>(rb[i], zb);
    a[2 * i][2] = pair<T, 4>(ra[i], za);
    a[2 * i][3] = pair<T, 4>(rb[i], zb);
    a[2 * i + 1][0] = pair<T, 8>(ra[i], za);
    a[2 * i + 1][1] = pair<T, 8>(rb[i], zb);
    a[2 * i + 1][2] = pair<T, 12>(ra[i], za);
    a[2 * i + 1][3] = pair<T, 12>(rb[i], zb);
  }
}

// the fp32 sums of a chunk into d (rows r, r + 8 against x rows 2t, 2t + 1), x's words regrouped step by step, or
// with kPermuted taken as they are (x's columns stored permuted in each 8: 0, 4, 1, 5, 2, 6, 3, 7).  kSplit: the odd
// k16 steps sum apart and join d at the end, two chains of 4 mma's rather than one of 8
template <typename T, bool kSplit = false, bool kPermuted = false>
__device__ __forceinline__ void chunk_mma(float (&d)[4], const uint32_t (&a)[8][4], const uint4 (&xv)[4]) {
  const uint32_t xw[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                           xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
  float odd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // word i: columns 8i .. 8i + 7 of the lane's 32
    const uint32_t x0 = xw[4 * i], x1 = xw[4 * i + 1], x2 = xw[4 * i + 2], x3 = xw[4 * i + 3];
    const uint32_t lo[2] = {kPermuted ? x0 : prmt(x0, x2, 0x5410), kPermuted ? x1 : prmt(x0, x2, 0x7632)};
    Half<T>::mma(d, a[2 * i], lo);  // columns (0, 4), (1, 5)
    const uint32_t hi[2] = {kPermuted ? x2 : prmt(x1, x3, 0x5410), kPermuted ? x3 : prmt(x1, x3, 0x7632)};
    Half<T>::mma(kSplit ? odd : d, a[2 * i + 1], hi);
  }
  if (kSplit) {
#pragma unroll
    for (int j = 0; j < 4; ++j) d[j] += odd[j];
  }
}

// d = a chunk's unscaled sums against x's words (few_rows.cuh's chunk product for int4 weights)
template <typename T>
__device__ __forceinline__ void chunk_product(float (&d)[4], const Chunk& ch, const uint4 (&xv)[4]) {
  uint32_t a[8][4];
  weight_fragments<T>(ch, a);
  chunk_mma<T>(d, a, xv);
}

// acc += a chunk's sums d times its scales (rows r: sa, r + 8: sb); C: any chunk with float scales sa and sb
template <typename C>
__device__ __forceinline__ void accumulate(float (&acc)[4], const float (&d)[4], const C& ch) {
  acc[0] = fmaf(d[0], ch.sa, acc[0]);
  acc[1] = fmaf(d[1], ch.sa, acc[1]);
  acc[2] = fmaf(d[2], ch.sb, acc[2]);
  acc[3] = fmaf(d[3], ch.sb, acc[3]);
}

// Programmatic dependent launch (nanovllm/kernels/pdl.py's protocol): wait for the previous kernel and its writes,
// then let the next one launch.  A no-op for a launch without the attribute.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

}  // namespace
