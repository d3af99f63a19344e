// The grouped experts' kernel on the tensor cores, for any weight format F (w4a16_moe.cu: int4; w8a16_moe.cu: e4m3):
// the fused MoE's two GEMMs over the expert-sorted layout of nanovllm/kernels/triton_moe_align.py with blocks of 8S
// slots, S = 1, 2, 4 or 8 (block b holds block_rows[b] <= 8S (token, k) pairs of expert block_expert[b], in slots
// 8Sb ..; sorted[slot] is the pair).
//
// up:   inter[slot, n] = silu(gate) * up, gate = x[pair / top_k] . w13[e, n], up = x[pair / top_k] . w13[e, I + n]
// down: out[pair, n] = weights[pair] * (inter[slot] . w2[e, n])  (with round_weights both factors are rounded to
//       the output's dtype first, as the twin does)
//
// A block takes one layout block (S mma's of 8 columns) and 4 warps' weight rows of its expert, each warp 16 (up: 8
// gate rows and their 8 up rows) over all of K in chunks of 128 columns, turning each chunk into mma fragments once
// for the S sub-blocks that hold pairs.  With S = 1 the warps read x through L1; with more, the block stages each
// chunk's x rows in shared memory first, one chunk ahead.  The tensor cores sum each chunk in fp32, times the
// group's scale in fp32.  F brings: Scale (the scales' type), Chunk and rows(...) (a lane's view of its two weight
// rows: load(c, g, in), float scales sa and sb), fragments<T> (a chunk's A fragments), mma<T, S> (a chunk's sums
// against a sub-block's x words), kPermutes (x and inter columns permuted in each 8 past one sub-block), kFp16X (x
// and inter may come as fp16 rows of the real values / 16, for a bf16 model: moe_entry), kUnroll (chunks loaded
// before the first is used) and kBlocksAtS4 (the S = 4 kernels' __launch_bounds__ minimum, 0: none).
#pragma once
#include <cuda_runtime.h>

#include <type_traits>

#include "w4a16_common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr float kFp16XScale = 16.f;  // an fp16_x row holds the real values / 16: fp16's range then reaches ~1e6
constexpr int kSubM = 8;  // slots of a sub-block: the n of one mma

