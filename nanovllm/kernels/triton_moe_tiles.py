"""The weight side of the fused MoE's grouped GEMMs (``triton_moe.py``): how one expert's [BLOCK_N, BLOCK_K] weight
tile is read and meets the activation tile, for bf16/fp16, FP8 (``weight_quant.py``) and int4 (``int4_quant.py``)
experts.  A K tile never straddles two groups of a quantized weight (``triton_moe.group_block_k`` picks it), so a
tile has one scale (and zero) per row.

* bf16/fp16: the tile as stored, multiplied as is.
* FP8: ``_weight_dot`` and ``_finish`` (their docstrings): beside bf16 x an fp16 MMA (x scaled into fp16 by the
  kernel) with the scales applied to products, beside fp16 x the tile dequantized into x's dtype.
* int4: ``_int4_tile`` reads the tile's [BLOCK_N, BLOCK_K / 2] bytes, splits each byte into its even (low nibble)
  and odd (high nibble) column, computes ``(q - zero) * scale`` in float32 and rounds once to x's dtype, the values
  of ``int4_quant.dequantize``; the tile then multiplies as a bf16 one.
"""
import triton
import triton.language as tl

from nanovllm.kernels.triton_common import _dot


@triton.jit
def _int4_tile(rows, k0, K, n_mask, stride_k, scale_rows, zero_rows, stride_sg, stride_zg, like, GROUP: tl.constexpr,
               STRIDED_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of the int4 rows ``rows`` (byte pointers [BLOCK_N, 1], ``stride_k`` bytes apart
    along K where ``STRIDED_K``) dequantized into ``like``'s dtype with their group's scale and zero; columns past
    ``K`` and masked rows read code 0 (x's columns there are 0; a masked row's scale is 0)."""
    offs_byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    if STRIDED_K:
        ptrs = rows + offs_byte[None, :].to(tl.int64) * stride_k
    else:
        ptrs = rows + offs_byte[None, :]
    packed = tl.load(ptrs, mask=n_mask[:, None] & (offs_byte < K // 2)[None, :], other=0)
    g = k0 // GROUP
    scale = tl.load(scale_rows + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    zero = tl.load(zero_rows + g * stride_zg, mask=n_mask, other=0).to(tl.float32)[:, None]
    even = (((packed & 0xF).to(tl.float32) - zero) * scale).to(like.dtype)
    odd = (((packed >> 4).to(tl.float32) - zero) * scale).to(like.dtype)
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))  # columns back in order: 2j, 2j + 1


@triton.jit
def _weight_dot(acc, a, w, scale_rows, k0, n_mask, stride_sg, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr,
                FP16_MMA: tl.constexpr, INT4: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc`` plus ``a`` [M, K] times the weight tile ``w`` [N, K] transposed (float32).

    An FP8 tile (``GROUP`` > 0, not ``INT4``) with ``FP16_MMA`` is widened to fp16 (one instruction from e4m3) and
    multiplied by ``a`` (scaled into fp16 by the caller); the product is scaled by its rows' scales of the group
    holding column ``k0`` (the tile lies inside it), or, where one group spans all of K (``ONE_GROUP``), the sum once
    in ``_finish``.  Without ``FP16_MMA`` (fp16 x) the tile is widened, scaled and rounded to a's dtype, as the twin
    dequantizes.  An int4 tile comes dequantized (``_int4_tile``)."""
    if GROUP > 0 and not INT4:
        if FP16_MMA:
            part = tl.dot(a, tl.trans(w.to(tl.float16)))
            if ONE_GROUP:
                return acc + part
            scale = tl.load(scale_rows + (k0 // GROUP) * stride_sg, mask=n_mask, other=0.0)
            return acc + part * scale[None, :]
        scale = tl.load(scale_rows + (k0 // GROUP) * stride_sg, mask=n_mask, other=0.0)
        w = (w.to(tl.float32) * scale[:, None]).to(a.dtype)
    return acc + _dot(a, tl.trans(w), DOT_PRECISION)


@triton.jit
def _finish(acc, scale_rows, n_mask, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr, FP16_MMA: tl.constexpr):
    """The sum of ``_weight_dot``'s products, with what they left for the end: 2^4 (``FP16_MMA``) and the rows'
    one scale (``ONE_GROUP``)."""
    if FP16_MMA:
        acc = acc * 16.0
        if ONE_GROUP:
            acc = acc * tl.load(scale_rows, mask=n_mask, other=0.0)[None, :]
    return acc
