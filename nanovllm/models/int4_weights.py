"""Int4 weights in a model: which parameters hold int4, how their modules hold them, and dummy weights made int4.

Held in int4 are the decoder layers' dense projections that ``fp8_weights.quantizable`` lists (attention's qkv and
output, the dense MLP's and a shared expert's gate/up and down); the stacked routed experts, embeddings, the LM
head, norms and routers stay in the model's dtype.  A module holding one has its parameter ``weight`` replaced by
the uint8 ``qweight`` [N, K/2] of ``kernels/int4_quant.py``'s format, with the buffers ``weight_scale`` (float16
[N, G]), ``weight_zero`` (uint8 [N, G]) and ``weight_perm`` (int32 [K] where GPTQ's act order permutes the input
columns, else None), and the int ``quant_group`` (``int4_quant.is_int4`` checks ``weight_zero``).  A group wider
than the module's (this rank's) K is stored as K: one group per row either way.

``model.int4_scheme`` records where the int4 came from, for ``describe``: the method, the group and which of our
parameters the checkpoint stores in int4 were dequantized into the model's dtype at load instead.
"""
import torch
from torch import nn

from nanovllm.kernels import int4_quant
from nanovllm.models import fp8_weights


def quantizable(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Our parameter name -> (its module, "weight") for every parameter that may be held in int4."""
    return {name: (m, attr) for name, (m, attr) in fp8_weights.quantizable(model).items() if attr == "weight"}


def module_group(group: int, k: int) -> int:
    """A module's ``quant_group`` for a checkpoint's ``group`` (-1: whole rows) over its ``k`` input columns."""
    return k if group == -1 else min(group, k)


def hold(module: nn.Module, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
         perm: torch.Tensor | None = None) -> None:
    """Make ``module``'s ``weight`` the int4 weight (qweight, scale, zero, group, perm)."""
    module.weight = nn.Parameter(qweight, requires_grad=False)
    module.register_buffer("weight_scale", scale, persistent=False)
    module.register_buffer("weight_zero", zero, persistent=False)
    module.register_buffer("weight_perm", perm, persistent=False)
    module.quant_group = group


def prepare_for_checkpoint(model: nn.Module, names: set[str], group: int) -> None:
    """Make the quantizable parameters in ``names`` empty int4 ones in groups of ``group`` columns (-1: whole
    rows), for the loader to fill (a ``weight_perm`` is set by it where the checkpoint has one)."""
    for name, (module, _) in quantizable(model).items():
        if name in names:
            n, k = module.weight.shape
            width = module_group(group, k)
            groups = int4_quant.num_groups(k, width)
            device = module.weight.device
            hold(module, torch.zeros(n, k // 2, dtype=torch.uint8, device=device),
                 torch.zeros(n, groups, dtype=torch.float16, device=device),
                 torch.zeros(n, groups, dtype=torch.uint8, device=device), width)


@torch.no_grad()
def quantize_online(model: nn.Module, scheme: dict) -> None:
    """Quantize every quantizable parameter of the loaded ``model`` to int4 in place, round to nearest per row and
    ``scheme["group"]`` columns, symmetric as ``scheme["sym"]`` says (``int4_checkpoint.int4_config``'s dict): dummy
    weights of a GPTQ or AWQ config."""
    for module, _ in quantizable(model).values():
        width = module_group(scheme["group"], module.weight.shape[1])
        hold(module, *int4_quant.quantize(module.weight, width, scheme["sym"]), width)
    model.int4_scheme = dict(method=scheme["method"], group=scheme["group"], dequantized=[])


def describe(model: nn.Module) -> str | None:
    """``"int4 weights (N of M projections, gptq|awq, group G)"`` for a model with int4 weights (and what of the
    checkpoint's int4 was dequantized at load), else None."""
    scheme = getattr(model, "int4_scheme", None)
    if scheme is None:
        return None
    targets = quantizable(model)
    held = sum(int4_quant.is_int4(m) for m, _ in targets.values())
    group = "whole rows" if scheme["group"] == -1 else f"group {scheme['group']}"
    text = f"int4 weights ({held} of {len(targets)} projections, {scheme['method']}, {group})"
    experts = [n for n in scheme["dequantized"] if ".experts." in n]
    if experts:
        text += f"; routed experts dequantized at load ({len(experts)} expert stacks)"
    mixed = len(scheme["dequantized"]) - len(experts)
    if mixed:
        text += (f"; {mixed} projection{'s' * (mixed > 1)} dequantized at load (their parts mix int4 and plain "
                 f"weights or act orders)")
    return text
