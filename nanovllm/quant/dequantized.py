"""Quantized projections' dequantized copies: memory spent where it is cheap, so large products skip dequantizing.

Past the few-row kernels an FP8 or int4 projection is multiplied by cuBLAS on its weight dequantized into the
model's dtype, which the ops otherwise do on every call (``kernels/cuda.py``; the PyTorch twins that other devices
run do too).  ``keep(model, dtype, mode)`` makes that dequantized weight once, at start-up, as the module's buffer
``weight_dequantized`` (``held.py``'s formats say how, and hand it to the ops), for every quantized projection;
stacked experts never get one.  Where the ops would dequantize, the products are the same bit for bit; with a copy
cuBLAS also takes the rows the Triton kernels would stream (``cuda.KEPT_COPY_FROM`` on), in its own sum order.  The
copies cost memory, counted before the KV cache is sized.

``mode`` (``NANOVLLM_DEQUANTIZED_COPIES``): "auto" keeps them where they add at most ``SHARE`` to the model's weight
bytes on their device (a mixture of experts, whose projections are its attention; a dense quantized model keeps
none, and neither does one whose experts live on the host, ``offload_experts``), "on" always, "off" never.
"""
import itertools

import torch
from torch import nn

from nanovllm.logger import logger
from nanovllm.quant import held

SHARE = 1 / 8  # "auto" keeps the copies while they add at most this share to the weights' bytes
MODES = ("auto", "on", "off")


def projections(model: nn.Module) -> list[nn.Module]:
    """The modules holding a quantized projection (a ``weight`` with its ``weight_scale``; never stacked experts)."""
    return [m for m in model.modules()
            if held.format_of(m) is not None and isinstance(getattr(m, "weight_scale", None), torch.Tensor)]


@torch.no_grad()
def keep(model: nn.Module, dtype: torch.dtype, mode: str = "auto") -> int:
    """Give each quantized projection of ``model`` its ``weight_dequantized`` in ``dtype`` where ``mode`` says so
    (the module docstring); returns how many were kept."""
    if mode not in MODES:
        raise ValueError(f"dequantized copies: mode {mode!r} is not one of {', '.join(MODES)}")
    kept = projections(model)
    if not kept or mode == "off":
        return 0
    cost = sum(held.format_of(m).dequantized_numel(m) for m in kept) * dtype.itemsize
    device = kept[0].weight.device
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())
                  if t.device == device)  # what the device holds: offloaded experts stay out
    if mode == "auto" and cost > SHARE * weights:
        return 0
    for m in kept:
        m.register_buffer("weight_dequantized", held.format_of(m).dequantize(m, dtype), persistent=False)
    logger.info("kept %d quantized projections dequantized beside their weights (%.2f GiB, %.1f%% of the weights' "
                "%.2f): cuBLAS takes them without dequantizing each call (NANOVLLM_DEQUANTIZED_COPIES=off leaves "
                "that memory to the KV cache)", len(kept), cost / 2**30, 100 * cost / weights, weights / 2**30)
    return len(kept)


def copy_bytes(model: nn.Module) -> int:
    """The bytes of the dequantized copies ``model``'s projections keep (0: none)."""
    return sum(m.weight_dequantized.numel() * m.weight_dequantized.element_size() for m in model.modules()
               if isinstance(getattr(m, "weight_dequantized", None), torch.Tensor))
