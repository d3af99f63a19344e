"""What the CPU platform registers for the ops.

The ops' default implementations, their pure-PyTorch twins, already serve CPU tensors.  One more thing pays on
CPU: Inductor's decomposition table gets the twins of ``nanovllm::gumbel_argmax`` and ``nanovllm::process_logits``,
so a compiled step inlines them and fuses their [B, V] elementwise work (hash, noise and argmax; penalties and
mask) into loops, instead of calling the opaque ops, which run the twins eagerly one [B, V] temporary at a time.
The decompositions decline (``NotImplemented``) for tensors of any other device, which keep their registered
kernels.  Registering again is a no-op.

Inductor memoises a copy of its table (``fast_random_decomps``, ``functools.cache``) at the first compile of the
process; registering clears that copy, so a process that compiled something before making its CPU platform still
inlines the twins.
"""
import torch

from nanovllm.kernels import ops  # noqa: F401  (defines the ops)
from nanovllm.kernels.logits import process_logits_reference
from nanovllm.kernels.sampling import gumbel_argmax_reference

_registered = False


def _gumbel_argmax_inline(logits, temperature, seeds, positions):
    if logits.device.type != "cpu":
        return NotImplemented
    return gumbel_argmax_reference(logits, temperature, seeds, positions)


def _process_logits_inline(logits, slots, params, bitmask, counts, seen):
    if logits.device.type != "cpu":
        return NotImplemented
    return process_logits_reference(logits, slots, params, bitmask, counts, seen)


def register_cpu_kernels() -> None:
    """Let Inductor inline the sampler's and the logits processor's twins into compiled CPU steps (idempotent)."""
    global _registered
    if _registered:
        return
    from torch._inductor.decomposition import register_decomposition
    register_decomposition(torch.ops.nanovllm.gumbel_argmax.default)(_gumbel_argmax_inline)
    register_decomposition(torch.ops.nanovllm.process_logits.default)(_process_logits_inline)
    _forget_memoised_tables()
    _registered = True


def _forget_memoised_tables() -> None:
    """Drop Inductor's memoised copy of its decomposition table, which a compile before registering would have
    made without our entries (the next compile copies the table anew)."""
    from torch._inductor import decomposition
    memoised = getattr(decomposition, "fast_random_decomps", None)
    if hasattr(memoised, "cache_clear"):
        memoised.cache_clear()
