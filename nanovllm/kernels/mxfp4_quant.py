"""The MXFP4 weight format (OCP microscaling FP4, as GPT-OSS's experts are published): what a weight is in memory.

A weight ``w`` [..., N, K] (K a multiple of 32) is two uint8 tensors, blocks of ``BLOCK`` = 32 input columns:

* ``blocks`` uint8 [..., N, K // 2]: byte j of row n holds the e2m1 code of column 2j in its low nibble and of
  column 2j + 1 in its high one; a code is a sign bit (8) and 3 magnitude bits indexing ``E2M1``;
* ``scales`` uint8 [..., N, K // 32]: an e8m0 exponent per row and block, biased by 127;
* the real weight is ``LUT[code] * 2^(scale - 127)``, formed in float32 (exact there) and rounded once to the
  activations' dtype: bit for bit transformers' ``convert_moe_packed_tensors`` (before its transpose).

Stacking experts and splitting rows over ranks never cut a block; a rank's input columns must be whole blocks.
``quantize`` (synthesis, dummy weights, tests) picks per block the least exponent that keeps amax / 2^e <= 6 and
rounds each value to the nearest code (ties to the lower magnitude).
"""
import torch

BLOCK = 32  # input columns per scale
BIAS = 127  # the e8m0 exponent bias
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes of codes 0..7; code | 8 is the negative one
LUT = E2M1 + tuple(-v for v in E2M1)  # all 16 codes (code 8 is -0.0)


def is_mxfp4(w: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None) -> bool:
    """Whether stacked weights ``w`` with ``scale`` and ``zero`` are MXFP4 (uint8 codes, uint8 e8m0 scales, no
    zeros), as the MoE ops tell them from FP8 (float8 weights) and int4 (with zeros)."""
    return scale is not None and zero is None and w.dtype == torch.uint8 and scale.dtype == torch.uint8


def unpack(blocks: torch.Tensor) -> torch.Tensor:
    """``blocks`` uint8 [..., N, K // 2] -> codes uint8 [..., N, K]."""
    return torch.stack((blocks & 0xF, blocks >> 4), dim=-1).flatten(-2)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [..., N, K] (0..15) -> ``blocks`` uint8 [..., N, K // 2]."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The real weight [..., N, K] in ``dtype`` (module docstring)."""
    k = blocks.shape[-1] * 2
    if scales.shape[-1] * BLOCK != k or blocks.shape[:-1] != scales.shape[:-1]:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} disagree: a scale "
                         f"per {BLOCK} columns (two a byte)")
    lut = torch.tensor(LUT, dtype=torch.float32, device=blocks.device)
    values = lut[unpack(blocks).int()].unflatten(-1, (k // BLOCK, BLOCK))
    exponent = scales.to(torch.int32)[..., None] - BIAS
    return torch.ldexp(values, exponent).flatten(-2).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of ``weight`` [..., N, K] (K a multiple of 32), as the module docstring says."""
    k = weight.shape[-1]
    if k % BLOCK:
        raise ValueError(f"an MXFP4 weight needs a multiple of {BLOCK} input columns, got {k}")
    w = weight.float().unflatten(-1, (k // BLOCK, BLOCK))
    amax = w.abs().amax(dim=-1, keepdim=True)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / E2M1[-1])), torch.zeros_like(amax))
    exponent = exponent.clamp(-BIAS, BIAS)
    scaled = torch.ldexp(w, -exponent.to(torch.int32))
    magnitudes = torch.tensor(E2M1, device=w.device)
    code = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1).to(torch.uint8)  # first: the lower one
    code = torch.where((scaled < 0) & (code > 0), code | 8, code)
    return pack(code.flatten(-2)), (exponent[..., 0] + BIAS).to(torch.uint8)
