"""One kernel from the packed qkv projection to attention's inputs: per-head RMSNorm of q and k (Qwen3), rotary
embedding, and the KV store into the paged cache.  It replaces the compiler's norm/rope kernels and the separate
store kernel (two to three short launches per layer at decode).

Each program takes one token's row of ``qkv`` [T, (Hq + 2 Hkv) D] and computes what
``reference.rope_store_kv_reference`` computes, rounding to the model's dtype after each step where the torch
code does (the normed value, its product with the weight, each rope product and their sum).  In bf16 the result
equals the torch code's exactly without the q/k norm; with it, an element may differ by one ulp where the norm's
float32 sum, taken in another order, rounds the other way.  q goes to a new [T, Hq, D] tensor; k and v to their
cache slot (quantised, into an FP8 cache, from those DTYPE values: ``kv_quant.py``), skipped for slot -1.  The grid is (T,): no data-dependent shapes, so it is captured in CUDA graphs
like the other kernels.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.pdl import pdl_begin, pdl_launch
from nanovllm.kernels.triton_common import _quantize_fp8, kv_scale_args


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x rounded to the model's dtype and back to float32 (what a torch op in that dtype stores).

    bf16 rounds to nearest even by integer arithmetic on the float's bits: a ``.to(bf16).to(fp32)`` round trip
    can be folded away on the GPU (leaving values one bf16 ulp off the torch code) and truncates in the
    interpreter.  Finite values only, which is all a norm and rope produce."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _norm_rope(row_ptr, norm_w_ptr, cos, sin, rot_sign, heads, d, rot_d, head_mask, eps,
               HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr, DTYPE: tl.constexpr):
    """[HEADS_P2, HEAD_DIM] heads of one token: normed (if QK_NORM) and rotated, as float32 holding DTYPE values."""
    offs = heads[:, None] * HEAD_DIM
    x = tl.load(row_ptr + offs + d[None, :], mask=head_mask[:, None], other=0.0).to(tl.float32)
    x_rot = tl.load(row_ptr + offs + rot_d[None, :], mask=head_mask[:, None], other=0.0).to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)
        w = tl.load(norm_w_ptr + d).to(tl.float32)
        w_rot = tl.load(norm_w_ptr + rot_d).to(tl.float32)
        x = _round(_round(x * rstd[:, None], DTYPE) * w[None, :], DTYPE)
        x_rot = _round(_round(x_rot * rstd[:, None], DTYPE) * w_rot[None, :], DTYPE)
    return _round(_round(x * cos[None, :], DTYPE) + _round(rot_sign[None, :] * x_rot * sin[None, :], DTYPE), DTYPE)


@triton.jit
def _rope_store_kernel(qkv_ptr, positions_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, q_out_ptr,
                       k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr, eps, stride_qkv, stride_cos, stride_qo,
                       stride_cb, stride_ch, stride_ct,
                       NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HQ_P2: tl.constexpr,
                       HKV_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       QK_NORM: tl.constexpr, DTYPE: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    rot_d = (d + half) % HEAD_DIM  # rotate_half: first half takes -x[d + half], second half x[d - half]
    rot_sign = tl.where(d < half, -1.0, 1.0)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    cos = _round(tl.load(cos_ptr + pos * stride_cos + d), DTYPE)
    sin = _round(tl.load(sin_ptr + pos * stride_cos + d), DTYPE)
    row = qkv_ptr + t * stride_qkv

    hq = tl.arange(0, HQ_P2)
    q = _norm_rope(row, q_norm_ptr, cos, sin, rot_sign, hq, d, rot_d, hq < NUM_HEADS, eps, HEAD_DIM, QK_NORM, DTYPE)
    tl.store(q_out_ptr + t * stride_qo + hq[:, None] * HEAD_DIM + d[None, :], q.to(DTYPE),
             mask=(hq < NUM_HEADS)[:, None])

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        hk = tl.arange(0, HKV_P2)
        k_mask = hk < NUM_KV_HEADS
        k = _norm_rope(row + NUM_HEADS * HEAD_DIM, k_norm_ptr, cos, sin, rot_sign, hk, d, rot_d, k_mask, eps,
                       HEAD_DIM, QK_NORM, DTYPE)
        v = tl.load(row + (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM + hk[:, None] * HEAD_DIM + d[None, :],
                    mask=k_mask[:, None])
        if FP8:
            k = _quantize_fp8(k, tl.load(k_scale_ptr + hk, mask=k_mask, other=1.0)[:, None])
            v = _quantize_fp8(v, tl.load(v_scale_ptr + hk, mask=k_mask, other=1.0)[:, None])
        dst = (slot // BLOCK_SIZE) * stride_cb + hk[:, None] * stride_ch + (slot % BLOCK_SIZE) * stride_ct + d[None, :]
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=k_mask[:, None])
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=k_mask[:, None])


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def rope_store_kv_triton(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, k_cache, v_cache,
                         slot_mapping, num_heads: int, num_kv_heads: int, k_scale=None, v_scale=None) -> torch.Tensor:
    """The fused form of ``reference.rope_store_kv_reference`` (same arguments; the result as described above)."""
    num_tokens = qkv.shape[0]
    head_dim, block_size = k_cache.shape[3], k_cache.shape[2]
    assert qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    assert head_dim == triton.next_power_of_2(head_dim) and k_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride() and cos_cache.stride(1) == 1
    q = qkv.new_empty(num_tokens, num_heads, head_dim)
    if num_tokens == 0:
        return q
    qk_norm = q_norm_weight is not None
    scales, fp8 = kv_scale_args(k_cache, k_scale, v_scale)
    _rope_store_kernel[(num_tokens,)](
        qkv, positions, cos_cache, sin_cache, q_norm_weight if qk_norm else qkv, k_norm_weight if qk_norm else qkv,
        q, k_cache, v_cache, slot_mapping, *scales, eps, qkv.stride(0), cos_cache.stride(0), q.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HQ_P2=triton.next_power_of_2(num_heads),
        HKV_P2=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, BLOCK_SIZE=block_size, QK_NORM=qk_norm,
        DTYPE=_TL_DTYPES[qkv.dtype], FP8=fp8, num_warps=4, **pdl_launch(qkv.device))
    return q
