"""The activation side of W8A8 FP8: how an activation is rounded to e4m3 before it meets an FP8 weight.

A row of an activation [..., K] is cut into groups of ``ACT_GROUP`` (128) consecutive columns, the last one possibly
partial; a group whose largest magnitude is ``amax`` gets the scale ``amax / 448`` (1 for an all-zero group), is
divided by it, clamped to ±448 and rounded to the nearest e4m3 (``q``), and stands for ``q * scale``: the FP8
weights' rule (``weight_quant.quantize``, IEEE float32 divisions) per 128 columns.  The W8A8 kernels
(``triton_moe_w8a8.py``) round an expert's input in one pass and its ``silu(gate) * up`` in registers; ``quantize``
and ``dequantized`` are their twin and the oracle's rounding (``quant/w8a8_oracle.py``).  Which FP8 weights take
W8A8 is ``w8a8_applies``: weight groups that K tiles of 128 columns never straddle (one group per row, or a multiple
of 128 columns).  Under tensor parallelism each rank rounds its slice of an expert's intermediate in groups of its
own (those of one GPU where the slice is a multiple of 128).
"""
import torch

from nanovllm.kernels import weight_quant
from nanovllm.kernels.options import current_options

ACT_GROUP = 128


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [..., K], float32 scales [..., ceil(K / 128)]) of ``x``: ``weight_quant.quantize``'s rule, each row's
    groups of 128 columns."""
    return weight_quant.quantize(x, ACT_GROUP)


def dequantized(x: torch.Tensor) -> torch.Tensor:
    """``x`` as W8A8 sees it, in float32: each group's ``q * scale``."""
    return weight_quant.dequantize(*quantize(x), ACT_GROUP, torch.float32)


def w8a8_applies(group: int, *ks: int) -> bool:
    """Whether FP8 weights of ``group`` columns per scale over each K in ``ks`` take W8A8: a K tile of 128 columns
    lies inside one weight group."""
    return group > 0 and all(group >= k or group % ACT_GROUP == 0 for k in ks)


def moe_w8a8(w13: torch.Tensor, w13_scale, w13_zero, group: int) -> bool:
    """Whether a fused-MoE call on experts ``w13`` [E, 2I, H] runs W8A8 (every implementation asks this): FP8
    experts (float8 with scales, no zeros: not MXFP4's uint8) whose group ``w8a8_applies``, unless
    ``KernelOptions.moe_w8a8`` is off."""
    return (w13_scale is not None and w13_zero is None and w13.dtype != torch.uint8 and current_options().moe_w8a8
            and w8a8_applies(group, w13.shape[2], w13.shape[1] // 2))
