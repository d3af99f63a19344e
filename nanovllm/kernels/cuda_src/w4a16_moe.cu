// Grouped int4 experts on the tensor cores, in CUDA: the fused MoE's two GEMMs over the expert-sorted layout of
// nanovllm/kernels/triton_moe_align.py with blocks of 8 slots (block b holds block_rows[b] <= 8 (token, k) pairs of
// expert block_expert[b], in slots 8b ..; sorted[slot] is the pair).
//
// up:   inter[slot, n] = silu(gate) * up, gate = x[pair / top_k] . w13[e, n], up = x[pair / top_k] . w13[e, I + n]
// down: out[pair, n] = weights[pair] * (inter[slot] . w2[e, n])  (with round_weights both factors are rounded to
//       the output's dtype first, as the twin does)
//
// Contract (checked by nanovllm/kernels/cuda_w4a16.py): bf16 or fp16 x / inter rows, 16-byte aligned; q uint8
// [E, N, K / 2] (two codes a byte, column 2b in the low nibble), rows 16-byte aligned; scale fp16 and zero uint8
// [E, N, groups]; K % 128 == 0 and (group % 128 == 0 or group >= K).  A block takes one layout block (the mma's 8
// columns) and 4 warps' weight rows of its expert, each warp 16 (up: 8 gate rows and their 8 up rows) over all of
// K in chunks of 128 columns; the warps read the same x through L1 (w4a16_common.cuh: the lane layout).  The tensor
// cores sum each chunk in fp32, times the group's scale in fp32.
#include <cuda_runtime.h>

#include "w4a16_common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kBlockM = 8;  // slots of a layout block: the n of one mma
constexpr int kUnroll = 4;  // chunks a warp loads before using the first

// kPerChunk: a group is one chunk (g = chunk), else g = chunk / (group / kChunk) (one group: group = K)
template <typename T, bool UP, bool kPerChunk>
__global__ void __launch_bounds__(kWarps * 32)
    moe_kernel(const T* __restrict__ x, long long ldx, const int* __restrict__ sorted,
               const int* __restrict__ block_expert, const int* __restrict__ block_rows, int top_k,
               const uint8_t* __restrict__ q, long long q_e, long long ldq, const __half* __restrict__ scale,
               long long s_e, long long lds, const uint8_t* __restrict__ zero, long long z_e, long long ldz,
               const float* __restrict__ weights, T* __restrict__ out, long long ldo, int n_out, int k, int group,
               int round_weights) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, t = lane & 3;
  const long long b = blockIdx.x;
  pdl_begin();  // the layout is the previous kernels' output
  const int rows = block_rows[b];
  if (rows == 0) return;
  const long long expert = block_expert[b];
  const int row_a = UP ? (blockIdx.y * kWarps + warp) * 8 + r : (blockIdx.y * kWarps + warp) * 16 + r;  // the lane's
  const int row_b = UP ? row_a + n_out : row_a + 8;  // weight rows (output features): the warp owns 16
  const bool live_a = row_a < n_out, live_b = UP ? live_a : row_b < n_out;
  const long long wa_row = live_a ? row_a : 0, wb_row = live_b ? row_b : 0;
  const uint8_t* qa = q + expert * q_e + wa_row * ldq + t * 16;
  const uint8_t* qb = q + expert * q_e + wb_row * ldq + t * 16;
  const __half* sa_p = scale + expert * s_e + wa_row * lds;
  const __half* sb_p = scale + expert * s_e + wb_row * lds;
  const uint8_t* za_p = zero + expert * z_e + wa_row * ldz;
  const uint8_t* zb_p = zero + expert * z_e + wb_row * ldz;
  const long long slot_r = b * kBlockM + r;  // the lane's x row: the block's r-th, or none past its rows
  const T* xr = r < rows ? x + (UP ? sorted[slot_r] / top_k : slot_r) * ldx + t * 32 : nullptr;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int chunks = k / kChunk, chunks_per_group = group / kChunk;
  for (int first = 0; first < chunks; first += kUnroll) {
    uint4 wa[kUnroll], wb[kUnroll];
    float sa[kUnroll], sb[kUnroll];
    uint32_t za[kUnroll], zb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + u;
      const bool in = c < chunks;
      const int col = c * kChunk, g = kPerChunk ? c : c / chunks_per_group;
      wa[u] = in ? __ldcs(reinterpret_cast<const uint4*>(qa + col / 2)) : uint4{};
      wb[u] = in ? __ldcs(reinterpret_cast<const uint4*>(qb + col / 2)) : uint4{};
      sa[u] = in ? __half2float(sa_p[g]) : 0.f;
      sb[u] = in ? __half2float(sb_p[g]) : 0.f;
      za[u] = in ? za_p[g] : 0u;
      zb[u] = in ? zb_p[g] : 0u;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + u;
      if (c >= chunks) break;
      uint32_t a[8][4];
      weight_fragments<T>(wa[u], wb[u], zero2<T>(za[u]), zero2<T>(zb[u]), a);
      uint4 xv[4];
#pragma unroll
      for (int v = 0; v < 4; ++v)
        xv[v] = xr != nullptr ? __ldg(reinterpret_cast<const uint4*>(xr + c * kChunk) + v) : uint4{};
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      chunk_mma<T>(d, a, xv);
      acc[0] = fmaf(d[0], sa[u], acc[0]);
      acc[1] = fmaf(d[1], sa[u], acc[1]);
      acc[2] = fmaf(d[2], sb[u], acc[2]);
      acc[3] = fmaf(d[3], sb[u], acc[3]);
    }
  }
