"""The Triton (and CUDA C++) implementations of the ops in ``ops.py``, registered for CUDA tensors by the platform.

``register_cuda_kernels()`` registers one function per op with ``torch.library.register_kernel`` for device type
"cuda"; from then on the dispatcher sends CUDA inputs there and every other device keeps the op's pure-PyTorch
twin.  Registering again is a no-op (a process may make several engines).  Each registered function reads
``current_options()`` once per call: with ``reference_kernels`` set it runs the twin, so options installed by a
later engine take effect without registering anything again.  Choices that are by design made at run time stay
inside the functions: the decode or the prefill kernel by the shape of the batch, the skinny-matmul
configuration by row count (``matmul_configs.py``; int4 weights: ``triton_w4a16.py``, up to 8 rows
``cuda_w4a16.py``; FP8 weights up to 8 rows: ``cuda_w8a16.py``), the MoE tiles by rows per expert
(``moe_configs.py``; int4 and FP8 experts at few rows: ``cuda_moe.py``), and float32 rope, MoE and int4 projections on
torch so that results stay transformers' bit for bit.  A platform for another device registers its own the same
way, under its device type, without touching models or layers; ``device_type`` lets a test register these
functions for CPU tensors, which the Triton interpreter (``TRITON_INTERPRET=1``) runs.
"""
import torch
import torch.nn.functional as F

from nanovllm.kernels import logits as logits_twin
from nanovllm.kernels.act_quant import moe_w8a8
from nanovllm.kernels import matmul_configs, moe_reference, ops, reference, sampling  # noqa: F401  (ops: the ops)
from nanovllm.kernels import cuda_moe, cuda_w4a16, cuda_w8a16, mxfp4_quant
from nanovllm.kernels.linear_attention import ops as la_ops  # noqa: F401  (the linear-attention ops)
from nanovllm.kernels.linear_attention import reference as la_reference
from nanovllm.kernels.linear_attention.triton_kernels import causal_conv1d_triton, gated_delta_rule_triton
from nanovllm.kernels.lora import ops as lora_ops  # noqa: F401  (the multi-LoRA op)
from nanovllm.kernels.lora import reference as lora_reference
from nanovllm.kernels.lora.folded import lora_linear_cuda
from nanovllm.kernels.lora.triton_lora import lora_add_triton
from nanovllm.kernels.options import current_options
from nanovllm.kernels.triton_attention import decode_attention_triton, prefill_attention_triton, store_kv_triton
from nanovllm.kernels.triton_logits import process_logits_triton
from nanovllm.kernels.triton_matmul import dequantize_triton, linear_triton, silu_mul_triton
from nanovllm.kernels.moe_configs import group_supported
from nanovllm.kernels.triton_moe import fused_moe_triton, moe_experts_triton
from nanovllm.kernels.triton_moe_align import route_triton, routed_elsewhere
from nanovllm.kernels.triton_moe_tiles import ACTIVATION_CODES
from nanovllm.kernels.triton_rope_store import rope_store_kv_triton
from nanovllm.kernels.triton_sampler import gumbel_argmax_triton
from nanovllm.kernels.triton_w4a16 import choose_w4a16, dequantize_int4_triton, linear_w4a16_triton

_registered: set[str] = set()


def _store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    if current_options().reference_kernels:
        reference.store_kv_reference(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, k_scale, v_scale,
                     window=0, sinks=None, softcap=0.0):
    if current_options().reference_kernels:
        return reference.paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                                   scale, k_scale, v_scale, window, sinks, softcap)
    if q.shape[0] == context_lens.shape[0]:  # one new token per sequence: every decode step
        return decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                       window, sinks, softcap)
    return prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, k_scale,
                                    v_scale, window, sinks, softcap)


def _rope_store_kv(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, k_cache, v_cache,
                   slot_mapping, num_heads, num_kv_heads, k_scale, v_scale):
    if current_options().reference_kernels:
        return reference.rope_store_kv_reference(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight,
                                                 eps, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                                                 k_scale, v_scale)
    if qkv.dtype == torch.float32:  # the model's torch code, so results stay transformers' bit for bit
        q, k, v = reference.norm_rope_reference(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight,
                                                eps, num_heads, num_kv_heads, k_cache.shape[3])
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return q
    return rope_store_kv_triton(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, k_cache,
                                v_cache, slot_mapping, num_heads, num_kv_heads, k_scale, v_scale)


# rows from which cuBLAS on a kept dequantized copy (quant/dequantized.py) beats the Triton kernels that stream the
# FP8 or int4 weight (docs/PERFORMANCE.md, "Kernels behind defaults"); the few-row CUDA kernels stay ahead of both
KEPT_COPY_FROM = 17


def _streams(x, dequantized) -> bool:
    """Whether a quantized projection of ``x`` may stream its weight through a Triton kernel: no kept copy, or fewer
    than ``KEPT_COPY_FROM`` rows."""
    return x.shape[0] < KEPT_COPY_FROM or not reference.is_kept(dequantized, x.dtype)


