"""``nanovllm::lora_linear`` on CUDA: a projection whose pool's A is stacked under its weight (``lora/pool.py``).
Up to ``FOLD_MAX_TOKENS`` tokens one cuBLAS product by the whole stack makes the base outputs and every slot's
shrink, and ``triton_lora.lora_expand_triton`` adds each token's expand (two launches where ``lora_add`` takes three
with the base product).  Past it the base product by the weight's rows (``nanovllm::linear``, its tuned configs too)
and ``lora_add`` (its stacked products), which the expand walking its block's slots loses to from 64 tokens
(docs/PERFORMANCE.md, Multi-LoRA).  The choice is made inside the op, so a graph keeps one node.
"""
import torch

from nanovllm.kernels import ops
from nanovllm.kernels.lora.triton_lora import lora_add_triton, lora_expand_triton

FOLD_MAX_TOKENS = 16  # kernels-lora: the stack and the expand take less than lora_add to 16 tokens, more at 64


def lora_linear_cuda(x: torch.Tensor, fold: torch.Tensor, bias: torch.Tensor | None, slots: torch.Tensor,
                     b: torch.Tensor, scaling: torch.Tensor, n: int, a_row: int) -> torch.Tensor:
    """The twin's result (``reference.lora_linear_reference``)."""
    if x.shape[0] <= FOLD_MAX_TOKENS:
        z = torch.nn.functional.linear(x, fold)
        y = z[:, :n] if bias is None else z[:, :n] + bias
        return lora_expand_triton(y, z[:, a_row:], slots, b, scaling)
    a = fold[a_row:].view(b.shape[0], -1, fold.shape[1])
    return lora_add_triton(ops.linear(x, fold[:n], bias), x, slots, a, b, scaling)
