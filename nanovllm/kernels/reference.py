"""Pure-PyTorch paged attention and KV store: the CPU path and the oracle for the Triton kernels.

KV cache layout, shared by every implementation (one tensor per layer for K, one for V):

    cache[num_blocks, num_kv_heads, block_size, head_dim]

so that one KV head's tokens inside a block are contiguous (a tile the decode kernel reads in one sweep).
A slot id is ``block * block_size + offset``; slot -1 means "padded row, write nothing".

``context_lens[b]`` is the number of KV tokens sequence ``b`` has in the cache *including* the tokens of
the current step (they are stored before attention runs).  In prefill the query token ``j`` of a sequence
with ``q_len`` new tokens sits at absolute position ``context_lens[b] - q_len + j`` and attends causally to
KV positions ``0 .. that position``.  A row with ``context_lens == 0`` (a padded decode row) gets zeros.
"""
import torch


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` [T, Hkv, D] into their slots; rows whose slot is -1 are skipped."""
    block_size = k_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets, :] = key[valid].to(k_cache.dtype)
    v_cache[blocks, :, offsets, :] = value[valid].to(v_cache.dtype)


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first ``length`` cached tokens as [Hkv, length, D]."""
    num_blocks = -(-length // cache.shape[2])
    tiles = cache[block_table[:num_blocks].long()]  # [n, Hkv, bs, D]
    return tiles.permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])[:, :length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [Tq, Hq, D] at absolute ``q_positions`` over k, v [Hkv, L, D], in float32."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[0]
    group = num_q_heads // num_kv_heads
    qf = q.float().permute(1, 0, 2)  # [Hq, Tq, D]
    kf = k.float().repeat_interleave(group, dim=0)
    vf = v.float().repeat_interleave(group, dim=0)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Tq, L]
    kv_pos = torch.arange(k.shape[1], device=q.device)
    scores = scores.masked_fill(kv_pos[None, None, :] > q_positions[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).permute(1, 0, 2).to(q.dtype)  # [Tq, Hq, D]


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] -> [B, Hq, D] over each row's ``context_lens`` tokens."""
    out = torch.zeros_like(q)
    for b, length in enumerate(context_lens.tolist()):
        if length <= 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], length)
        v = _gather_kv(v_cache, block_tables[b], length)
        pos = torch.tensor([length - 1], device=q.device)
        out[b] = _attend(q[b:b + 1], k, v, pos, scale)[0]
    return out


def prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """Variable-length causal attention: q [T, Hq, D] packed by ``cu_seqlens_q`` [B+1] over the paged cache."""
    out = torch.zeros_like(q)
    starts = cu_seqlens_q.tolist()
    for b, length in enumerate(context_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi <= lo or length <= 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], length)
        v = _gather_kv(v_cache, block_tables[b], length)
        pos = torch.arange(length - (hi - lo), length, device=q.device)
        out[lo:hi] = _attend(q[lo:hi], k, v, pos, scale)
    return out


def norm_rope_reference(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                        q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                        num_heads: int, num_kv_heads: int, head_dim: int):
    """Split packed ``qkv`` [T, (Hq + 2 Hkv) D] into q, k, v; RMSNorm q and k per head (when weights are given)
    and rotate them.  The model's own norm and rope code, unfused; no host sync, so it may be graph-captured."""
    from nanovllm.layers.norm import rms_norm
    from nanovllm.layers.rotary import apply_rotary
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(-1, num_heads, head_dim)
    k = k.reshape(-1, num_kv_heads, head_dim)
    v = v.reshape(-1, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    q, k = apply_rotary(positions, q, k, cos_cache, sin_cache)
    return q, k, v


def rope_store_kv_reference(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps: float,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """``norm_rope_reference``, then k and v stored in the cache; returns q [T, Hq, D]."""
    q, k, v = norm_rope_reference(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                                  num_heads, num_kv_heads, k_cache.shape[3])
    store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    return q
