"""The weight side of the fused MoE's grouped GEMMs (``triton_moe.py``): how one expert's [BLOCK_N, BLOCK_K] weight
tile is read and meets the activation tile, for bf16/fp16, FP8 (``weight_quant.py``) and int4 (``int4_quant.py``)
experts, MXFP4 ones (``mxfp4_quant.py``); and the up GEMM's gated activation (``_activate``: SiLU, GELU, or GPT-OSS's
clamped SwiGLU).  A K tile never straddles two groups (``moe_configs.group_block_k``): one scale (and zero) a row.

* bf16/fp16: the tile as stored.  FP8: ``_weight_dot`` and ``_finish`` (their docstrings): beside bf16 x an fp16
  MMA with the scales applied to products, beside fp16 x the tile dequantized into x's dtype.
* int4: ``_int4_tile`` splits each byte of the tile into its even (low nibble) and odd (high nibble) column as
  exact ``q - zero`` in x's dtype; the product is scaled by the rows' scales of the tile's group, so the weight is
  never rounded (the twin rounds ``(q - zero) * scale`` to x's dtype first).  MXFP4: ``triton_mxfp4.py``.

``SWAP`` (``MoeConfig.swap``) multiplies the weight tile by the activations (``_product``): the weight is the MMA's
A operand, which a Hopper tensor core reads from registers (a tile dequantized there skips shared memory; few rows
are the narrow side).  The accumulator is then [N, M] (``_per_n``, ``_oriented`` handle either orientation).
"""
import triton
import triton.language as tl

from nanovllm.kernels.triton_common import _dot, _int4_minus_zero

ACTIVATION_CODES = {"silu": 0, "swiglu_oss": 1, "gelu_tanh": 2}  # ``_activate``'s, for ``moe_reference.ACTIVATIONS``


@triton.jit
def _activate(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """The up GEMM's epilogue on float32 gate and up tiles (``moe_reference.activate``): ``silu(gate) * up`` (0),
    GPT-OSS's clamped SwiGLU (1) ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate,
    limit)``, or Gemma 4's (2) ``gelu_tanh(gate) * up``, its tanh written as a sigmoid."""
    if ACTIVATION == 1:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    elif ACTIVATION == 2:  # 0.5 * (1 + tanh(z)) = sigmoid(2 z); 2 * sqrt(2 / pi) = 1.5957691216057308
        return gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) * up
    else:
        return gate * tl.sigmoid(gate) * up


