"""Attention, KV store and projections as registered torch ops, so a compiled step sees each as one opaque node.

Every op dispatches on the device of its inputs: CUDA tensors go to the Triton kernels in
``triton_attention.py``, anything else to the pure-PyTorch twins in ``reference.py``.
``NANOVLLM_ATTENTION=reference`` forces the twins everywhere (a debugging aid).
Projections (``linear``) take the Triton skinny-matmul kernel on tuned decode shapes, cuBLAS otherwise.
``rope_store_kv`` fuses the q/k norm, rope and KV store that sit between the qkv projection and attention.
Models call the thin wrappers (``rope_store_kv``, ``store_kv``, ``paged_attention``, ``linear``).
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F

from nanovllm.kernels import reference


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("NANOVLLM_ATTENTION", "auto") != "reference"


@torch.library.custom_op("nanovllm::store_kv", mutates_args=("k_cache", "v_cache"))
def _store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    if _use_triton(key):
        from nanovllm.kernels import triton_attention
        triton_attention.store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv_reference(key, value, k_cache, v_cache, slot_mapping)


@_store_kv.register_fake
def _(key, value, k_cache, v_cache, slot_mapping):
    return None


@torch.library.custom_op("nanovllm::paged_attention", mutates_args=())
def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged KV, for prefill and decode alike.

    The kernel is chosen when the op runs, not when it is traced, so one compiled step serves both: a batch
    with one new token per sequence (every decode step) takes the split-KV decode kernel, any other the
    varlen prefill kernel.  Both compute the same thing for one token per sequence.
    """
    one_token_each = q.shape[0] == context_lens.shape[0]
    if _use_triton(q):
        from nanovllm.kernels import triton_attention
        if one_token_each:
            return triton_attention.decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
        return triton_attention.prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, context_lens,
                                                         block_tables, scale)
    if one_token_each:
        return reference.decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
    return reference.prefill_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)


@_paged_attention.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    return torch.empty_like(q)


@torch.library.custom_op("nanovllm::rope_store_kv", mutates_args=("k_cache", "v_cache"))
def _rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                   q_norm_weight: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor], eps: float,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                   num_kv_heads: int) -> torch.Tensor:
    """Packed qkv -> q [T, Hq, D], with k and v stored: per-head q/k RMSNorm (weights given), rope, KV store.

    bf16/fp16 CUDA tensors take one fused Triton kernel.  float32 (where results must stay those of
    transformers bit for bit) and other devices run the model's own torch code (``reference.py``), then the
    store op's kernel."""
    if _use_triton(qkv) and qkv.dtype != torch.float32:
        from nanovllm.kernels.triton_rope_store import rope_store_kv_triton
        return rope_store_kv_triton(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                                    k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    q, k, v = reference.norm_rope_reference(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                                            num_heads, num_kv_heads, k_cache.shape[3])
    _store_kv(k, v, k_cache, v_cache, slot_mapping)  # the Triton store on CUDA: no host sync, graph-capturable
    return q


@_rope_store_kv.register_fake
def _(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
      num_heads, num_kv_heads):
    return qkv.new_empty(qkv.shape[0], num_heads, k_cache.shape[3])


@torch.library.custom_op("nanovllm::linear", mutates_args=())
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu_mul: bool) -> torch.Tensor:
    """``x @ weight.T + bias``; with ``silu_mul``, ``silu(gate) * up`` of that product's two halves.

    The kernel is chosen when the op runs, from the row count: decode batches whose shape has a measured
    Triton configuration (``matmul_configs.py``) take the skinny kernel, everything else cuBLAS.
    """
    from nanovllm.kernels import matmul_configs
    cfg = matmul_configs.choose(x, weight, silu_mul)
    if cfg is not None:
        from nanovllm.kernels.triton_matmul import linear_triton
        return linear_triton(x, weight, bias, cfg, silu_mul)
    y = F.linear(x, weight, bias)
    if not silu_mul:
        return y
    if x.is_cuda and x.dtype != torch.float32:
        from nanovllm.kernels.triton_matmul import silu_mul_triton
        return silu_mul_triton(y)
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


@_linear.register_fake
def _(x, weight, bias, silu_mul):
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    return x.new_empty(x.shape[0], n)


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    torch.ops.nanovllm.store_kv(key, value, k_cache, v_cache, slot_mapping)


def rope_store_kv(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps: float, k_cache, v_cache,
                  slot_mapping, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    return torch.ops.nanovllm.rope_store_kv(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                                            k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale: float) -> torch.Tensor:
    return torch.ops.nanovllm.paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)


def linear(x, weight, bias=None, silu_mul: bool = False) -> torch.Tensor:
    """A projection of ``x`` [T, K] (see ``_linear``); ``silu_mul`` takes the packed MLP gate/up weight."""
    return torch.ops.nanovllm.linear(x, weight, bias, silu_mul)
