"""What the CPU platform registers for the ops.

The ops' default implementations, their pure-PyTorch twins, already serve CPU tensors.  One more thing pays on
CPU: Inductor's decomposition table gets the twin of ``nanovllm::gumbel_argmax``, so a compiled step inlines the
sampler and fuses its [B, V] hash, noise and argmax into one loop, instead of calling the opaque op, which runs
the twin eagerly one [B, V] temporary at a time.  The decomposition declines (``NotImplemented``) for tensors of
any other device, which keep their registered kernel.  Registering again is a no-op.
"""
import torch

from nanovllm.kernels import ops  # noqa: F401  (defines the ops)
from nanovllm.kernels.sampling import gumbel_argmax_reference

_registered = False


def _gumbel_argmax_inline(logits, temperature, seeds, positions):
    if logits.device.type != "cpu":
        return NotImplemented
    return gumbel_argmax_reference(logits, temperature, seeds, positions)


def register_cpu_kernels() -> None:
    """Let Inductor inline the sampler's twin into compiled CPU steps (idempotent)."""
    global _registered
    if _registered:
        return
    from torch._inductor.decomposition import register_decomposition
    register_decomposition(torch.ops.nanovllm.gumbel_argmax.default)(_gumbel_argmax_inline)
    _registered = True
