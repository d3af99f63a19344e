"""The linear-attention ops as registered torch ops (one opaque graph node each, as ``kernels/ops.py``'s are):
``nanovllm::causal_conv1d`` and ``nanovllm::gated_delta_rule``.  Their default implementations are the twins in
``reference.py`` (any device); the CUDA platform registers the Triton kernels (``cuda.py``).  Both mutate only
their state pool, read each row's slot before writing it, and never sync with the host.  Models call the
wrappers below.  A prefill step may also snapshot a row's states inside its chunk (``capture_slots``,
``capture_lens``: a prefix-cache snapshot, ``engine/hybrid_state.py``) after a multiple of ``CAPTURE_ALIGN`` tokens
(the chunked kernel's chunks end there); a decode step takes none.  A verify step of speculative decoding (one row
per token, ``engine/verify_step.py``) chains a sequence's rows (``state_chain``: n at the first, 0 at the n - 1
after it, 1 at a row alone): they run in order from the first row's slot, and each row writes the states after its
token to its own slot (``state_slots``), so the engine keeps the one after the last accepted token.  ``max_chain``
(a Python int, the most rows a chain has) is 1 where no step chains rows: the ops then read ``state_chain`` nowhere.
"""
import torch

from nanovllm import traced
from nanovllm.kernels.linear_attention import reference

CAPTURE_ALIGN = 64  # a snapshot inside a row's chunk ends this many tokens (times n) after the chunk's start


@torch.library.custom_op("nanovllm::causal_conv1d", mutates_args=("conv_state",))
def _causal_conv1d(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, state_slots: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, capture_slots: torch.Tensor,
                   capture_lens: torch.Tensor, state_chain: torch.Tensor, max_chain: int) -> torch.Tensor:
    return reference.causal_conv1d_reference(x, weight, conv_state, state_slots, cu_seqlens_q, context_lens,
                                             capture_slots, capture_lens, state_chain, max_chain)


@_causal_conv1d.register_fake
def _(x, weight, conv_state, state_slots, cu_seqlens_q, context_lens, capture_slots, capture_lens, state_chain,
      max_chain):
    return torch.empty_like(x)


@torch.library.custom_op("nanovllm::gated_delta_rule", mutates_args=("ssm_state",))
def _gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      ssm_state: torch.Tensor, state_slots: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      context_lens: torch.Tensor, capture_slots: torch.Tensor, capture_lens: torch.Tensor,
                      state_chain: torch.Tensor, max_chain: int) -> torch.Tensor:
    return reference.gated_delta_rule_reference(q, k, v, g, beta, ssm_state, state_slots, cu_seqlens_q,
                                                context_lens, capture_slots, capture_lens, state_chain, max_chain)


@_gated_delta_rule.register_fake
def _(q, k, v, g, beta, ssm_state, state_slots, cu_seqlens_q, context_lens, capture_slots, capture_lens, state_chain,
      max_chain):
    return torch.empty_like(v)


OPS = ("causal_conv1d", "gated_delta_rule")


def causal_conv1d(x, weight, conv_state, state_slots, cu_seqlens_q, context_lens, capture_slots, capture_lens,
                  state_chain, max_chain: int = 1) -> torch.Tensor:
    """SiLU(causal depthwise conv) of ``x`` [T, D] over each row's history (``reference.causal_conv1d_reference``)."""
    fn = traced.lookup("causal_conv1d", x.device) or torch.ops.nanovllm.causal_conv1d
    return fn(x, weight, conv_state, state_slots, cu_seqlens_q, context_lens, capture_slots, capture_lens,
              state_chain, max_chain)


def gated_delta_rule(q, k, v, g, beta, ssm_state, state_slots, cu_seqlens_q, context_lens, capture_slots,
                     capture_lens, state_chain, max_chain: int = 1) -> torch.Tensor:
    """Outputs [T, HV, DV] of the gated delta rule (``reference.gated_delta_rule_reference``)."""
    fn = traced.lookup("gated_delta_rule", q.device) or torch.ops.nanovllm.gated_delta_rule
    return fn(q, k, v, g, beta, ssm_state, state_slots, cu_seqlens_q, context_lens, capture_slots, capture_lens,
              state_chain, max_chain)
