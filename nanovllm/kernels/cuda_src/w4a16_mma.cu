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
// (w4a16_common.cuh: the lane layout, the exact dequantization; few_rows.cuh: the walk over K, the block's end).
// The tensor cores sum each chunk in fp32, times the group's scale in fp32: the weight is never rounded.
#include "few_rows.cuh"

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
  const Tile<T, SILU> tile(x, ldx, m, n_out);
  const LaneRows w(q, ldq, scale, lds, zero, ldz, tile.live_a ? tile.row_a : 0, tile.live_b ? tile.row_b : 0, tile.t);
  float acc[4];
  lane_sums<T, kWarps, kUnroll, kPerChunk, kExact>(acc, w, tile.xr, tile.x_live, k, group);
  finish_tile<T, kWarps, SILU>(acc, m, bias, out, ldo, tile.row_a, tile.row_b, tile.live_a, tile.live_b);
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

template <typename T>
cudaError_t launch(const void* x, long long ldx, int m, const void* q, long long ldq, const void* scale,
                   long long lds, const void* zero, long long ldz, const void* bias, void* out, long long ldo,
                   int n_out, int k, int group, int silu, int pdl, cudaStream_t stream) {
  const int rows = silu ? 8 : 16;
  const int tiles = (n_out + rows - 1) / rows, warps = warps_for(tiles, kWarpsPerSm);
  const bool per_chunk = group == kChunk, exact = (k / kChunk) % (warps * kUnroll) == 0;
  const Kernel<T> kernel = warps == 4
                              ? (silu ? pick<T, 4, true>(per_chunk, exact) : pick<T, 4, false>(per_chunk, exact))
                              : (silu ? pick<T, 8, true>(per_chunk, exact) : pick<T, 8, false>(per_chunk, exact));
  return launch_tiles(kernel, tiles, warps, pdl, stream, x, ldx, m, q, ldq, scale, lds, zero, ldz, bias, out, ldo,
                      n_out, k, group);
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