// where 16-byte unit u (columns 8u .. 8u + 7) of a staged row lives in it: a lane reads units 4t .. 4t + 3 of row r,
// so the 8 lanes of a shared-memory phase (rows r, r + 1 and t = 0 .. 3) each take a different 16 bytes of a 128-byte
// line; the copying threads of a phase (one row, units 0 .. 7 or 8 .. 15) too
__device__ __forceinline__ int unit_at(int row, int u) { return u ^ (u >> 3 << 1) ^ (row & 1); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {  // dst: a shared-memory address
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// where column n of a block's rows lies (with kPermutes, the contract's permutation past one sub-block)
template <bool kPermutes>
__device__ __forceinline__ int permuted(int n) { return kPermutes ? (n & ~7) | (n & 3) << 1 | (n >> 2 & 1) : n; }

// F: the weight format; T: x's (and the mma's) 16-bit type, TO: out's; kPerChunk: a group is one chunk (g = chunk),
// else g = chunk / (group / kChunk) (one group: group = K); S: the sub-blocks of 8 slots in a layout block.  The sums
// are multiplied by unscale (x given as x / unscale) and the up GEMM's outputs by out_scale before they are stored
template <typename F, typename T, typename TO, bool UP, bool kPerChunk, int S>
__global__ void __launch_bounds__(kWarps * 32, S == 4 ? F::kBlocksAtS4 : 0)
    moe_kernel(const T* __restrict__ x, long long ldx, const int* __restrict__ sorted,
               const int* __restrict__ block_expert, const int* __restrict__ block_rows, int top_k,
               const uint8_t* __restrict__ q, long long q_e, long long ldq,
               const typename F::Scale* __restrict__ scale, long long s_e, long long lds,
               const uint8_t* __restrict__ zero, long long z_e, long long ldz,
               const float* __restrict__ weights, TO* __restrict__ out, long long ldo, int n_out, int k, int group,
               int round_weights, float unscale, float out_scale) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, t = lane & 3;
  const long long b = blockIdx.x;
  pdl_begin();  // the layout is the previous kernels' output
  const int rows = block_rows[b];
  if (rows == 0) return;
  const long long expert = block_expert[b];
  const int row_a = UP ? (blockIdx.y * kWarps + warp) * 8 + r : (blockIdx.y * kWarps + warp) * 16 + r;  // the lane's
  const int row_b = UP ? row_a + n_out : row_a + 8;  // weight rows (output features): the warp owns 16
  const bool live_a = row_a < n_out, live_b = UP ? live_a : row_b < n_out;
  const auto w = F::rows(q + expert * q_e, ldq, scale + expert * s_e, lds, zero + expert * z_e, ldz,
                         live_a ? row_a : 0, live_b ? row_b : 0, t);
  // a layout block of one sub-block: each lane loads its x row through L1.  Of more: the block stages each chunk's
  // x rows in shared memory, double-buffered (cp.async), for all its warps; thread i copies 16-byte unit i % 16 of
  // rows i / 16, i / 16 + kFillRows, .. (none past the block's rows).  One barrier a chunk: once every thread's
  // copies of chunk c are in, every warp is also done with chunk c - 1, so chunk c + 1 may fill its buffer
  constexpr bool kStage = S > 1;
  const auto x_row = [&](long long slot) { return x + (UP ? sorted[slot] / top_k : slot) * ldx; };  // slot's x row
  const T* xr = !kStage && r < rows ? x_row(b * kSubM + r) + t * 32 : nullptr;
  extern __shared__ uint4 stage[];  // [2][8S rows][16 units], units swizzled (unit_at)
  constexpr int kFillRows = kWarps * 2, kFills = kStage ? S * kSubM / kFillRows : 0;
  const int fill_row = threadIdx.x >> 4, fill_unit = threadIdx.x & 15;
  const T* src[kFills > 0 ? kFills : 1];
#pragma unroll
  for (int f = 0; f < kFills; ++f) {
    const int row = f * kFillRows + fill_row;
    src[f] = row < rows ? x_row(b * S * kSubM + row) + fill_unit * 8 : nullptr;
  }
  // the thread's unit of row fill_row in buffer 0; its rows f * kFillRows further on (row & 1 alike) hold it at the
  // same place, so every copy's address is this one plus constants
  const uint32_t fill_at =
      static_cast<uint32_t>(__cvta_generic_to_shared(stage + fill_row * 16 + unit_at(fill_row, fill_unit)));
  const auto fill = [&](int c) {
    const uint32_t at = fill_at + (c & 1) * (S * kSubM * 16 * 16);
#pragma unroll
    for (int f = 0; f < kFills; ++f)
      if (src[f] != nullptr) cp_async16(at + f * kFillRows * 16 * 16, src[f] + c * kChunk);
    cp_async_commit();
  };
  float acc[S][4] = {};
  const int chunks = k / kChunk, chunks_per_group = group / kChunk;
  if (kStage) fill(0);
  constexpr int kUnroll = F::kUnroll;
  for (int first = 0; first < chunks; first += kUnroll) {
    typename F::Chunk ch[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + u;
      ch[u] = w.load(c, kPerChunk ? c : c / chunks_per_group, c < chunks);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = first + u;
      if (c >= chunks) break;
      uint32_t a[8][4];
      F::template fragments<T>(ch[u], a);
      const uint4* buf = stage + (c & 1) * (S * kSubM * 16);
      if (kStage) {
        cp_async_wait_all();  // this thread's copies of chunk c
        __syncthreads();
        if (c + 1 < chunks) fill(c + 1);  // into chunk c - 1's buffer
      }
#pragma unroll
      for (int j = 0; j < S; ++j) {
        if (j * kSubM >= rows) break;  // block-uniform: sub-blocks past the rows hold no pairs
        const int row = j * kSubM + r;
        uint4 xv[4];
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          if (kStage) xv[v] = buf[row * 16 + unit_at(row, 4 * t + v)];
          else xv[v] = xr != nullptr ? __ldg(reinterpret_cast<const uint4*>(xr + c * kChunk) + v) : uint4{};
        }
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        F::template mma<T, S>(d, a, xv);
        accumulate(acc[j], d, ch[u]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < S; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {  // the lane's slots 2t and 2t + 1 of the sub-block
      const int m = j * kSubM + 2 * t + e;
      if (m >= rows) break;
      const long long slot = b * S * kSubM + m;
      if (UP) {
        const float gate = acc[j][e] * unscale, up = acc[j][2 + e] * unscale;
        const int col = permuted<F::kPermutes && (S > 1)>(row_a);
        if (live_a) out[slot * ldo + col] = Half<TO>::out(gate / (1.0f + __expf(-gate)) * up * out_scale);
      } else {
        const long long pair = sorted[slot];
        float w = weights[pair], va = acc[j][e] * unscale, vb = acc[j][2 + e] * unscale;
        if (round_weights) {  // a product of two 16-bit floats is exact in fp32: the store rounds it once
          w = static_cast<float>(Half<TO>::out(w));
          va = static_cast<float>(Half<TO>::out(va));
          vb = static_cast<float>(Half<TO>::out(vb));
        }
        if (live_a) out[pair * ldo + row_a] = Half<TO>::out(va * w);
        if (live_b) out[pair * ldo + row_b] = Half<TO>::out(vb * w);
      }
    }
  }
}

// ---- host launch ----

template <typename F, typename T, typename TO>
using Kernel = void (*)(const T*, long long, const int*, const int*, const int*, int, const uint8_t*, long long,
                        long long, const typename F::Scale*, long long, long long, const uint8_t*, long long,
                        long long, const float*, TO*, long long, int, int, int, int, float, float);

template <typename F, typename T, typename TO, bool UP, bool G>
Kernel<F, T, TO> pick(int sub) {
  return sub == 1   ? moe_kernel<F, T, TO, UP, G, 1>
         : sub == 2 ? moe_kernel<F, T, TO, UP, G, 2>
         : sub == 4 ? moe_kernel<F, T, TO, UP, G, 4>
                    : moe_kernel<F, T, TO, UP, G, 8>;
}

// the kernel of format F for these arguments, launched on stream (with programmatic dependent launch where pdl)
template <typename F, typename T, typename TO>
cudaError_t launch(const void* x, long long ldx, const int* sorted, const int* block_expert, const int* block_rows,
                   int num_blocks, int block, int top_k, const void* q, long long q_e, long long ldq,
                   const void* scale, long long s_e, long long lds, const void* zero, long long z_e, long long ldz,
                   const float* weights, void* out, long long ldo, int n_out, int k, int group, int up,
                   int round_weights, float unscale, float out_scale, int pdl, cudaStream_t stream) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  const int features = (up ? 8 : 16) * kWarps;  // output features a block computes
  config.gridDim = dim3(num_blocks, (n_out + features - 1) / features);  // blocks fastest: one tile's readers together
  config.blockDim = dim3(kWarps * 32);
  config.dynamicSmemBytes = block > kSubM ? 2 * block * kChunk * sizeof(T) : 0;  // two chunks of the block's x rows
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  const bool per_chunk = group == kChunk;
  const int sub = block / kSubM;
  Kernel<F, T, TO> kernel;
  if constexpr (std::is_same_v<T, TO>)
    kernel = up ? (per_chunk ? pick<F, T, TO, true, true>(sub) : pick<F, T, TO, true, false>(sub))
                : (per_chunk ? pick<F, T, TO, false, true>(sub) : pick<F, T, TO, false, false>(sub));
  else  // an fp16_x down GEMM: fp16 in, the model's dtype out
    kernel = per_chunk ? pick<F, T, TO, false, true>(sub) : pick<F, T, TO, false, false>(sub);
  const cudaError_t err = cudaLaunchKernelEx(
      &config, kernel, static_cast<const T*>(x), ldx, sorted, block_expert, block_rows, top_k,
      static_cast<const uint8_t*>(q), q_e, ldq, static_cast<const typename F::Scale*>(scale), s_e, lds,
      static_cast<const uint8_t*>(zero), z_e, ldz, weights, static_cast<TO*>(out), ldo, n_out, k, group,
      round_weights, unscale, out_scale);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// the C entry of format F (nvl_w4a16_moe, nvl_w8a16_moe): the contract's shapes checked, then launch for the types;
// block: slots of a layout block (8, 16, 32 or 64); up: the gate/up GEMM (n_out = I, the weight's rows 2I), else the
// down GEMM (n_out = H); dtype: the model's, 0 bf16, 1 fp16; fp16_x (formats with kFp16X): x and inter are fp16
// rows of the real values / 16 (the up GEMM reads and writes such rows, the down GEMM reads them and writes dtype);
// pdl: launch with programmatic dependent launch (sm_90 and newer).  Returns a cudaError_t.
template <typename F>
int moe_entry(const void* x, long long ldx, const int* sorted, const int* block_expert, const int* block_rows,
              int num_blocks, int block, int top_k, const void* q, long long q_e, long long ldq, const void* scale,
              long long s_e, long long lds, const void* zero, long long z_e, long long ldz, const float* weights,
              void* out, long long ldo, int n_out, int k, int group, int up, int round_weights, int dtype, int fp16_x,
              int pdl, void* stream) {
  const bool block_ok = block == 8 || block == 16 || block == 32 || block == 64;
  if (k % kChunk != 0 || (group % kChunk != 0 && group < k) || num_blocks < 1 || !block_ok ||
      (fp16_x && !F::kFp16X))
    return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  const float unscale = fp16_x ? kFp16XScale : 1.f, out_scale = fp16_x && up ? 1.f / kFp16XScale : 1.f;
#define NVL_ARGS                                                                                                \
  x, ldx, sorted, block_expert, block_rows, num_blocks, block, top_k, q, q_e, ldq, scale, s_e, lds, zero, z_e, ldz, \
      weights, out, ldo, n_out, k, group, up, round_weights, unscale, out_scale, pdl, s
  if (fp16_x && !up && dtype == 0) {
    if constexpr (F::kFp16X) return launch<F, __half, __nv_bfloat16>(NVL_ARGS);
  }
  if (dtype == 0 && !fp16_x) return launch<F, __nv_bfloat16, __nv_bfloat16>(NVL_ARGS);
  return launch<F, __half, __half>(NVL_ARGS);
#undef NVL_ARGS
}

}  // namespace

// the C symbol nvl_<name> (cuda_build.load_function) of moe_entry<F>, for the .cu file of format F
#define NVL_MOE_ENTRY(name, F)                                                                                     \
  extern "C" int nvl_##name(const void* x, long long ldx, const int* sorted, const int* block_expert,             \
                            const int* block_rows, int num_blocks, int block, int top_k, const void* q,           \
                            long long q_e, long long ldq, const void* scale, long long s_e, long long lds,        \
                            const void* zero, long long z_e, long long ldz, const float* weights, void* out,      \
                            long long ldo, int n_out, int k, int group, int up, int round_weights, int dtype,     \
                            int fp16_x, int pdl, void* stream) {                                                  \
    return moe_entry<F>(x, ldx, sorted, block_expert, block_rows, num_blocks, block, top_k, q, q_e, ldq, scale,   \
                        s_e, lds, zero, z_e, ldz, weights, out, ldo, n_out, k, group, up, round_weights, dtype,    \
                        fp16_x, pdl, stream);                                                                     \
  }
