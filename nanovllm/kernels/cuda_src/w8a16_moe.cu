// Grouped e4m3 experts on the tensor cores, weight-only: moe_grouped.cuh's kernel with FP8 weights.
//
// Contract (checked by nanovllm/kernels/cuda_moe.py): bf16 or fp16 x / inter rows in their own column order (or,
// with fp16_x, fp16 rows of a bf16 model's values / 16), 16-byte aligned; q e4m3 bytes [E, N, K], rows 16-byte
// aligned; scale float32 [E, N, groups] (block-FP8 checkpoints' scales expanded per row); K % 128 == 0 and
// (group % 128 == 0 or group >= K); zero unused.  Each chunk's codes become mma fragments once for the S sub-blocks
// (fp8_rows.cuh: the lane layout, exact in fp16 and bf16).
#include "fp8_rows.cuh"
#include "moe_grouped.cuh"

namespace {

struct Fp8 {
  using Scale = float;
  using Chunk = Chunk8;
  static constexpr bool kPermutes = false;  // x's words pair as they are
  static constexpr bool kFp16X = true;  // bf16 models' x in fp16 (/ 16): e4m3 -> fp16 is one cvt a pair
  static constexpr int kUnroll = 2;  // chunks a warp loads before using the first: 64 bytes a lane each (3, 4: slower)
  // a minimum of 4 blocks an SM at S = 4 (the kernels fit 128 registers without it too; ptxas schedules them apart):
  // H200 lab, 192 / 256 / 512 tokens, bit for bit, 197.8 / 211.2 / 310.1 us a layer against 222.1 / 235.8 / 336.8
  static constexpr int kBlocksAtS4 = 4;
  static __device__ __forceinline__ LaneRows8 rows(const uint8_t* q, long long ldq, const float* scale, long long lds,
                                                   const uint8_t*, long long, long long row_a, long long row_b,
                                                   int t) {
    return LaneRows8(q, ldq, scale, lds, row_a, row_b, t);
  }
  template <typename T>
  static __device__ __forceinline__ void fragments(const Chunk8& ch, uint32_t (&a)[8][4]) {
    weight_fragments8<T>(ch, a);
  }
  template <typename T, int S>
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[8][4], const uint4 (&xv)[4]) {
    chunk_mma8<T, (S > 1)>(d, a, xv);
  }
};

}  // namespace

// nvl_w8a16_moe: moe_grouped.cuh's moe_entry for e4m3 weights (zero and its strides ignored)
NVL_MOE_ENTRY(w8a16_moe, Fp8)