def _linear(x, weight, bias, silu_mul, weight_scale, group, dequantized):
    if current_options().reference_kernels or (weight_scale is not None and x.dtype == torch.float32):
        return reference.linear_reference(x, weight, bias, silu_mul, weight_scale, group, dequantized)
    if weight_scale is not None:  # FP8: stream it at small M; past that, cuBLAS on the dequantized weight
        if cuda_w8a16.usable(x, weight, weight_scale, group):  # up to 8 rows: the CUDA C++ kernel, where nvcc built it
            return cuda_w8a16.linear_w8a16_cuda(x, weight, weight_scale, group, bias, silu_mul)
        cfg = matmul_configs.choose_fp8(x, weight, silu_mul, group) if _streams(x, dequantized) else None
        if cfg is not None:
            return linear_triton(x, weight, bias, cfg, silu_mul, weight_scale, group)
        if not reference.is_kept(dequantized, x.dtype):  # no copy kept: dequantize it for this call
            dequantized = dequantize_triton(weight, weight_scale, group, x.dtype)
        y = F.linear(x, dequantized, bias)
        return silu_mul_triton(y) if silu_mul else y
    cfg = matmul_configs.choose(x, weight, silu_mul)
    if cfg is not None:
        return linear_triton(x, weight, bias, cfg, silu_mul)
    if x.dtype == torch.float32:  # fp32 stays with torch end to end
        return reference.linear_reference(x, weight, bias, silu_mul)
    y = F.linear(x, weight, bias)
    return silu_mul_triton(y) if silu_mul else y


def _linear_int4(x, qweight, scale, zero, group, perm, bias, silu_mul, dequantized):
    if current_options().reference_kernels or x.dtype == torch.float32:  # fp32 stays exact, on the twin
        return reference.linear_int4_reference(x, qweight, scale, zero, group, perm, bias, silu_mul, dequantized)
    if cuda_w4a16.usable(x, qweight, scale, zero, group):  # up to 8 rows: the CUDA C++ kernel, where nvcc built it
        return cuda_w4a16.linear_w4a16_cuda(x, qweight, scale, zero, group, perm, bias, silu_mul)
    cfg = choose_w4a16(x, qweight, silu_mul, group) if _streams(x, dequantized) else None
    if cfg is not None:  # stream the packed weight at small M; past that, cuBLAS on the dequantized weight
        return linear_w4a16_triton(x, qweight, scale, zero, group, perm, bias, cfg, silu_mul)
    if perm is not None:
        x = x.index_select(1, perm)
    if not reference.is_kept(dequantized, x.dtype):  # no copy kept: dequantize it for this call
        dequantized = dequantize_int4_triton(qweight, scale, zero, group, x.dtype)
    y = F.linear(x, dequantized, bias)
    return silu_mul_triton(y) if silu_mul else y


