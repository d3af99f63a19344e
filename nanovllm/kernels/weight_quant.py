"""The FP8 weight format: what a quantized projection or expert weight is, and how it is made and read back.

A quantized weight ``w`` [..., N, K] is ``float8_e4m3fn`` with a float32 ``scale`` [..., N, ceil(K / group)]: one
scale per output row and ``group`` consecutive input columns (the last group may be partial), so the real weight
is ``w[..., n, k] * scale[..., n, k // group]``.  Rows carry their own scales, so packing (q/k/v, gate/up),
stacking experts and splitting rows over tensor-parallel ranks never cut a scale; a rank's columns must start on
a group boundary.  A block-FP8 checkpoint's ``weight_scale_inv`` per [bn, bk] block becomes this with
``group = bk``, its rows repeated (``expand_block_scales``); online quantization scales whole rows (a group at
least K: one scale per row).

Every op that takes such a weight computes with the dequantized values in the activations' dtype (or wider):
the twins dequantize first (``dequantize``); the Triton kernels widen each tile in registers and scale it, or the
partial product of its group.  Quantizing rounds to nearest even after clamping to ±448 (``quantize``).
"""
import torch

from nanovllm.kernels.kv_quant import FP8_DTYPE, FP8_MAX

def is_fp8(weight: torch.Tensor) -> bool:
    return weight.dtype == FP8_DTYPE


def num_groups(k: int, group: int) -> int:
    return -(-k // group)


def expand_columns(scale: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """``scale`` [..., N, G] repeated over each group's columns: [..., N, k]."""
    return scale.repeat_interleave(group, dim=-1)[..., :k]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The real weight in ``dtype``: float32 ``weight * scale`` (each scale over its group), then rounded once."""
    return (weight.float() * expand_columns(scale, weight.shape[-1], group)).to(dtype)


def group_amax(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The largest magnitude of each row's groups of ``weight`` [..., N, K]: float32 [..., N, G]."""
    k = weight.shape[-1]
    g = num_groups(k, group)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, g * group - k)) if g * group != k else w
    return padded.unflatten(-1, (g, group)).abs().amax(dim=-1)


def quantize(weight: torch.Tensor, group: int, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale [..., N, G]) of ``weight`` [..., N, K]: each row's group scaled so that its
    largest magnitude (``amax``, default ``group_amax``: a tensor-parallel shard may pass the whole row's) is 448
    (an all-zero group gets scale 1)."""
    amax = group_amax(weight, group) if amax is None else amax
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (weight.float() / expand_columns(scale, weight.shape[-1], group)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def expand_block_scales(scale_inv: torch.Tensor, rows: int, block_rows: int) -> torch.Tensor:
    """A block-FP8 checkpoint's ``weight_scale_inv`` [ceil(N / bn), G] -> this format's [rows, G] (float32)."""
    return scale_inv.float().repeat_interleave(block_rows, dim=0)[:rows]


