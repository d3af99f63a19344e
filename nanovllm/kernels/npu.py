"""The Ascend implementations of the ops, registered for "npu" tensors by the NPU platform (``platforms/npu.py``).
Every vendor call follows the torch_npu/torchair documentation named at it; ``tests/standins/`` checks each call.

* Decode attention is FIA's paged path (``npu_fused_infer_attention_score``, query length 1): query ``BNSD``
  [B, Hq, 1, D] over nanovllm's cache layout, FIA's ``BnNBsD`` [blocks, Hkv, block_size, D] (``reference.py``), the
  int32 block table and each row's context length; float16 and bfloat16 only (float32 runs the twin).  Rows of
  context 0 get zeros, as the op contract says.
* Eager (``register_npu_kernels``): FIA with the lengths read to the host, one synchronisation per layer; eager
  mode is for debugging.  Graph (``register_npu_traced``): Dynamo traces, in place of each opaque op, a function of
  torch, torch_npu and torchair ops only.  In ``max-autotune`` attention is torchair's FIA with the lengths as a
  device tensor (no host reads); in ``reduce-overhead`` (aclgraph) it is the pure-PyTorch twin.
* The twin everywhere: prefill attention (FIA's paged prefill needs ``block_size`` a multiple of 128 and, in the
  TND layout, head_dim 128), and attention with a sliding window, sinks or a softcap (not mapped onto FIA yet).
* KV store: one ``npu_scatter_nd_update_`` per cache.  That op does not skip out-of-range indices, so padded rows
  (slot -1) are sent where they rewrite equal values (``_scatter_rows``): they leave the cache unchanged.
"""
import torch

from nanovllm.kernels import logits as logits_twin
from nanovllm.kernels import moe_reference, ops, reference, sampling  # noqa: F401  (ops: defines the ops)
from nanovllm.kernels.linear_attention import reference as la_reference
from nanovllm.kernels.lora import reference as lora_reference

_registered: set[str] = set()
_FIA_DTYPES = (torch.float16, torch.bfloat16)


def _scatter_rows(src: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor):
    """(indices [T, Hkv, 3] int32, updates [T, Hkv, D]) writing ``src`` [T, Hkv, D] to its slots.  A padded row
    (slot -1) goes to the first real row's slot with that row's values or, when no row is real, to slot 0 with slot
    0's own contents: every duplicate index writes equal values (what duplicates do is not documented; equal values
    make the order irrelevant)."""
    num_kv_heads, block_size = cache.shape[1], cache.shape[2]
    valid = slot_mapping >= 0
    first = valid.to(torch.int32).argmax(dim=0, keepdim=True)  # [1]: never a 0-d index (a host read)
    any_valid = valid[first]
    slots = torch.where(valid, slot_mapping, torch.where(any_valid, slot_mapping[first], 0)).long()
    src = src.to(cache.dtype)
    fill = torch.where(any_valid[:, None, None], src[first], cache[0:1, :, 0])
    updates = torch.where(valid[:, None, None], src, fill)
    rows = slots.shape[0]
    heads = torch.arange(num_kv_heads, device=slots.device)
    index = torch.stack([(slots // block_size)[:, None].expand(rows, num_kv_heads), heads[None, :].expand(
        rows, num_kv_heads), (slots % block_size)[:, None].expand(rows, num_kv_heads)], dim=-1)
    return index.to(torch.int32), updates


