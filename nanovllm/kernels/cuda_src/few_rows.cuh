// What the dense few-row projections share (w4a16_mma.cu: int4 weights; w8a16_mma.cu: e4m3 weights): a lane's place
// in its tile, its walk over K, the end of a block, which sums its warps' partial products and stores them, and the
// host's launch of one block per tile.  A weight format brings only its lane view of the rows and its chunk product.
//
// A block owns a tile of 16 weight rows (with silu_mul 8 gate rows and their 8 up rows); lane (r, t) of each warp
// holds the fp32 sums of weight rows row_a (acc[0], acc[1]) and row_b (acc[2], acc[3]) against x rows 2t and 2t + 1.
#pragma once
#include <cuda_runtime.h>

#include "w4a16_common.cuh"

namespace {

// Lane (r, t)'s place in block blockIdx.x's tile: its weight rows row_a and row_b (with SILU the gate row and its up
// row n_out further), whether they exist, and x row r's 32 columns from 32t on (xr; x_live: r < m).
template <typename T, bool SILU>
struct Tile {
  int r, t, row_a, row_b;
  bool live_a, live_b, x_live;
  const T* xr;
  __device__ __forceinline__ Tile(const T* x, long long ldx, int m, int n_out) {
    const int lane = threadIdx.x & 31;
    r = lane >> 2;
    t = lane & 3;
    row_a = SILU ? blockIdx.x * 8 + r : blockIdx.x * 16 + r;
    row_b = SILU ? row_a + n_out : row_a + 8;
    live_a = row_a < n_out;
    live_b = SILU ? live_a : row_b < n_out;
    x_live = r < m;
    xr = x + (x_live ? r : 0) * ldx + t * 32;
  }
};

// acc = the lane's fp32 sums over its warp's share of K's chunks (warp w takes chunks w, w + kWarps, ...), kUnroll
// chunks loaded before the first is used.  Rows is a weight format's view of the lane's two rows: load(c, g, in)
// gives chunk c of scale group g (zeros where !in), prefetch(c) sends chunk c towards L2, and the format's
// chunk_product<T>(d, chunk, xv) sums one chunk against x's 32 columns.  kPerChunk: a group is one chunk, else
// group / kChunk chunks (one group: group = K); kExact: the warps' rounds cover K exactly.
template <typename T, int kWarps, int kUnroll, bool kPerChunk, bool kExact, typename Rows>
__device__ __forceinline__ void lane_sums(float (&acc)[4], const Rows& w, const T* xr, bool x_live, int k,
                                          int group) {
  const int warp = threadIdx.x >> 5, chunks_per_group = group / kChunk, chunks = k / kChunk;
  if (warp < chunks) w.prefetch(warp);  // the first chunk's weight starts on its way while the previous kernel ends
  pdl_begin();  // a no-op unless launched with the PDL attribute
  for (int j = 0; j < 4; ++j) acc[j] = 0.f;
  for (int first = warp; first < chunks; first += kWarps * kUnroll) {
    decltype(w.load(0, 0, false)) ch[kUnroll];
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
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      chunk_product<T>(d, ch[u], xv[u]);
      accumulate(acc, d, ch[u]);
    }
  }
}

// out[2t + e, row] = the block's sum of acc over its warps, plus bias (or null); with SILU, silu(gate) * up of the
// gate row row_a and the up row row_b into column row_a.  Warp 0 stores; live_a / live_b: the rows exist.
template <typename T, int kWarps, bool SILU>
__device__ __forceinline__ void finish_tile(float (&acc)[4], int m, const T* __restrict__ bias, T* __restrict__ out,
                                            long long ldo, int row_a, int row_b, bool live_a, bool live_b) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
  __shared__ float partial[kWarps][4][32];
#pragma unroll
  for (int j = 0; j < 4; ++j) partial[warp][j][lane] = acc[j];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[j] = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) acc[j] += partial[v][j][lane];
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

int sm_count() {  // of the current device, read once
  static int sms = 0;
  if (sms == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev))
      sms = 0;
  }
  return sms;
}

// Warps a block: 8 split K while the tiles fit one wave of such blocks (warps_per_sm / 8 blocks an SM); past it, 4
// (a partial second wave of 8-warp blocks leaves most SMs idle).
int warps_for(int tiles, int warps_per_sm) { return tiles <= warps_per_sm / 8 * sm_count() ? 8 : 4; }

// kernel<<<tiles, warps * 32, 0, stream>>>(args...), with programmatic dependent launch where pdl; a cudaError_t.
template <typename... Params, typename... Args>
cudaError_t launch_tiles(void (*kernel)(Params...), int tiles, int warps, int pdl, cudaStream_t stream,
                         Args... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(tiles);
  config.blockDim = dim3(warps * 32);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace
