"""The fused ops of a step as registered torch ops, so a compiled step sees each as one opaque node.

``nanovllm::store_kv``, ``rope_store_kv``, ``paged_attention``, ``linear``, ``linear_int4``, ``fused_moe``,
``moe_experts``, ``process_logits`` and ``gumbel_argmax`` are each a ``torch.library.custom_op`` whose default
implementation is its pure-PyTorch twin (``reference.py``, ``moe_reference.py``, ``logits.py``, ``sampling.py``,
any device), with a fake for tracing.  A platform registers faster ones per device type (``register_kernel``;
CUDA: ``cuda.py``); the dispatcher picks by the inputs' device, so models and layers call the wrappers below.

A platform whose graph compiler lowers only ops it knows may also register, per device type, a *traced
implementation* of an op (``register_traced``): a function of ops that compiler converts, which Dynamo traces in
place of the opaque op while compiling (the NPU platform, ``kernels/npu.py``).  Eager calls take the registered kernel.

Shared contracts (``reference.py``: cache layout, ``context_lens``; ``kv_quant.py``, ``weight_quant.py``: FP8 scales,
None otherwise; ``int4_quant.py``: int4 weights): no host sync or data-dependent shapes (graph-capturable); slot -1
is never written; a row with context 0 gets zeros; ``gumbel_argmax`` is greedy where the temperature is 0.
"""
from typing import Callable, Optional

import torch

from nanovllm import traced
from nanovllm.kernels import logits as logits_twin
from nanovllm.kernels import moe_reference, reference, sampling
from nanovllm.kernels.linear_attention import ops as la_ops
from nanovllm.kernels.lora import ops as lora_ops


@torch.library.custom_op("nanovllm::store_kv", mutates_args=("k_cache", "v_cache"))
def _store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor],
              v_scale: Optional[torch.Tensor]) -> None:
    reference.store_kv_reference(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@_store_kv.register_fake
def _(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    return None


@torch.library.custom_op("nanovllm::paged_attention", mutates_args=())
def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                     k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], window: int,
                     sinks: Optional[torch.Tensor], softcap: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged KV, for prefill and decode alike.

    Implementations choose their kernel when the op runs, not when it is traced, so one compiled step serves
    both: a batch with one new token per sequence (every decode step) may take a decode kernel, any other the
    varlen prefill kernel.  Both compute the same thing for one token per sequence.

    ``window`` W > 0: the query at position p sees keys p - W < j <= p only (transformers' sliding window; 0: full
    causal), and no implementation reads a KV block lying wholly before the earliest key a sequence's queries see
    (its block-table entry may hold anything).  ``sinks`` [Hq] (any float dtype, used in float32): a logit per
    query head in the softmax denominator only (GPT-OSS).  ``softcap`` > 0: scores ``softcap * tanh(s / softcap)``
    before masking (Gemma 2; 0: off).  See ``reference.paged_attention_reference``."""
    return reference.paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                               k_scale, v_scale, window, sinks, softcap)


@_paged_attention.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, k_scale, v_scale, window, sinks,
      softcap):
    return torch.empty_like(q)


@torch.library.custom_op("nanovllm::rope_store_kv", mutates_args=("k_cache", "v_cache"))
def _rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                   q_norm_weight: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor], eps: float,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                   num_kv_heads: int, k_scale: Optional[torch.Tensor],
                   v_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Packed qkv -> q [T, Hq, D], with k and v stored: per-head q/k RMSNorm (weights given), rope, KV store."""
    return reference.rope_store_kv_reference(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                                             k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, k_scale,
                                             v_scale)


@_rope_store_kv.register_fake
def _(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
      num_heads, num_kv_heads, k_scale, v_scale):
    return qkv.new_empty(qkv.shape[0], num_heads, k_cache.shape[3])


@torch.library.custom_op("nanovllm::linear", mutates_args=())
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu_mul: bool,
            weight_scale: Optional[torch.Tensor], group: int, dequantized: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight.T + bias``; with ``silu_mul``, ``silu(gate) * up`` of that product's two halves.  An FP8
    ``weight`` comes with its ``weight_scale`` per row and ``group`` columns (``weight_quant.py``), else None, 0;
    and may come with ``dequantized``, ``weight_quant.dequantize`` of it kept in the model's dtype (None: not kept;
    ``quant/dequantized.py``), which an implementation may multiply by in place of dequantizing: the same values."""
    return reference.linear_reference(x, weight, bias, silu_mul, weight_scale, group, dequantized)


@_linear.register_fake
def _(x, weight, bias, silu_mul, weight_scale, group, dequantized):
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("nanovllm::linear_int4", mutates_args=())
def _linear_int4(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], silu_mul: bool,
                 dequantized: Optional[torch.Tensor]) -> torch.Tensor:
    """``x[:, perm] @ W.T + bias`` (``perm`` None: x as is) for an int4 weight W = (qweight, scale, zero) in groups
    of ``group`` columns (``int4_quant.py``); ``silu_mul`` and ``dequantized`` (W kept dequantized) as ``_linear``'s."""
    return reference.linear_int4_reference(x, qweight, scale, zero, group, perm, bias, silu_mul, dequantized)


@_linear_int4.register_fake
def _(x, qweight, scale, zero, group, perm, bias, silu_mul, dequantized):
    n = qweight.shape[0] // 2 if silu_mul else qweight.shape[0]
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("nanovllm::fused_moe", mutates_args=())
def _fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
               renormalize: bool, w13_scale: Optional[torch.Tensor], w2_scale: Optional[torch.Tensor], group: int,
               w13_zero: Optional[torch.Tensor], w2_zero: Optional[torch.Tensor], w13_bias: Optional[torch.Tensor],
               w2_bias: Optional[torch.Tensor], activation: str, swiglu_alpha: float,
               swiglu_limit: float, round_weights: bool) -> torch.Tensor:
    """A mixture-of-experts MLP: x [T, H], router logits [T, E], stacked experts w13 [E, 2I, H] (gate rows, then
    up) and w2 [E, H, I] -> [T, H]; routing, experts and the weighted top-k sum (``moe_reference.py``).  FP8
    experts come with their scales per row and ``group`` columns (``weight_quant.py``), zeros None.  Int4 experts
    (``int4_quant.py``; ``w13_zero`` not None says so) are uint8 qweights w13 [E, 2I, H/2] and w2 [E, H, I/2] with
    their fp16 scales and uint8 zeros [E, rows, ceil(columns / group)].  Unquantized: None, None, 0, None, None.
    Expert biases w13_bias [E, 2I] and w2_bias [E, H] (None: none) and the gated ``activation`` ("silu", or
    GPT-OSS's "swiglu_oss" with ``swiglu_alpha``/``swiglu_limit``) as ``moe_reference.py`` says; ``round_weights``:
    router weights and weighted expert outputs rounded to x's dtype before the sum (the Qwen MoE families)."""
    return moe_reference.fused_moe_reference(x, router_logits, w13, w2, top_k, renormalize, w13_scale, w2_scale,
                                             group, w13_zero, w2_zero, w13_bias, w2_bias, activation, swiglu_alpha,
                                             swiglu_limit, round_weights)


@_fused_moe.register_fake
def _(x, router_logits, w13, w2, top_k, renormalize, w13_scale, w2_scale, group, w13_zero, w2_zero, w13_bias,
      w2_bias, activation, swiglu_alpha, swiglu_limit, round_weights):
    return torch.empty_like(x)


@torch.library.custom_op("nanovllm::moe_experts", mutates_args=())
def _moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, w13_scale: Optional[torch.Tensor], w2_scale: Optional[torch.Tensor],
                 group: int, w13_zero: Optional[torch.Tensor], w2_zero: Optional[torch.Tensor],
                 w13_bias: Optional[torch.Tensor], w2_bias: Optional[torch.Tensor], activation: str,
                 swiglu_alpha: float, swiglu_limit: float) -> torch.Tensor:
    """The experts' part of ``fused_moe`` for tokens already routed: weights float32 [T, top_k] and ids [T, top_k]
    into the stacked ``w13``/``w2`` (an expert cache's slots, ``models/expert_offload.py``) -> [T, H]; scales,
    zeros, ``group``, biases and activation as ``fused_moe``'s."""
    return moe_reference.experts_reference(x, weights, ids, w13, w2, w13_scale, w2_scale, group, w13_zero, w2_zero,
                                           w13_bias, w2_bias, activation, swiglu_alpha, swiglu_limit)


@_moe_experts.register_fake
def _(x, weights, ids, w13, w2, w13_scale, w2_scale, group, w13_zero, w2_zero, w13_bias, w2_bias, activation,
      swiglu_alpha, swiglu_limit):
    return torch.empty_like(x)


@torch.library.custom_op("nanovllm::gumbel_argmax", mutates_args=())
def _gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64 (see ``sampling.gumbel_argmax_reference``)."""
    return sampling.gumbel_argmax_reference(logits, temperature, seeds, positions)


@_gumbel_argmax.register_fake
def _(logits, temperature, seeds, positions):
    return torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)


@torch.library.custom_op("nanovllm::process_logits", mutates_args=())
def _process_logits(logits: torch.Tensor, slots: torch.Tensor, params: torch.Tensor, bitmask: torch.Tensor,
                    counts: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> a new [B, V] with each row's penalties and token mask applied, from state row ``slots[b]``
    (see ``logits.process_logits_reference``)."""
    return logits_twin.process_logits_reference(logits, slots, params, bitmask, counts, seen)


@_process_logits.register_fake
def _(logits, slots, params, bitmask, counts, seen):
    return torch.empty_like(logits)


def register_traced(name: str, device_type: str, fn: Callable | None) -> None:
    """Make ``fn`` (same signature as the op ``nanovllm::<name>``) what Dynamo traces for the op on
    ``device_type`` tensors; ``None`` removes it (``nanovllm/traced.py``)."""
    if name not in _OPS:
        raise ValueError(f"no op nanovllm::{name}; expected one of {', '.join(_OPS)}")
    traced.register(name, device_type, fn)


_traced = traced.lookup


def store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    fn = _traced("store_kv", k_cache.device)
    if fn is not None:
        return fn(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    torch.ops.nanovllm.store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rope_store_kv(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps: float, k_cache, v_cache,
                  slot_mapping, num_heads: int, num_kv_heads: int, k_scale=None, v_scale=None) -> torch.Tensor:
    fn = _traced("rope_store_kv", k_cache.device) or torch.ops.nanovllm.rope_store_kv
    return fn(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
              num_heads, num_kv_heads, k_scale, v_scale)


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale: float, k_scale=None,
                    v_scale=None, window: int = 0, sinks: Optional[torch.Tensor] = None,
                    softcap: float = 0.0) -> torch.Tensor:
    """Attention of q [T, Hq, D] over the paged cache (see ``_paged_attention``): a sliding ``window`` (0: full
    causal), per-head ``sinks`` logits (None: none) and a score ``softcap`` (0: off)."""
    fn = _traced("paged_attention", q.device) or torch.ops.nanovllm.paged_attention
    return fn(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, k_scale, v_scale, int(window),
              sinks, float(softcap))


def linear(x, weight, bias=None, silu_mul: bool = False, weight_scale=None, group: int = 0,
           dequantized=None) -> torch.Tensor:
    """A projection of ``x`` [T, K] (see ``_linear``); ``silu_mul`` takes the packed MLP gate/up weight."""
    fn = _traced("linear", x.device) or torch.ops.nanovllm.linear
    return fn(x, weight, bias, silu_mul, weight_scale, group, dequantized)


def linear_int4(x, qweight, scale, zero, group: int, perm=None, bias=None, silu_mul: bool = False,
                dequantized=None) -> torch.Tensor:
    """A projection of ``x`` [T, K] by an int4 weight (see ``_linear_int4``)."""
    fn = _traced("linear_int4", x.device) or torch.ops.nanovllm.linear_int4
    return fn(x, qweight, scale, zero, group, perm, bias, silu_mul, dequantized)


def fused_moe(x, router_logits, w13, w2, top_k: int, renormalize: bool, w13_scale=None, w2_scale=None,
              group: int = 0, w13_zero=None, w2_zero=None, w13_bias=None, w2_bias=None, activation: str = "silu",
              swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, round_weights: bool = False) -> torch.Tensor:
    """The MoE MLP of ``x`` [T, H] (see ``_fused_moe``); int4 experts come with ``w13_zero``/``w2_zero``; expert
    biases and a non-SiLU ``activation`` (GPT-OSS), and ``round_weights`` (the Qwen MoE families), by keyword."""
    fn = _traced("fused_moe", x.device) or torch.ops.nanovllm.fused_moe
    return fn(x, router_logits, w13, w2, top_k, renormalize, w13_scale, w2_scale, group, w13_zero, w2_zero, w13_bias,
              w2_bias, activation, float(swiglu_alpha), float(swiglu_limit), bool(round_weights))


def moe_experts(x, weights, ids, w13, w2, w13_scale=None, w2_scale=None, group: int = 0, w13_zero=None,
                w2_zero=None, w13_bias=None, w2_bias=None, activation: str = "silu", swiglu_alpha: float = 1.702,
                swiglu_limit: float = 7.0) -> torch.Tensor:
    """The routed experts of ``x`` [T, H] (see ``_moe_experts``); int4 experts come with ``w13_zero``/``w2_zero``;
    biases and activation as ``fused_moe``'s."""
    fn = _traced("moe_experts", x.device) or torch.ops.nanovllm.moe_experts
    return fn(x, weights, ids, w13, w2, w13_scale, w2_scale, group, w13_zero, w2_zero, w13_bias, w2_bias, activation,
              float(swiglu_alpha), float(swiglu_limit))


def gumbel_argmax(logits, temperature, seeds, positions) -> torch.Tensor:
    """Token ids [B] drawn from logits [B, V] (greedy where ``temperature`` is 0); see ``_gumbel_argmax``."""
    fn = _traced("gumbel_argmax", logits.device) or torch.ops.nanovllm.gumbel_argmax
    return fn(logits, temperature, seeds, positions)


def process_logits(logits, slots, params, bitmask, counts, seen) -> torch.Tensor:
    """Logits [B, V] with the penalties and token masks of state rows ``slots`` applied; see ``_process_logits``."""
    fn = _traced("process_logits", logits.device) or torch.ops.nanovllm.process_logits
    return fn(logits, slots, params, bitmask, counts, seen)


_OPS = ("store_kv", "rope_store_kv", "paged_attention", "linear", "linear_int4", "fused_moe", "moe_experts",
        "process_logits", "gumbel_argmax") + la_ops.OPS + lora_ops.OPS  # and kernels/linear_attention's, kernels/lora's
