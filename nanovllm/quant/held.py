"""What a layer passes to the ops for a module's weights, by the format the module holds them in.

A scheme that quantizes a module's parameters sets its ``weight_format`` (``FP8`` here: ``kernels/weight_quant.py``'s
float8 with scales per row and group; ``INT4``: ``kernels/int4_quant.py``'s codes, scales and zeros, and a
projection's act-order ``weight_perm``; ``MXFP4``: ``kernels/mxfp4_quant.py``'s e2m1 codes and e8m0 scales, stacked
experts only); a module without one holds plain weights.  Layers call ``linear``, ``expert_args`` and
``keep_rows`` and never ask which scheme made the weights.  A projection's ``weight_dequantized`` (``dequantized.py``:
``dequantize`` of it, kept where memory allows) goes to the op beside the quantized weight.
"""
import torch
from torch import nn

from nanovllm.kernels import int4_quant, mxfp4_quant, ops, weight_quant


class Fp8Format:
    name = "fp8"
    row_tensors = ("weight", "weight_scale")  # what holds one entry per output row

    def linear(self, module, x, bias, silu_mul: bool) -> torch.Tensor:
        return ops.linear(x, module.weight, bias, silu_mul, module.weight_scale, module.quant_group,
                          getattr(module, "weight_dequantized", None))

    def dequantize(self, module, dtype: torch.dtype) -> torch.Tensor:
        return weight_quant.dequantize(module.weight, module.weight_scale, module.quant_group, dtype)

    def dequantized_numel(self, module) -> int:
        return module.weight.numel()

    def expert_args(self, experts) -> tuple:
        return experts.gate_up_proj_scale, experts.down_proj_scale, experts.quant_group, None, None


class Int4Format:
    name = "int4"
    row_tensors = ("weight", "weight_scale", "weight_zero")  # ``weight_perm`` orders columns: every row keeps it

    def linear(self, module, x, bias, silu_mul: bool) -> torch.Tensor:
        return ops.linear_int4(x, module.weight, module.weight_scale, module.weight_zero, module.quant_group,
                               module.weight_perm, bias, silu_mul, getattr(module, "weight_dequantized", None))

    def dequantize(self, module, dtype: torch.dtype) -> torch.Tensor:
        """[N, K] in the packed codes' column order (an act-order ``weight_perm`` still orders x's columns)."""
        return int4_quant.dequantize(module.weight, module.weight_scale, module.weight_zero, module.quant_group, dtype)

    def dequantized_numel(self, module) -> int:
        return module.weight.numel() * 2  # two codes a byte

    def expert_args(self, experts) -> tuple:
        return (experts.gate_up_proj_scale, experts.down_proj_scale, experts.quant_group, experts.gate_up_proj_zero,
                experts.down_proj_zero)


class Mxfp4Format:
    """Stacked experts only (``quant/mxfp4_weights.py``): the ops tell MXFP4 by its uint8 scales and no zeros."""
    name = "mxfp4"
    row_tensors = ()  # no projection holds it

    def linear(self, module, x, bias, silu_mul: bool) -> torch.Tensor:
        raise ValueError("MXFP4 holds stacked experts only, not a projection")

    def expert_args(self, experts) -> tuple:
        return experts.gate_up_proj_scale, experts.down_proj_scale, mxfp4_quant.BLOCK, None, None


FP8, INT4, MXFP4 = Fp8Format(), Int4Format(), Mxfp4Format()


def format_of(module):
    """The format ``module`` holds its quantized weights in, or None: plain weights."""
    return getattr(module, "weight_format", None)


def linear(module, x: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool = False) -> torch.Tensor:
    """``x @ module.weight.T + bias`` (``silu_mul``: the gated halves' SiLU product) by the op of its format."""
    held = format_of(module)
    if held is None:
        return ops.linear(x, module.weight, bias, silu_mul)
    return held.linear(module, x, bias, silu_mul)


def expert_args(experts) -> tuple:
    """(w13_scale, w2_scale, group, w13_zero, w2_zero) of stacked experts for ``ops.fused_moe``: Nones and 0 for
    plain ones."""
    held = format_of(experts)
    return (None, None, 0, None, None) if held is None else held.expert_args(experts)


def keep_rows(module, rows: torch.Tensor) -> None:
    """Keep only output rows ``rows`` of ``module``'s weight (a rank's channels of a projection loaded whole), in
    the format it holds them: each tensor with an entry per row is cut alike (the formats scale rows one by one)."""
    held = format_of(module)
    names = ("weight",) if held is None else held.row_tensors
    if not names:
        raise ValueError(f"{held.name} weights have no rows to keep: {held.name} holds stacked experts only")
    for name in names:
        tensor = getattr(module, name)
        kept = tensor[rows.to(tensor.device)].contiguous()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(kept, requires_grad=False))
        else:
            setattr(module, name, kept)  # a buffer stays one
