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
"""
import torch
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.kernels import weight_quant
from nanovllm.quant import held


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
