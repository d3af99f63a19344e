"""The oracle of W8A8 FP8 experts: transformers' own MoE models, their experts' forward replaced for the duration of
``w8a8_experts()`` by one that rounds each expert's input and its ``act(gate) * up`` as ``kernels/act_quant.py``
says, and takes both products in float32.  Everything else (attention, routing, the weighting by the router, the
sum over a token's experts) stays transformers' code.  ``engine_w8a8(model)``: whether a built engine model has
such experts (``tools/oracle.py`` then runs transformers in the context).  ``tests/test_moe_w8a8.py`` tests both."""
import contextlib

import torch
import torch.nn.functional as F

from nanovllm.kernels import act_quant


def _experts_classes():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextExperts
    return Qwen3MoeExperts, Qwen2MoeExperts, MixtralExperts, Qwen3NextExperts, Qwen3_5MoeExperts


def w8a8_forward(self, hidden_states, top_k_index, top_k_weights, shards: int = 1):
    """An experts module's forward (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) with W8A8 rounding; the
    intermediate is rounded in ``shards`` equal column slices apart, as tensor-parallel ranks round theirs."""
    out = torch.zeros_like(hidden_states)
    for expert in range(self.num_experts):
        token_idx, pos = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        x = act_quant.dequantized(hidden_states[token_idx])
        gate, up = F.linear(x, self.gate_up_proj[expert].float()).chunk(2, dim=-1)
        h = torch.cat([act_quant.dequantized(part) for part in (self.act_fn(gate) * up).chunk(shards, dim=-1)], -1)
        y = F.linear(h, self.down_proj[expert].float()) * top_k_weights[token_idx, pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def engine_w8a8(model) -> bool:
    """Whether any stacked experts of our ``model`` (a module with 3-D ``gate_up_proj``) run W8A8."""
    for m in model.modules():
        w13 = getattr(m, "gate_up_proj", None)
        if isinstance(w13, torch.Tensor) and w13.dim() == 3 and act_quant.moe_w8a8(
                w13, getattr(m, "gate_up_proj_scale", None), getattr(m, "gate_up_proj_zero", None),
                getattr(m, "quant_group", 0)):
            return True
    return False


@contextlib.contextmanager
def w8a8_experts(shards: int = 1):
    """transformers' Qwen3-MoE, Qwen2-MoE and Mixtral experts in W8A8 while the context lasts (``shards``: the
    tensor-parallel size the engine ran at)."""
    classes = _experts_classes()
    saved = [cls.forward for cls in classes]
    for cls in classes:
        cls.forward = lambda self, *args, **kwargs: w8a8_forward(self, *args, **kwargs, shards=shards)
    try:
        yield
    finally:
        for cls, forward in zip(classes, saved):
            cls.forward = forward
