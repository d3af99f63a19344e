"""MXFP4 weight tiles for the fused MoE's grouped GEMMs (``triton_moe.py``) and the dequantize-once kernel: a tile
of MXFP4 rows (``mxfp4_quant.py``: e2m1 codes two a byte, one e8m0 scale per 32 columns) becomes the twin's weight
(``mxfp4_quant.dequantize``: code value times 2^(scale - 127), rounded once to x's dtype).

``_mxfp4_tile`` reads a [N, BLOCK_K] tile as [N, BLOCK_K // 2] bytes with each group's scale repeated over its 16
bytes, decodes the low and high nibbles (``_mxfp4_halves``: the even and odd columns) and interleaves them back into
column order, so the caller makes one product per tile.  On a GPU with bf16 x, ``_E2M1_BF16`` decodes four bytes a
register in inline assembly (about three instructions a weight, scale included); elsewhere (the interpreter, fp16,
float32) the same values come through float32.  (Loading the bytes as [N, groups, 16] broke Triton 3.6's
dot-operand pass at wgmma tiles; products of 16 columns per nibble half, without the interleave, were slower.)
"""
import torch
import triton
import triton.language as tl

# Four code bytes b0..b3 of $4 and two bf16x2 scales ($5: elements 0, 1; $6: 2, 3) -> $0, $1: the low-nibble codes
# of (b0, b1), (b2, b3) as bf16 pairs; $2, $3: the high-nibble codes alike.  prmt puts b0 and b1 in the top bytes
# of the two halves (zeros below), so a half's top nibble is a code: its sign bit is already bit 15, and its three
# magnitude bits shifted right by 6 land on a bf16's two low exponent bits and top mantissa bit, which reads the
# e2m1 value times 2^-126 (code 1 as a subnormal).  shl by 4 brings the low nibbles up.  Each pair is then
# multiplied by 2^126 (exact) and by its scale 2^(s - 127) (rounded once, as the twin rounds): fma with -0 added.
_E2M1_HALF = """
and.b32 s, w, 0x80008000;
shr.b32 t, w, 6;
lop3.b32 s, t, 0x01C001C0, s, 0xEA;
fma.rn.bf16x2 s, s, bias, negz;
fma.rn.bf16x2 OUT, s, SCALE, negz;"""
_E2M1_BYTES = ("prmt.b32 w, p, 0, SEL;" + _E2M1_HALF.replace("OUT", "ODD") + "\nshl.b32 w, w, 4;"
               + _E2M1_HALF.replace("OUT", "EVEN"))
# the inputs are copied first: an output may share an input's register
_E2M1_BF16 = tl.constexpr("{\n.reg .b32 p, sa, sb, w, t, s, bias, negz;\nmov.b32 p, $4;\nmov.b32 sa, $5;\n"
                          "mov.b32 sb, $6;\nmov.b32 bias, 0x7E807E80;\nmov.b32 negz, 0x80008000;\n"
                          + _E2M1_BYTES.replace("SEL", "0x1404").replace("ODD", "$2").replace("EVEN", "$0")
                          .replace("SCALE", "sa") + "\n"
                          + _E2M1_BYTES.replace("SEL", "0x3424").replace("ODD", "$3").replace("EVEN", "$1")
                          .replace("SCALE", "sb") + "\n}")


@triton.jit
def _e2m1(codes, pow2, dtype: tl.constexpr):
    """Codes (0..15, any int) times ``pow2`` (float32, broadcast) in ``dtype``: the sign and magnitude bits placed
    in a float32's sign, low exponent bits and top mantissa bit read e2m1 * 2^-126; times 2^126, then the scale,
    both exact in float32, then rounded once."""
    codes = codes.to(tl.int32)
    bits = ((codes & 8) << 28) | ((codes & 7) << 22)
    return (bits.to(tl.float32, bitcast=True) * 8.507059173023462e37 * pow2).to(dtype)


@triton.jit
def _mxfp4_halves(packed, scale, dtype: tl.constexpr, ASM: tl.constexpr):
    """(even, odd): the weights of the low- and high-nibble codes of ``packed`` (uint8) with their e8m0 ``scale``
    (uint8, ``packed``'s shape), in ``dtype``, as the twin dequantizes.  ``ASM``: a GPU."""
    s = scale.to(tl.int32)
    if ASM and dtype == tl.bfloat16:
        pow2 = tl.where(s == 0, 0x40, s << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)  # 0: 2^-127, subnormal
        pow2 = tl.broadcast_to(pow2, packed.shape)
        return tl.inline_asm_elementwise(_E2M1_BF16, "=r,=r,=r,=r,r,r,r", [packed, pow2],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    pow2 = tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)  # 2^(s - 127); 255: inf
    return _e2m1(packed & 0xF, pow2, dtype), _e2m1(packed >> 4, pow2, dtype)


@triton.jit
def _mxfp4_tile(rows, k0, K, n_mask, scale_rows, stride_sg, like, ASM: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of the MXFP4 rows ``rows`` (byte pointers [BLOCK_N, 1]; ``scale_rows`` [BLOCK_N]
    pointers, ``stride_sg`` apart a group; ``k0`` and ``BLOCK_K`` multiples of 32) in ``like``'s dtype, as the twin
    dequantizes them; columns past ``K`` and masked rows are 0."""
    offs_byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(rows + offs_byte[None, :], mask=n_mask[:, None] & (offs_byte < K // 2)[None, :], other=0)
    offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    scale = tl.load(scale_rows[:, None] + offs_g[None, :].to(tl.int64) * stride_sg,
                    mask=n_mask[:, None] & (offs_g * 32 < K)[None, :], other=127)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_K // 32, 16)), (BLOCK_N, BLOCK_K // 2))
    even, odd = _mxfp4_halves(packed, scale, like.dtype, ASM)
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))  # columns back in order: 2j, 2j + 1


@triton.jit
def _mxfp4_dequantize_kernel(w_ptr, s_ptr, out_ptr, R, K, stride_w, stride_s, stride_o, ASM: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < R
    k0 = tl.program_id(1) * BLOCK_K
    like = tl.zeros([1], dtype=out_ptr.dtype.element_ty)
    tile = _mxfp4_tile(w_ptr + offs_n[:, None].to(tl.int64) * stride_w, k0, K, n_mask,
                       s_ptr + offs_n.to(tl.int64) * stride_s, 1, like, ASM, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_o + offs_k[None, :], tile,
             mask=n_mask[:, None] & (offs_k < K)[None, :])


def dequantize_mxfp4_triton(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 rows ``blocks`` uint8 [R, K // 2] with ``scales`` uint8 [R, K // 32] -> [R, K] in ``dtype``: the twin's
    values (``mxfp4_quant.dequantize``), one ``_mxfp4_tile`` a program."""
    r, k = blocks.shape[0], 2 * blocks.shape[1]
    assert k % 32 == 0 and scales.shape == (r, k // 32) and blocks.stride(1) == scales.stride(1) == 1
    out = torch.empty((r, k), dtype=dtype, device=blocks.device)
    block_n, block_k = 32, 128
    _mxfp4_dequantize_kernel[(triton.cdiv(r, block_n), triton.cdiv(k, block_k))](
        blocks, scales, out, r, k, blocks.stride(0), scales.stride(0), out.stride(0), ASM=blocks.is_cuda,
        BLOCK_N=block_n, BLOCK_K=block_k)
    return out
