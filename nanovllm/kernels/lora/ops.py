"""``nanovllm::lora_add`` and ``nanovllm::lora_linear`` as registered torch ops (each one opaque graph node, as
``kernels/ops.py``'s are): their default implementations are the twins (``reference.py``); the CUDA platform
registers the Triton kernels (``kernels/cuda.py``, ``folded.py``).  Out of place, no host sync, slot 0 adds nothing.
Layers call ``lora_add`` after their base product, or ``lora_linear`` for the base product and the adapters at once
where the pool's A is stacked under the weight (``lora/pool.py``): how it splits the work is each platform's.
"""
import torch

from nanovllm import traced
from nanovllm.kernels.lora import reference


@torch.library.custom_op("nanovllm::lora_add", mutates_args=())
def _lora_add(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              scaling: torch.Tensor) -> torch.Tensor:
    return reference.lora_add_reference(y, x, slots, a, b, scaling)


@_lora_add.register_fake
def _(y, x, slots, a, b, scaling):
    return torch.empty_like(y)


@torch.library.custom_op("nanovllm::lora_linear", mutates_args=())
def _lora_linear(x: torch.Tensor, fold: torch.Tensor, bias: torch.Tensor | None, slots: torch.Tensor,
                 b: torch.Tensor, scaling: torch.Tensor, n: int, a_row: int) -> torch.Tensor:
    return reference.lora_linear_reference(x, fold, bias, slots, b, scaling, n, a_row)


@_lora_linear.register_fake
def _(x, fold, bias, slots, b, scaling, n, a_row):
    return x.new_empty((x.shape[0], n))


OPS = ("lora_add", "lora_linear")


def lora_add(y, x, slots, a, b, scaling) -> torch.Tensor:
    """``y`` [T, N] plus each token's adapter's ``(x @ A.T) @ B.T * scaling`` (``reference.lora_add_reference``)."""
    fn = traced.lookup("lora_add", x.device) or torch.ops.nanovllm.lora_add
    return fn(y, x, slots, a, b, scaling)


def lora_linear(x, fold, bias, slots, b, scaling, n: int, a_row: int) -> torch.Tensor:
    """``x @ fold[:n].T + bias`` plus each token's adapter's product, A being ``fold[a_row:]`` viewed [S, R, K]
    (``reference.lora_linear_reference``)."""
    fn = traced.lookup("lora_linear", x.device) or torch.ops.nanovllm.lora_linear
    return fn(x, fold, bias, slots, b, scaling, int(n), int(a_row))
