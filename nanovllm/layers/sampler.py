"""The sampler of a step: token ids from logits with greedy, temperature, min-p, top-k, top-p and per-request seeds.

``sample(..., filtered=False)`` (every decode step) is the op ``nanovllm::gumbel_argmax``, one opaque node in a
compiled step whose implementation the platform chose (the fused Triton kernel on CUDA, the torch twin
elsewhere).  Top-k / top-p need a full sort of the vocabulary, which costs more than the rest of a small model's
decode step, so the plain path skips them (and min-p, applied first where filtered) and the runner calls
``sample(..., filtered=True)`` only for batches that need it; that path is torch code with the same noise.  The math, and why draws are reproducible whatever shares
a batch, is ``nanovllm/kernels/sampling.py``.
"""
import torch

from nanovllm.kernels import ops
from nanovllm.kernels.sampling import (  # noqa: F401  (re-exported: the sampler's math, for callers of this module)
    filtered_gumbel_argmax, gumbel_argmax_reference, gumbel_noise, uniform_from_bits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, positions: torch.Tensor, filtered: bool = False,
           min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> token ids [B] int64: greedy where temperature == 0.

    ``filtered`` applies each row's ``min_p`` (0: off; None: none), ``top_k`` (< 0: off) and ``top_p``; without
    it they are ignored."""
    if not filtered:
        return ops.gumbel_argmax(logits, temperature, seeds, positions)
    return filtered_gumbel_argmax(logits, temperature, top_k, top_p, seeds, positions, min_p)