def _moe_on_twin(x, w13, w13_scale, w13_zero, group, epilogue: dict) -> bool:
    """Whether an MoE call stays with the twin: fp32 x (torch, as for linear), quantized experts (FP8 or int4: the
    same K tiles fit a group) whose group no K tile fits (MXFP4's tiles are dequantized whole: any fits), or W8A8
    experts with biases or a non-SiLU activation (GPT-OSS's, Gemma 4's; the W8A8 kernels fuse SiLU only), or an
    activation without a Triton code (``ACTIVATION_CODES``; the twin's error then names it)."""
    return (current_options().reference_kernels or x.dtype == torch.float32
            or epilogue.get("activation", "silu") not in ACTIVATION_CODES
            or w13_scale is not None and not mxfp4_quant.is_mxfp4(w13, w13_scale, w13_zero)
            and not group_supported(group, x.shape[1], w13.shape[1] // 2)
            or bool(epilogue) and moe_w8a8(w13, w13_scale, w13_zero, group))


def _moe_on_cuda(x, top_k, w13, w2, scales, zeros, group, epilogue: dict) -> bool:
    """Whether int4 or FP8 SiLU experts without biases run on the CUDA C++ kernels (``cuda_moe.moe_usable``; FP8
    ones there weight-only, not W8A8)."""
    return scales[0] is not None and not epilogue and cuda_moe.moe_usable(x, top_k, w13, w2, scales, zeros, group)


def _epilogue(w13_bias, w2_bias, activation, swiglu_alpha, swiglu_limit) -> dict:
    """The biases and activation as keywords for the implementations; none for plain SiLU experts without biases
    (every call but GPT-OSS's)."""
    if w13_bias is None and w2_bias is None and activation == "silu":
        return {}
    return dict(w13_bias=w13_bias, w2_bias=w2_bias, activation=activation, swiglu_alpha=swiglu_alpha,
                swiglu_limit=swiglu_limit)


def _fused_moe(x, router_logits, w13, w2, top_k, renormalize, w13_scale, w2_scale, group, w13_zero=None,
               w2_zero=None, w13_bias=None, w2_bias=None, activation="silu", swiglu_alpha=1.702, swiglu_limit=7.0,
               round_weights=False):
    epilogue = _epilogue(w13_bias, w2_bias, activation, swiglu_alpha, swiglu_limit)
    rounding = {"round_weights": True} if round_weights else {}  # a keyword only where on, as the epilogue's
    if _moe_on_twin(x, w13, w13_scale, w13_zero, group, epilogue):
        return moe_reference.fused_moe_reference(x, router_logits, w13, w2, top_k, renormalize, w13_scale, w2_scale,
                                                 group, w13_zero, w2_zero, **epilogue, **rounding)
    if _moe_on_cuda(x, top_k, w13, w2, (w13_scale, w2_scale), (w13_zero, w2_zero), group, epilogue):
        weights, ids, hist = route_triton(router_logits, top_k, renormalize)
        return cuda_moe.experts_cuda(x, weights, ids, hist, w13, w2, (w13_scale, w2_scale), (w13_zero, w2_zero),
                                     group, round_weights)
    return fused_moe_triton(x, router_logits, w13, w2, top_k, renormalize, w13_scale, w2_scale, group, w13_zero,
                            w2_zero, **epilogue, **rounding)


def _moe_experts(x, weights, ids, w13, w2, w13_scale, w2_scale, group, w13_zero=None, w2_zero=None, w13_bias=None,
                 w2_bias=None, activation="silu", swiglu_alpha=1.702, swiglu_limit=7.0):
    epilogue = _epilogue(w13_bias, w2_bias, activation, swiglu_alpha, swiglu_limit)
    if _moe_on_twin(x, w13, w13_scale, w13_zero, group, epilogue):
        return moe_reference.experts_reference(x, weights, ids, w13, w2, w13_scale, w2_scale, group, w13_zero,
                                               w2_zero, **epilogue)
    if _moe_on_cuda(x, ids.shape[1], w13, w2, (w13_scale, w2_scale), (w13_zero, w2_zero), group, epilogue):
        return cuda_moe.experts_cuda(x.contiguous(), *routed_elsewhere(weights, ids, w13.shape[0]), w13, w2,
                                     (w13_scale, w2_scale), (w13_zero, w2_zero), group)
    return moe_experts_triton(x, weights, ids, w13, w2, w13_scale, w2_scale, group, w13_zero, w2_zero, **epilogue)


def _gumbel_argmax(logits, temperature, seeds, positions):
    if current_options().reference_kernels:
        return sampling.gumbel_argmax_reference(logits, temperature, seeds, positions)
    return gumbel_argmax_triton(logits, temperature, seeds, positions)


def _process_logits(logits, slots, params, bitmask, counts, seen):
    if current_options().reference_kernels:
        return logits_twin.process_logits_reference(logits, slots, params, bitmask, counts, seen)
    return process_logits_triton(logits, slots, params, bitmask, counts, seen)


def _causal_conv1d(x, weight, conv_state, state_slots, cu_seqlens_q, context_lens, capture_slots, capture_lens,
                   state_chain, max_chain):
    fn = la_reference.causal_conv1d_reference if current_options().reference_kernels else causal_conv1d_triton
    return fn(x, weight, conv_state, state_slots, cu_seqlens_q, context_lens, capture_slots, capture_lens,
              state_chain, max_chain)


def _gated_delta_rule(q, k, v, g, beta, ssm_state, state_slots, cu_seqlens_q, context_lens, capture_slots,
                      capture_lens, state_chain, max_chain):
    fn = la_reference.gated_delta_rule_reference if current_options().reference_kernels else gated_delta_rule_triton
    return fn(q, k, v, g, beta, ssm_state, state_slots, cu_seqlens_q, context_lens, capture_slots, capture_lens,
              state_chain, max_chain)


def _lora_add(y, x, slots, a, b, scaling):
    fn = lora_reference.lora_add_reference if current_options().reference_kernels else lora_add_triton
    return fn(y, x, slots, a, b, scaling)


def _lora_linear(x, fold, bias, slots, b, scaling, n, a_row):
    fn = lora_reference.lora_linear_reference if current_options().reference_kernels else lora_linear_cuda
    return fn(x, fold, bias, slots, b, scaling, n, a_row)


KERNELS = {"nanovllm::store_kv": _store_kv, "nanovllm::paged_attention": _paged_attention,
           "nanovllm::rope_store_kv": _rope_store_kv, "nanovllm::linear": _linear,
           "nanovllm::linear_int4": _linear_int4, "nanovllm::fused_moe": _fused_moe,
           "nanovllm::moe_experts": _moe_experts,
           "nanovllm::process_logits": _process_logits, "nanovllm::gumbel_argmax": _gumbel_argmax,
           "nanovllm::causal_conv1d": _causal_conv1d, "nanovllm::gated_delta_rule": _gated_delta_rule,
           "nanovllm::lora_add": _lora_add, "nanovllm::lora_linear": _lora_linear}


def register_cuda_kernels(device_type: str = "cuda") -> None:
    """Route the ops' ``device_type`` tensors to the Triton kernels (idempotent)."""
    if device_type in _registered:
        return
    for name, fn in KERNELS.items():
        torch.library.register_kernel(name, device_type, fn)
    _registered.add(device_type)
