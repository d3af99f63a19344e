"""``nanovllm::lora_add`` as a registered torch op (one opaque graph node, as ``kernels/ops.py``'s are): its default
implementation is the twin (``reference.py``); the CUDA platform registers the Triton kernels (``kernels/cuda.py``).
Out of place, no host sync, slot 0 adds nothing.  Layers call ``lora_add``.
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


OPS = ("lora_add",)


def lora_add(y, x, slots, a, b, scaling) -> torch.Tensor:
    """``y`` [T, N] plus each token's adapter's ``(x @ A.T) @ B.T * scaling`` (``reference.lora_add_reference``)."""
    fn = traced.lookup("lora_add", x.device) or torch.ops.nanovllm.lora_add
    return fn(y, x, slots, a, b, scaling)
