// Grouped int4 experts on the tensor cores: moe_grouped.cuh's kernel with int4 weights.
//
// Contract (checked by nanovllm/kernels/cuda_moe.py): bf16 or fp16 x / inter rows, 16-byte aligned, with blocks of
// more than 8 slots permuted in each 8 columns (column 8i + j at 8i + 2(j % 4) + j / 4: the order the mma pairs them
// in, so the kernel regroups no x; cuda_moe.permute_columns, and the up GEMM writes inter so); q uint8
// [E, N, K / 2] (two codes a byte, column 2b in the low nibble), rows 16-byte aligned; scale fp16 and zero uint8
// [E, N, groups]; K % 128 == 0 and (group % 128 == 0 or group >= K).  Each chunk's codes are dequantized once for
// the S sub-blocks (w4a16_common.cuh: the lane layout).
#include "moe_grouped.cuh"

namespace {

struct Int4 {
  using Scale = __half;
  using Chunk = ::Chunk;
  static constexpr bool kPermutes = true;  // past one sub-block: two mma chains on permuted x (H200: faster)
  static constexpr bool kFp16X = false;  // int4 codes are exact in bf16 too: x as the model gives it
  static constexpr int kUnroll = 4;
  // S = 4 (decode batches of a few hundred tokens): 4 blocks an SM caps the kernel at 128 registers (151 uncapped:
  // 3 blocks), with at most 32 bytes of spill, and the H200 lab timed it faster; S = 8 spills ~0.5 KB under that cap
  // and was slower, S = 2 timed the same either way.  An explicit 1 elsewhere changes ptxas's choice and was slower
  static constexpr int kBlocksAtS4 = 4;
  static __device__ __forceinline__ LaneRows rows(const uint8_t* q, long long ldq, const __half* scale, long long lds,
                                                  const uint8_t* zero, long long ldz, long long row_a,
                                                  long long row_b, int t) {
    return LaneRows(q, ldq, scale, lds, zero, ldz, row_a, row_b, t);
  }
  template <typename T>
  static __device__ __forceinline__ void fragments(const Chunk& ch, uint32_t (&a)[8][4]) {
    weight_fragments<T>(ch, a);
  }
  template <typename T, int S>
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[8][4], const uint4 (&xv)[4]) {
    chunk_mma<T, (S > 1), (S > 1)>(d, a, xv);
  }
};

}  // namespace

// nvl_w4a16_moe: moe_grouped.cuh's moe_entry for int4 weights
NVL_MOE_ENTRY(w4a16_moe, Int4)