#pragma unroll
  for (int e = 0; e < 2; ++e) {  // the lane's slots 2t and 2t + 1 of the block
    const int m = 2 * t + e;
    if (m >= rows) break;
    const long long slot = b * kBlockM + m;
    if (UP) {
      const float gate = acc[e], up = acc[2 + e];
      if (live_a) out[slot * ldo + row_a] = Half<T>::out(gate / (1.0f + __expf(-gate)) * up);
    } else {
      const long long pair = sorted[slot];
      float w = weights[pair], va = acc[e], vb = acc[2 + e];
      if (round_weights) {  // a product of two 16-bit floats is exact in fp32: the store rounds it once
        w = static_cast<float>(Half<T>::out(w));
        va = static_cast<float>(Half<T>::out(va));
        vb = static_cast<float>(Half<T>::out(vb));
      }
      if (live_a) out[pair * ldo + row_a] = Half<T>::out(va * w);
      if (live_b) out[pair * ldo + row_b] = Half<T>::out(vb * w);
    }
  }
}

// ---- host launch ----

template <typename T>
cudaError_t launch(const void* x, long long ldx, const int* sorted, const int* block_expert, const int* block_rows,
                   int num_blocks, int top_k, const void* q, long long q_e, long long ldq, const void* scale,
                   long long s_e, long long lds, const void* zero, long long z_e, long long ldz, const float* weights,
                   void* out, long long ldo, int n_out, int k, int group, int up, int round_weights, int pdl,
                   cudaStream_t stream) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  const int features = (up ? 8 : 16) * kWarps;  // output features a block computes
  config.gridDim = dim3(num_blocks, (n_out + features - 1) / features);  // blocks fastest: one tile's readers together
  config.blockDim = dim3(kWarps * 32);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  const auto* xt = static_cast<const T*>(x);
  const auto* qt = static_cast<const uint8_t*>(q);
  const auto* st = static_cast<const __half*>(scale);
  const auto* zt = static_cast<const uint8_t*>(zero);
  auto* ot = static_cast<T*>(out);
#define NVL_MOE(UP, G)                                                                                        \
  cudaLaunchKernelEx(&config, moe_kernel<T, UP, G>, xt, ldx, sorted, block_expert, block_rows, top_k, qt, q_e, ldq, \
                     st, s_e, lds, zt, z_e, ldz, weights, ot, ldo, n_out, k, group, round_weights)
  const bool per_chunk = group == kChunk;
  cudaError_t err = up ? (per_chunk ? NVL_MOE(true, true) : NVL_MOE(true, false))
                       : (per_chunk ? NVL_MOE(false, true) : NVL_MOE(false, false));
#undef NVL_MOE
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace

// up: the gate/up GEMM (n_out = I, the weight's rows 2I), else the down GEMM (n_out = H); dtype: 0 bf16, 1 fp16;
// pdl: launch with programmatic dependent launch (sm_90 and newer).  Returns a cudaError_t.
extern "C" int nvl_w4a16_moe(const void* x, long long ldx, const int* sorted, const int* block_expert,
                             const int* block_rows, int num_blocks, int top_k, const void* q, long long q_e,
                             long long ldq, const void* scale, long long s_e, long long lds, const void* zero,
                             long long z_e, long long ldz, const float* weights, void* out, long long ldo, int n_out,
                             int k, int group, int up, int round_weights, int dtype, int pdl, void* stream) {
  if (k % kChunk != 0 || (group % kChunk != 0 && group < k) || num_blocks < 1) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
#define NVL_ARGS                                                                                                    \
  x, ldx, sorted, block_expert, block_rows, num_blocks, top_k, q, q_e, ldq, scale, s_e, lds, zero, z_e, ldz, weights, \
      out, ldo, n_out, k, group, up, round_weights, pdl, s
  const cudaError_t err = dtype == 0 ? launch<__nv_bfloat16>(NVL_ARGS) : launch<__half>(NVL_ARGS);
#undef NVL_ARGS
  return err;
}
