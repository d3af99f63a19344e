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
// r + 8 and of x row r (fp8_rows.cuh: the lane's codes, exact in fp16 and bf16); the tensor cores sum in fp32, times
// the group's scale in fp32.
#include "few_rows.cuh"
#include "fp8_rows.cuh"

namespace {

constexpr int kUnroll8 = 2;  // chunks a warp loads before using the first: 64 bytes a lane each, int4's 4 x 32
constexpr int kWarpsPerSm8 = 16;  // the registers' budget: 128 a thread

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