@triton.jit
def _int4_tile(rows, k0, K, n_mask, stride_k, zero_rows, stride_zg, like, GROUP: tl.constexpr,
               STRIDED_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of the int4 rows ``rows`` (byte pointers [BLOCK_N, 1], ``stride_k`` bytes apart
    along K where ``STRIDED_K``) as ``q - zero`` with their group's zero, exact integers in ``like``'s dtype
    (``_weight_dot`` applies the scales to the product); columns past ``K`` and masked rows read code 0 (x's columns
    there are 0; a masked row's scale is 0).  ``ASM``: ``triton_common._int4_minus_zero``'s register trick."""
    offs_byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    k_mask = offs_byte < K // 2
    packed = tl.load(_k_columns(rows, offs_byte, stride_k, STRIDED_K), mask=n_mask[:, None] & k_mask[None, :], other=0)
    zero = tl.load(zero_rows + (k0 // GROUP) * stride_zg, mask=n_mask, other=0)
    even, odd = _int4_minus_zero(packed, zero[:, None], like.dtype, ASM)
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))  # columns back in order: 2j, 2j + 1


@triton.jit
def _product(a, w, DOT_PRECISION: tl.constexpr, SWAP: tl.constexpr):
    """``a`` [M, K] times the weight tile ``w`` [N, K] transposed, in float32: [M, N], or [N, M] where ``SWAP``."""
    if SWAP:
        return _dot(w, tl.trans(a), DOT_PRECISION)
    else:
        return _dot(a, tl.trans(w), DOT_PRECISION)


@triton.jit
def _per_n(v, SWAP: tl.constexpr):
    """A vector over the tile's N columns, broadcast against a product or accumulator of ``SWAP``'s orientation."""
    if SWAP:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """The float32 accumulator of a [BLOCK_M, BLOCK_N] output tile, in ``SWAP``'s orientation."""
    if SWAP:
        return tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        return tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def _oriented(acc, SWAP: tl.constexpr):
    """An accumulator of ``SWAP``'s orientation as [M, N]."""
    if SWAP:
        return tl.trans(acc)
    else:
        return acc


@triton.jit
def _weight_dot(acc, a, w, scale_rows, k0, n_mask, stride_sg, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr,
                FP16_MMA: tl.constexpr, INT4: tl.constexpr, DOT_PRECISION: tl.constexpr, SWAP: tl.constexpr):
    """``acc`` plus ``a`` [M, K] times the weight tile ``w`` [N, K] transposed (float32, ``SWAP``'s orientation).

    An FP8 tile (``GROUP`` > 0, not ``INT4``) with ``FP16_MMA`` is widened to fp16 (one instruction from e4m3) and
    multiplied by ``a`` (scaled into fp16 by the caller); the product is scaled by its rows' scales of the group
    holding column ``k0`` (the tile lies inside it), or, where one group spans all of K (``ONE_GROUP``), the sum once
    in ``_finish``.  Without ``FP16_MMA`` (fp16 x) the tile is widened, scaled and rounded to a's dtype, as the twin
    dequantizes.  An int4 tile comes as exact ``q - zero`` (``_int4_tile``) and its product is scaled as FP8's."""
    if INT4:
        scale = tl.load(scale_rows + (k0 // GROUP) * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
        return acc + _product(a, w, DOT_PRECISION, SWAP) * _per_n(scale, SWAP)
    if GROUP > 0:
        if FP16_MMA:  # fp16 operands (the interpreter multiplies them too): tl.dot's default mode
            part = _product(a, w.to(tl.float16), "tf32", SWAP)
            if ONE_GROUP:
                return acc + part
            scale = tl.load(scale_rows + (k0 // GROUP) * stride_sg, mask=n_mask, other=0.0)
            return acc + part * _per_n(scale, SWAP)
        scale = tl.load(scale_rows + (k0 // GROUP) * stride_sg, mask=n_mask, other=0.0)
        w = (w.to(tl.float32) * scale[:, None]).to(a.dtype)
    return acc + _product(a, w, DOT_PRECISION, SWAP)


@triton.jit
def _finish(acc, scale_rows, n_mask, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr, FP16_MMA: tl.constexpr,
            SWAP: tl.constexpr):
    """The sum of ``_weight_dot``'s products (``SWAP``'s orientation), with what they left for the end: 2^4
    (``FP16_MMA``) and the rows' one scale (``ONE_GROUP``)."""
    if FP16_MMA:
        acc = acc * 16.0
        if ONE_GROUP:
            acc = acc * _per_n(tl.load(scale_rows, mask=n_mask, other=0.0), SWAP)
    return acc


@triton.jit
def _block(pid_b, rows, block_expert_ptr, sorted_ptr, BLOCK_M: tl.constexpr):
    """Block ``pid_b`` of the sorted layout, which holds ``rows`` pairs: (its expert, the mask of its real rows,
    its slots, their pair indices), all int64 where they meet a stride (``T * top_k * H`` and ``E * 2I * H`` pass
    2**31 on large models and prefills)."""
    expert = tl.load(block_expert_ptr + pid_b).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows
    slots = pid_b.to(tl.int64) * BLOCK_M + offs_m
    pairs = tl.load(sorted_ptr + slots, mask=m_mask, other=0).to(tl.int64)
    return expert, m_mask, slots, pairs


@triton.jit
def _halves(ptr, expert, offs_n, I, stride_e, stride_n):
    """Pointers to rows ``offs_n`` of expert ``expert``'s gate half of a [E, 2I, ...] tensor (w13 or its scales or
    zeros), and to the same rows of its up half, ``I`` rows on."""
    gate = ptr + expert * stride_e + offs_n.to(tl.int64) * stride_n
    return gate, gate + I * stride_n


@triton.jit
def _k_columns(rows, offs_k, stride_k, STRIDED_K: tl.constexpr):
    """Pointers to columns ``offs_k`` of the rows ``rows`` ([N, 1]): contiguous, or ``stride_k`` apart where
    ``STRIDED_K`` (``w2`` as a transposed view)."""
    if STRIDED_K:
        return rows + offs_k[None, :].to(tl.int64) * stride_k
    else:
        return rows + offs_k[None, :]


@triton.jit
def _store_weighted(acc, weights_ptr, pairs, m_mask, out_ptr, stride_o, offs_n, n_mask, ROUND: tl.constexpr):
    """The down GEMM's tile ``acc`` [M, N] times each pair's router weight, stored to the pairs' output rows;
    ``ROUND`` (the op's ``round_weights``): tile and weight rounded to the output's dtype first, as the twin's."""
    w = tl.load(weights_ptr + pairs, mask=m_mask, other=0.0)
    if ROUND:  # a product of two bf16/fp16 values is exact in float32: the store rounds it once, as torch does
        out_dtype = out_ptr.dtype.element_ty
        acc = acc.to(out_dtype).to(tl.float32)
        w = w.to(out_dtype).to(tl.float32)
    acc *= w[:, None]
    tl.store(out_ptr + pairs[:, None] * stride_o + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
