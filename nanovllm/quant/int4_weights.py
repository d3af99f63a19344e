"""Int4 weights in a model: which parameters hold int4, how their modules hold them, and dummy weights made int4.

Held in int4 are the parameters ``fp8_weights.quantizable`` lists: the decoder layers' dense projections (attention's
qkv and output, the dense MLP's and a shared expert's gate/up and down: a module's ``weight``) and the stacked routed
experts (``Experts.gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], both or neither); embeddings, the LM head,
norms and routers stay in the model's dtype.  A held parameter ``P`` becomes the uint8 ``qweight`` [..., N, K/2] of
``kernels/int4_quant.py``'s format, its module gains the buffers ``P_scale`` (float16 [..., N, G]) and ``P_zero``
(uint8 [..., N, G]), the int ``quant_group`` and ``weight_format`` ``held.INT4``.  A projection also has
``weight_perm`` (int32 [K] where GPTQ's act order permutes the input columns, else None); experts have none (the
loader dequantizes act-ordered ones).  A module's group is the checkpoint's, capped at its widest (this rank's) K,
which -1 (whole rows) means: the experts' one group serves both stacks, so it is at least max(H, I) there.

``model.int4_scheme`` records where the int4 came from, for ``describe``: the method, the group and which of our
parameters the checkpoint stores in int4 were dequantized into the model's dtype at load instead.
"""
import torch
from torch import nn

from nanovllm.kernels import int4_quant
from nanovllm.quant import fp8_weights, held


def quantizable(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Our parameter name -> (its module, its attribute) for every parameter that may be held in int4."""
    return fp8_weights.quantizable(model)


def module_group(group: int, k: int) -> int:
    """A module's ``quant_group`` for a checkpoint's ``group`` (-1: whole rows) over its widest ``k`` input
    columns."""
    return k if group == -1 else min(group, k)


def widest_k(model: nn.Module) -> dict[int, int]:
    """id(module) -> the most input columns of its quantizable parameters (read before any is held in int4)."""
    widest: dict[int, int] = {}
    for module, attr in quantizable(model).values():
        widest[id(module)] = max(widest.get(id(module), 0), getattr(module, attr).shape[-1])
    return widest


def hold(module: nn.Module, attr: str, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
         perm: torch.Tensor | None = None) -> None:
    """Make ``module``'s parameter ``attr`` the int4 weight (qweight, scale, zero, group, and a projection's
    perm)."""
    setattr(module, attr, nn.Parameter(qweight, requires_grad=False))
    module.register_buffer(f"{attr}_scale", scale, persistent=False)
    module.register_buffer(f"{attr}_zero", zero, persistent=False)
    if attr == "weight":
        module.register_buffer("weight_perm", perm, persistent=False)
    module.quant_group, module.weight_format = group, held.INT4


def prepare_for_checkpoint(model: nn.Module, names: set[str], group: int) -> None:
    """Make the quantizable parameters in ``names`` empty int4 ones in groups of ``group`` columns (-1: whole
    rows), for the loader to fill (a ``weight_perm`` is set by it where the checkpoint has one)."""
    widest = widest_k(model)
    for name, (module, attr) in quantizable(model).items():
        if name in names:
            old = getattr(module, attr)
            width = module_group(group, widest[id(module)])
            rows, k = tuple(old.shape[:-1]), old.shape[-1]
            groups = int4_quant.num_groups(k, width)
            device = old.device
            hold(module, attr, torch.zeros(*rows, k // 2, dtype=torch.uint8, device=device),
                 torch.zeros(*rows, groups, dtype=torch.float16, device=device),
                 torch.zeros(*rows, groups, dtype=torch.uint8, device=device), width)


@torch.no_grad()
def quantize_online(model: nn.Module, scheme: dict, device: torch.device | None = None) -> None:
    """Quantize every quantizable parameter of the loaded ``model`` to int4 in place, round to nearest per row and
    ``scheme["group"]`` columns, symmetric as ``scheme["sym"]`` says (``int4_checkpoint.int4_fields``' dict): dummy
    weights of a GPTQ or AWQ config.  With ``device`` each weight is quantized there and held where it was."""
    widest = widest_k(model)
    for module, attr in quantizable(model).values():
        width = module_group(scheme["group"], widest[id(module)])
        weight = getattr(module, attr)
        parts = int4_quant.quantize(weight.to(device or weight.device), width, scheme["sym"])
        hold(module, attr, *(t.to(weight.device) for t in parts), width)
    model.int4_scheme = dict(method=scheme["method"], group=scheme["group"], dequantized=[])


def describe(model: nn.Module) -> str | None:
    """``"int4 weights (N of M projections and expert stacks, gptq|awq, group G)"`` for a model with int4 weights
    (and what of the checkpoint's int4 was dequantized at load), else None."""
    scheme = getattr(model, "int4_scheme", None)
    if scheme is None:
        return None
    targets = quantizable(model)
    count = sum(held.format_of(m) is held.INT4 for m, _ in targets.values())
    group = "whole rows" if scheme["group"] == -1 else f"group {scheme['group']}"
    text = f"int4 weights ({count} of {len(targets)} projections and expert stacks, {scheme['method']}, {group})"
    experts = sum(".experts." in n for n in scheme["dequantized"])
    if experts:
        text += (f"; {experts} routed expert stack{'s' * (experts > 1)} dequantized at load (GPTQ act orders, or "
                 f"parts mixing int4 and plain weights)")
    mixed = len(scheme["dequantized"]) - experts
    if mixed:
        text += (f"; {mixed} projection{'s' * (mixed > 1)} dequantized at load (their parts mix int4 and plain "
                 f"weights or act orders)")
    return text
