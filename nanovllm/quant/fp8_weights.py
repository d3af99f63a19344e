"""FP8 weights in a model: which parameters are quantized, how their modules hold them, and online quantization.

Quantized are the projections of every decoder layer (attention's qkv and output, the dense MLP's gate/up and
down, a shared expert's) and the stacked routed experts; embeddings, the LM head, norms, routers, the shared
expert's gate and vision towers stay in the model's dtype.  A quantized parameter ``P`` of a module becomes
float8_e4m3fn, its module gains the float32 buffer ``P_scale``, the int ``quant_group`` and ``weight_format``
``held.FP8`` (``kernels/weight_quant.py`` states the format; ``held.py`` passes it to the ops).

* ``quantize_online(model)``: the loaded weights quantized in place with one scale per output row (vLLM's
  ``quantization="fp8"`` on an unquantized checkpoint or dummy weights), one parameter at a time.  A module's
  ``quant_group`` is then its widest K; a row-parallel shard takes the whole row's largest magnitude from every
  rank, so tensor parallelism quantizes exactly as one GPU does.
* ``prepare_for_checkpoint(model, names, group)``: the parameters ``names`` (those whose every checkpoint part is
  float8) made FP8 and empty, for the loader to fill with the checkpoint's bytes and scales.
* ``keep_dequantized(model, dtype, mode)``: the loaded projections' dequantized copies, where they cost little.
"""
import itertools

import torch
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.kernels import weight_quant
from nanovllm.logger import logger
from nanovllm.quant import held

DEQUANTIZED_SHARE = 1 / 8  # "auto" keeps the copies while they add at most this share to the weights' bytes


def quantizable(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Our parameter name -> (its module, its attribute name) for every parameter this scheme quantizes."""
    return {name: (module, attr) for name, (module, attr, _) in _targets(model).items()}


def _targets(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """``quantizable``'s entries with whether tensor parallelism splits the parameter's input columns (row-parallel:
    attention's output and the down projections): the model's own ``quant_targets()``."""
    return model.quant_targets()


def _replace(module: nn.Module, attr: str, weight: torch.Tensor, scale: torch.Tensor, group: int) -> None:
    setattr(module, attr, nn.Parameter(weight, requires_grad=False))
    module.register_buffer(f"{attr}_scale", scale, persistent=False)
    module.quant_group, module.weight_format = group, held.FP8


@torch.no_grad()
def quantize_online(model: nn.Module, group: int | None = None) -> None:
    """Quantize every quantizable parameter of the loaded ``model`` in place (the old storage is freed as each
    one is replaced): one scale per row, or per row and ``group`` columns."""
    targets = _targets(model).values()
    widest: dict[int, int] = {}
    for module, attr, _ in targets:
        widest[id(module)] = max(widest.get(id(module), 0), getattr(module, attr).shape[-1])
    for module, attr, row_parallel in targets:
        weight = getattr(module, attr)
        columns = group or widest[id(module)]
        amax = weight_quant.group_amax(weight, columns)
        if group is None and row_parallel:
            amax = distributed.agree_max(amax)
        q, scale = weight_quant.quantize(weight, columns, amax)
        _replace(module, attr, q, scale, columns)


def prepare_for_checkpoint(model: nn.Module, names: set[str], group: int) -> None:
    """Make the quantizable parameters in ``names`` empty FP8 ones with zero scales of ``group`` columns."""
    for name, (module, attr) in quantizable(model).items():
        if name in names:
            old = getattr(module, attr)
            scale = torch.zeros(*old.shape[:-1], weight_quant.num_groups(old.shape[-1], group), dtype=torch.float32,
                                device=old.device)
            _replace(module, attr, torch.empty(old.shape, dtype=weight_quant.FP8_DTYPE, device=old.device), scale,
                     group)


def describe(model: nn.Module) -> str | None:
    """``"fp8 weights (N of M ..., scales per ...)"`` for a model with FP8 weights, else None."""
    targets = quantizable(model)
    quantized = [(m, a) for m, a in targets.values() if weight_quant.is_fp8(getattr(m, a))]
    if not quantized:
        return None
    per_row = all(m.quant_group >= getattr(m, a).shape[-1] for m, a in quantized)
    groups = "row" if per_row else "row and " + "/".join(map(str, sorted({m.quant_group for m, _ in quantized}))) \
        + " columns"
    return f"fp8 weights ({len(quantized)} of {len(targets)} projections and expert stacks, scales per {groups})"


@torch.no_grad()
def keep_dequantized(model: nn.Module, dtype: torch.dtype, mode: str = "auto") -> int:
    """Keep beside each FP8 projection (a module's ``weight`` with ``weight_scale``; never stacked experts) its
    ``weight_quant.dequantize`` in ``dtype``, the buffer ``weight_dequantized``, which ``held.linear`` hands to
    ``ops.linear``: where a product goes to cuBLAS (past the few-row kernels) it then multiplies by the copy
    instead of dequantizing the weight on every call.  The products are the same bit for bit; the copies cost
    memory.  ``mode``: "auto" keeps them where they add at most ``DEQUANTIZED_SHARE`` to the model's weight bytes
    (a mixture of experts' attention; a dense FP8 model keeps none), "on" always, "off" never.  Returns how many
    were kept."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"fp8 dequantized copies: mode {mode!r} is not one of auto, on, off")
    projections = [m for m in model.modules()
                   if held.format_of(m) is held.FP8 and isinstance(getattr(m, "weight_scale", None), torch.Tensor)]
    cost = sum(m.weight.numel() for m in projections) * dtype.itemsize
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    if not projections or mode == "off" or (mode == "auto" and cost > DEQUANTIZED_SHARE * weights):
        return 0
    for m in projections:
        m.register_buffer("weight_dequantized", weight_quant.dequantize(m.weight, m.weight_scale, m.quant_group,
                                                                        dtype), persistent=False)
    logger.info("kept %d FP8 projections dequantized beside their weights (%.2f GiB, %.1f%% of the weights' %.2f): "
                "cuBLAS takes them without dequantizing each call", len(projections), cost / 2**30,
                100 * cost / weights, weights / 2**30)
    return len(projections)
