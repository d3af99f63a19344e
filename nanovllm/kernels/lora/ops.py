"""``nanovllm::lora_add`` and ``nanovllm::lora_expand`` as registered torch ops (each one opaque graph node, as
``kernels/ops.py``'s are): their default implementations are the twins (``reference.py``); the CUDA platform
registers the Triton kernels (``kernels/cuda.py``).  Out of place, no host sync, slot 0 adds nothing.  Layers call
``lora_add`` (shrink and expand), or ``lora_expand`` where the base product already did the shrink.
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


@torch.library.custom_op("nanovllm::lora_expand", mutates_args=())
def _lora_expand(y: torch.Tensor, h: torch.Tensor, slots: torch.Tensor, b: torch.Tensor,
                 scaling: torch.Tensor) -> torch.Tensor:
    return reference.lora_expand_reference(y, h, slots, b, scaling)


@_lora_expand.register_fake
def _(y, h, slots, b, scaling):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


OPS = ("lora_add", "lora_expand")


def lora_add(y, x, slots, a, b, scaling) -> torch.Tensor:
    """``y`` [T, N] plus each token's adapter's ``(x @ A.T) @ B.T * scaling`` (``reference.lora_add_reference``)."""
    fn = traced.lookup("lora_add", x.device) or torch.ops.nanovllm.lora_add
    return fn(y, x, slots, a, b, scaling)


def lora_expand(y, h, slots, b, scaling) -> torch.Tensor:
    """``y`` [T, N] plus each token's adapter's ``h[t, s*R:(s+1)*R] @ B.T * scaling`` (``h`` [T, S*R] every slot's
    shrink: ``reference.lora_expand_reference``)."""
    fn = traced.lookup("lora_expand", y.device) or torch.ops.nanovllm.lora_expand
    return fn(y, h, slots, b, scaling)
