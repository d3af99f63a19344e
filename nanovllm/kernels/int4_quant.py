"""The int4 weight format: what a 4-bit projection or expert weight is in memory, and how it is made and read back.

A quantized weight ``w`` [..., N, K] (K even) is three tensors and a group width:

* ``qweight`` uint8 [..., N, K // 2]: byte j of row n holds q[n, 2j] in its low nibble and q[n, 2j + 1] in its
  high nibble, each an unsigned code 0..15;
* ``scale`` float16 [..., N, G] and ``zero`` uint8 [..., N, G], G = ceil(K / group): one per output row and
  ``group`` consecutive input columns (the last group may be partial);
* the real weight is ``(q[n, k] - zero[n, k // group]) * scale[n, k // group]``, computed in float32 and rounded
  once to the activations' dtype (``dequantize``, the twins'; the GPU kernels scale the product instead).

GPTQ and AWQ checkpoints (``quant/int4_checkpoint.py``) are repacked into this layout at load time; rows carry their
own scales, so packing q/k/v or gate/up, stacking experts and splitting rows over ranks never cut a group, and a
rank's columns must start on a group boundary.  ``quantize`` is round-to-nearest per group (synthesis and tests).
"""
import torch

BITS = 4
MAX_CODE = (1 << BITS) - 1  # 15


def num_groups(k: int, group: int) -> int:
    return -(-k // group)


def pack(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [..., N, K] (0..15, K even) -> ``qweight`` uint8 [..., N, K // 2]."""
    if q.shape[-1] % 2:
        raise ValueError(f"an int4 weight needs an even number of input columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """``qweight`` uint8 [..., N, K // 2] -> codes uint8 [..., N, K]."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).flatten(-2)


def expand_columns(t: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """A per-group tensor [..., N, G] repeated over each group's columns: [..., N, k]."""
    return t.repeat_interleave(group, dim=-1)[..., :k]


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The real weight [..., N, K] in ``dtype``: float32 ``(q - zero) * scale``, rounded once."""
    q = unpack(qweight).float()
    k = q.shape[-1]
    return ((q - expand_columns(zero.float(), k, group)) * expand_columns(scale.float(), k, group)).to(dtype)


def quantize(weight: torch.Tensor, group: int, sym: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, scale, zero) of ``weight`` [..., N, K], round to nearest per row and ``group`` columns.

    Symmetric: zero 8 and scale amax / 7.5 rounded to float16 (codes 0..15 reach -8 and +7 steps).  Asymmetric:
    scale (max - min) / 15 and zero the rounded code of 0.  An all-zero group gets scale 1."""
    k = weight.shape[-1]
    g = num_groups(k, group)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, g * group - k)) if g * group != k else w
    blocks = padded.unflatten(-1, (g, group))
    if sym:
        amax = blocks.abs().amax(dim=-1)
        scale = torch.where(amax > 0, amax / 7.5, torch.ones_like(amax)).half()
        zero = torch.full_like(amax, 8, dtype=torch.uint8)
    else:
        lo, hi = blocks.amin(dim=-1).clamp(max=0), blocks.amax(dim=-1).clamp(min=0)
        scale = torch.where(hi > lo, (hi - lo) / MAX_CODE, torch.ones_like(hi)).half()
        zero = (-lo / scale.float()).round().clamp(0, MAX_CODE).to(torch.uint8)
    codes = (w / expand_columns(scale.float(), k, group)).round() + expand_columns(zero.float(), k, group)
    return pack(codes.clamp(0, MAX_CODE).to(torch.uint8)), scale, zero