# torch_npu.npu_scatter_nd_update_: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_scatter_nd_update_.md
# ("supports graph mode"; "不支持越界": no out-of-range index).  vllm-ascend's torchair attention wrote its cache with it.
def store_kv_npu(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    if k_scale is not None:  # the platform refuses kv_cache_dtype="fp8" before a cache is made
        raise NotImplementedError("an FP8 KV cache on the NPU")
    if slot_mapping.shape[0] == 0:
        return
    import torch_npu
    for src, cache in ((key, k_cache), (value, v_cache)):
        index, updates = _scatter_rows(src, cache, slot_mapping)
        torch_npu.npu_scatter_nd_update_(cache, index, updates)


def rope_store_kv_npu(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps, k_cache, v_cache,
                      slot_mapping, num_heads, num_kv_heads, k_scale=None, v_scale=None):
    q, k, v = reference.norm_rope_reference(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                                            num_heads, num_kv_heads, k_cache.shape[3])
    store_kv_npu(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


# FIA: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_fused_infer_attention_score.md; its graph-mode
# twin torchair.ops.npu_fused_infer_attention_score: Ascend/torchair docs/zh/ascend_ir/api/ops/
# npu_fused_infer_attention_score.md.  BnNBsD is the cache layout FIA documents as the faster one for paged decode.
# Lengths are host ints in torch_npu's eager API and int64 device tensors in torchair's op.
def _fia_decode(fia, q, k_cache, v_cache, context_lens, block_tables, scale, lengths):
    """FIA paged decode of q [B, Hq, D]; rows of context 0 get zeros (FIA reads them as length 1: padding rows)."""
    batch, num_heads, head_dim = q.shape
    out, _ = fia(q.reshape(batch, num_heads, 1, head_dim).contiguous(), k_cache, v_cache,
                 actual_seq_lengths_kv=lengths, block_table=block_tables.clamp(min=0).to(torch.int32),
                 block_size=k_cache.shape[2], num_heads=num_heads, num_key_value_heads=k_cache.shape[1],
                 scale=scale, input_layout="BNSD")
    return torch.where((context_lens > 0)[:, None, None], out.reshape(batch, num_heads, head_dim), 0.0).to(q.dtype)


def _is_fia_decode(q, context_lens, window=0, sinks=None, softcap=0.0) -> bool:
    """Whether FIA takes the call: decode in float16/bfloat16, plain causal (a window, sinks or a softcap: the
    twin, which computes them)."""
    return (q.shape[0] == context_lens.shape[0] and q.dtype in _FIA_DTYPES and window == 0 and sinks is None
            and softcap == 0.0)


def paged_attention_npu(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, k_scale=None,
                        v_scale=None, window=0, sinks=None, softcap=0.0):
    """Eager: FIA for decode (lengths read to the host), the twin otherwise."""
    if not _is_fia_decode(q, context_lens, window, sinks, softcap) or k_scale is not None:
        return reference.paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                                   scale, k_scale, v_scale, window, sinks, softcap)
    import torch_npu
    lengths = context_lens.clamp(min=1).tolist()
    return _fia_decode(torch_npu.npu_fused_infer_attention_score, q, k_cache, v_cache, context_lens, block_tables,
                       scale, lengths)


def traced_paged_attention_ascend_ir(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                     k_scale=None, v_scale=None, window=0, sinks=None, softcap=0.0):
    """Graph, max-autotune: torchair's FIA with the lengths as an int64 device tensor, the twin for prefill."""
    if not _is_fia_decode(q, context_lens, window, sinks, softcap) or k_scale is not None:
        return reference.paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                                   scale, k_scale, v_scale, window, sinks, softcap)
    import torchair
    return _fia_decode(torchair.ops.npu_fused_infer_attention_score, q, k_cache, v_cache, context_lens,
                       block_tables, scale, context_lens.clamp(min=1).to(torch.int64))


KERNELS = {"nanovllm::store_kv": store_kv_npu, "nanovllm::rope_store_kv": rope_store_kv_npu,
           "nanovllm::paged_attention": paged_attention_npu}


def register_npu_kernels() -> None:
    """Route the ops' "npu" tensors to the implementations above (idempotent); ``linear``, ``linear_int4``,
    ``fused_moe``, ``moe_experts``, ``process_logits`` and ``gumbel_argmax`` keep their twins, plain torch ops on
    any device."""
    if "npu" in _registered:
        return
    for name, fn in KERNELS.items():
        torch.library.register_kernel(name, "npu", fn)
    _registered.add("npu")


def register_npu_traced(graph_mode: str) -> None:
    """What Dynamo traces for each op on "npu" tensors under torchair's ``graph_mode`` (see the module doc): only
    torch_npu/torchair ops and plain torch ops, so no op needs an Ascend converter of ours."""
    # Under aclgraph (reduce-overhead) FIA would need host lengths refreshed at every replay (vllm-ascend does it
    # with graph_task_update_begin/end), which device-resident StepInputs cannot give: attention is the twin there.
    attention = traced_paged_attention_ascend_ir if graph_mode == "max-autotune" else \
        reference.paged_attention_reference
    for name, fn in (("store_kv", store_kv_npu), ("rope_store_kv", rope_store_kv_npu),
                     ("paged_attention", attention), ("linear", reference.linear_reference),
                     ("linear_int4", reference.linear_int4_reference),
                     ("fused_moe", moe_reference.fused_moe_reference),
                     ("moe_experts", moe_reference.experts_reference),
                     ("process_logits", logits_twin.process_logits_reference),
                     ("gumbel_argmax", sampling.gumbel_argmax_reference),
                     ("causal_conv1d", la_reference.causal_conv1d_reference),
                     ("gated_delta_rule", la_reference.gated_delta_rule_reference),
                     ("lora_add", lora_reference.lora_add_reference),
                     ("lora_linear", lora_reference.lora_linear_reference)):
        ops.register_traced(name, "npu", fn)
