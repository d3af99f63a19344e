"""Pure-PyTorch paged attention, KV store, q/k norm + rope and projections: the default implementations of the ops
in ``ops.py`` (the CPU path) and the oracle for the Triton kernels.  KV cache layout, one tensor per layer for K
and one for V: ``cache[num_blocks, num_kv_heads, block_size, head_dim]``; slot ``block * block_size + offset``;
slot -1 means "padded row, write nothing".  An FP8 cache (``kv_quant.py``): the store quantises, attention
dequantises to float32 before it multiplies.

``context_lens[b]`` counts sequence ``b``'s KV tokens *including* this step's (stored before attention runs).  Its
query token ``j`` of ``q_len`` sits at position ``context_lens[b] - q_len + j`` and sees keys ``0 .. position``, or
with a sliding ``window`` W > 0 only keys j with ``position - W < j <= position`` (transformers' sliding window);
``sinks`` add a logit per query head to the softmax denominator, ``softcap`` caps scores before the mask
(``paged_attention_reference``).  A negative position (context 0) gets zeros.  Cache entries at or past a context,
and with a window the blocks wholly before a sequence's earliest visible key (their table entries too), are
never read into a result, whatever they hold.  Every twin uses only static shapes (no ``.item()``, ``.tolist()``,
``nonzero`` or boolean-mask indexing): none syncs with the host, and each traces whole (``fullgraph=True``,
``make_fx``).
"""
import torch
import torch.nn.functional as F

from nanovllm.kernels import int4_quant, kv_quant, weight_quant
from nanovllm.kernels.norm_rope import apply_rotary, rms_norm

_PREFILL_TILE = 32  # query tokens per prefill tile
_CHUNK_ELEMENTS = 1 << 24  # elements of gathered K and V held at once, about (at least one tile's)


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
    """Write ``key``/``value`` [T, Hkv, D] into their slots; rows whose slot is -1 leave the cache as it was.

    Every row writes (a static shape): a padded row writes to the slot of the first real row the value that row
    writes, or, when no row is real, writes slot 0's own contents back.  Rows aimed at one slot thus carry one
    value, whatever order the writes land in."""
    if slot_mapping.shape[0] == 0:
        return
    block_size = k_cache.shape[2]
    valid = slot_mapping >= 0
    # Index tensors of shape [1], never 0-d ones: indexing with a 0-d tensor reads its value on the host.
    first = valid.to(torch.int32).argmax(dim=0, keepdim=True)  # the first real row, or row 0 when there is none
    any_valid = valid[first]
    fallback = torch.where(any_valid, slot_mapping[first].long(), 0)
    slots = torch.where(valid, slot_mapping.long(), fallback)
    blocks, offsets = slots // block_size, slots % block_size
    for src, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        src = kv_quant.quantize(src, scale) if kv_quant.is_fp8(cache) else src.to(cache.dtype)
        stored = cache[fallback // block_size, :, fallback % block_size]  # [1, Hkv, D]
        filler = torch.where(any_valid[:, None, None], src[first], stored)
        cache[blocks, :, offsets] = torch.where(valid[:, None, None], src, filler)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool,
                     weight_scale: torch.Tensor | None = None, group: int = 0,
                     dequantized: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``; with ``silu_mul``, ``silu(gate) * up`` of that product's two halves.  An FP8
    weight is dequantized into x's dtype first (``weight_quant.py``), or taken from ``dequantized`` where that
    copy is kept in x's dtype."""
    if weight_scale is not None:
        weight = dequantized if is_kept(dequantized, x.dtype) else weight_quant.dequantize(weight, weight_scale,
                                                                                           group, x.dtype)
    y = F.linear(x, weight, bias)
    return silu_and_mul(y) if silu_mul else y


def is_kept(dequantized: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether a quantized weight's kept ``dequantized`` copy (``quant/dequantized.py``) serves a ``dtype`` product."""
    return dequantized is not None and dequantized.dtype == dtype


def linear_int4_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          group: int, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          silu_mul: bool = False, dequantized: torch.Tensor | None = None) -> torch.Tensor:
    """``x[:, perm] @ W.T + bias`` (``perm`` None: x as is) for the int4 weight W = (qweight, scale, zero, group)
    (``int4_quant.py``), dequantized into x's dtype first (or taken from ``dequantized`` where that copy is kept
    in x's dtype); ``silu_mul`` as in ``linear_reference``."""
    if perm is not None:
        x = x.index_select(1, perm)
    if not is_kept(dequantized, x.dtype):
        dequantized = int4_quant.dequantize(qweight, scale, zero, group, x.dtype)
    y = F.linear(x, dequantized, bias)
    return silu_and_mul(y) if silu_mul else y


def silu_and_mul(y: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the two halves of a packed [T, 2I] MLP projection."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


# Attention works on query tiles: [N, M] query rows that share one sequence (decode: one row per sequence; prefill:
# runs of _PREFILL_TILE consecutive tokens, the Triton prefill kernel's tiling), each with its sequence's block-table
# row.  A tile gathers its sequence's KV once for all its rows and attends in float32 (SDPA, or the explicit softmax
# of _softmax_attend with sinks or a softcap) under a causal mask by position; tiles are taken a group at a time so
# that the gathered KV stays near _CHUNK_ELEMENTS.
def _attend_tiles(q: torch.Tensor, q_pos: torch.Tensor, ctx: torch.Tensor, tables: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, kv_scales: tuple, window: int = 0,
                  sinks: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Causal attention of query tiles q [N, M, Hq, D] at positions ``q_pos`` [N, M] over the paged KV of their
    sequences (context ``ctx`` [N], block-table rows ``tables`` [N, W]) -> float32 [N, M, Hq, D].

    Without a window each tile gathers W x block_size KV positions from position 0.  With ``window`` it gathers a
    static run of blocks from the block of its first row's earliest key (positions rise along a tile), enough for
    every row, and never reads a block-table entry before it: those blocks may be freed.  Positions past the
    context (and, windowed, before that earliest key) read the first readable position instead; the mask hides
    them, so what the cache holds there, NaN included, never reaches the result.  A row at a negative position sees
    nothing and gets zeros, set explicitly: not every attention backend returns zeros for a fully masked row."""
    num_tiles, rows, num_q_heads, head_dim = q.shape
    num_blocks, num_kv_heads, block_size, _ = k_cache.shape
    width = tables.shape[1]
    if window > 0:  # blocks that cover window + rows - 1 positions wherever they start in a block
        width = min(width, -(-(window + rows - 1) // block_size) + 1)
    length = width * block_size
    tiles_per_group = max(1, min(num_tiles, _CHUNK_ELEMENTS // (length * (2 * num_kv_heads * head_dim + rows))))
    k_rows, v_rows = k_cache.reshape(-1, head_dim), v_cache.reshape(-1, head_dim)  # row (block, head, offset)
    offsets = torch.arange(length, device=q.device)
    heads = torch.arange(num_kv_heads, device=q.device)[None, :, None]
    q_pos, ctx = q_pos.long(), ctx.long()
    outs = []
    for t0 in range(0, num_tiles, tiles_per_group):
        t1 = min(t0 + tiles_per_group, num_tiles)
        n = t1 - t0
        pos = q_pos[t0:t1]
        if window > 0:
            lo = (pos[:, :1] - window + 1).clamp(min=0)  # [n, 1]: the earliest key of the tile's first row
            kv_pos = lo // block_size * block_size + offsets[None, :]  # [n, L]
            src = torch.where((kv_pos >= lo) & (kv_pos < ctx[t0:t1, None]), kv_pos, lo)
        else:
            kv_pos = offsets[None, :]
            src = torch.where(kv_pos < ctx[t0:t1, None], kv_pos, 0)  # [n, L]
        blocks = tables[t0:t1].long().gather(1, src // block_size).clamp(0, num_blocks - 1)
        index = ((blocks[:, None, :] * num_kv_heads + heads) * block_size + (src % block_size)[:, None, :]).flatten()
        k, v = (c.index_select(0, index).view(n, num_kv_heads, length, head_dim) for c in (k_rows, v_rows))
        if kv_scales[0] is not None:
            k, v = kv_quant.dequantize(k, kv_scales[0]), kv_quant.dequantize(v, kv_scales[1])
        k, v = k.float(), v.float()
        keep = kv_pos[:, None, :] <= pos[:, :, None]  # [n, M, L]
        if window > 0:
            keep = keep & (kv_pos[:, None, :] > pos[:, :, None] - window)
        qt = q[t0:t1].float().transpose(1, 2)
        if sinks is None and softcap == 0.0:
            out = F.scaled_dot_product_attention(qt, k, v, attn_mask=keep[:, None], scale=scale,
                                                 enable_gqa=True)  # [n, Hq, M, D]
        else:
            out = _softmax_attend(qt, k, v, keep, scale, sinks, softcap)
        out = torch.where((pos >= 0)[:, None, :, None], out, 0.0)
        outs.append(out.transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _softmax_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
                    sinks: torch.Tensor | None, softcap: float) -> torch.Tensor:
    """float32 attention of q [n, Hq, M, D] over k, v [n, Hkv, L, D] (query head h reads KV head h // (Hq/Hkv))
    under ``keep`` [n, M, L]: scores ``scale * q.k``, capped to ``softcap * tanh(s / softcap)`` (softcap > 0), then
    masked; each head's ``sinks`` logit (if given) joins the softmax denominator and carries no value."""
    n, num_q_heads, rows, head_dim = q.shape
    num_kv_heads, length = k.shape[1], k.shape[2]
    grouped = q.reshape(n, num_kv_heads, num_q_heads // num_kv_heads * rows, head_dim)
    s = (grouped @ k.transpose(-1, -2)).view(n, num_q_heads, rows, length) * scale
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    s = torch.where(keep[:, None], s, float("-inf"))
    if sinks is not None:
        column = sinks.float().view(1, num_q_heads, 1, 1).expand(n, num_q_heads, rows, 1)
        p = torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :length]
    else:
        p = torch.softmax(s, dim=-1)
    return (p.reshape(n, num_kv_heads, -1, length) @ v).view(n, num_q_heads, rows, head_dim)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                               window: int = 0, sinks: torch.Tensor | None = None, softcap: float = 0.0
                               ) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] -> [B, Hq, D] over each row's ``context_lens`` tokens (the last
    ``window`` of them when ``window`` > 0); ``sinks``, ``softcap`` as ``paged_attention_reference``'s."""
    if q.shape[0] == 0:
        return torch.zeros_like(q)
    ctx = context_lens.long()
    out = _attend_tiles(q[:, None], (ctx - 1)[:, None], ctx, block_tables, k_cache, v_cache, scale,
                        (k_scale, v_scale), window, sinks, softcap)
    return out[:, 0].to(q.dtype)


def prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                                scale: float, k_scale: torch.Tensor | None = None,
                                v_scale: torch.Tensor | None = None, window: int = 0,
                                sinks: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Variable-length causal attention: q [T, Hq, D] packed by ``cu_seqlens_q`` [B+1] over the paged cache;
    ``window``, ``sinks``, ``softcap`` as ``paged_attention_reference``'s.

    Sequence b owns query tiles ``first[b] ..`` with ``first[b] = cu[b] // M + b``; ``T // M + B`` tiles cover
    every sequence, whatever its length (the Triton prefill kernel's grid), so the tile count is static."""
    num_tokens, num_seqs = q.shape[0], cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or num_seqs <= 0:
        return torch.zeros_like(q)
    rows = min(_PREFILL_TILE, num_tokens)
    cu = cu_seqlens_q.long()
    starts, q_lens = cu[:-1], cu[1:] - cu[:-1]
    first = starts // rows + torch.arange(num_seqs, device=q.device)  # strictly increasing
    tile = torch.arange(num_tokens // rows + num_seqs, device=q.device)
    seq = torch.searchsorted(first, tile, right=True) - 1  # the last sequence starting at or before each tile
    i = (tile - first[seq])[:, None] * rows + torch.arange(rows, device=q.device)  # [N, M] index in the sequence
    valid = i < q_lens[seq][:, None]
    ctx = context_lens.long()[seq]
    q_pos = torch.where(valid, ctx[:, None] - q_lens[seq][:, None] + i, -1)
    token = torch.where(valid, starts[seq][:, None] + i, num_tokens)  # row num_tokens: a scratch row
    q_tiles = q[token.clamp(max=num_tokens - 1)]
    out = _attend_tiles(q_tiles, q_pos, ctx, block_tables[seq], k_cache, v_cache, scale, (k_scale, v_scale),
                        window, sinks, softcap)
    full = q.new_zeros(num_tokens + 1, *q.shape[1:])
    full.index_copy_(0, token.flatten(), out.flatten(0, 1).to(q.dtype))
    return full[:num_tokens]


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                              scale: float, k_scale: torch.Tensor | None = None,
                              v_scale: torch.Tensor | None = None, window: int = 0,
                              sinks: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """The twin of ``nanovllm::paged_attention``: decode attention when every sequence has one new token (a
    cheaper tiling of the same computation), varlen prefill attention otherwise.

    ``window`` W > 0: the query at position p sees keys p - W < j <= p (transformers' sliding window), 0: all
    j <= p.  ``sinks`` [Hq]: one logit per query head in the softmax denominator only.  ``softcap`` > 0: scores
    become ``softcap * tanh(scores / softcap)`` before masking."""
    check_attention_kinds(q, window, sinks, softcap)
    if q.shape[0] == context_lens.shape[0]:
        return decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                          window, sinks, softcap)
    return prefill_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                       k_scale, v_scale, window, sinks, softcap)


def check_attention_kinds(q: torch.Tensor, window: int, sinks: torch.Tensor | None, softcap: float) -> None:
    """Refuse, by name, a negative ``window`` or ``softcap`` and ``sinks`` not of shape [Hq] (static checks)."""
    if window < 0:
        raise ValueError(f"paged_attention: window must be >= 0 (0: full causal), got {window}")
    if softcap < 0.0:
        raise ValueError(f"paged_attention: softcap must be >= 0 (0: off), got {softcap}")
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"paged_attention: sinks must have shape [num_q_heads] = [{q.shape[1]}], "
                         f"got {list(sinks.shape)}")


def norm_rope_reference(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                        q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                        num_heads: int, num_kv_heads: int, head_dim: int):
    """Split packed ``qkv`` [T, (Hq + 2 Hkv) D] into q, k, v; RMSNorm q and k per head (when weights are given)
    and rotate them.  The model's own norm and rope code (``norm_rope.py``), unfused."""
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
                            num_heads: int, num_kv_heads: int, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``norm_rope_reference``, then k and v stored in the cache; returns q [T, Hq, D]."""
    q, k, v = norm_rope_reference(qkv, positions, cos_cache, sin_cache, q_norm_weight, k_norm_weight, eps,
                                  num_heads, num_kv_heads, k_cache.shape[3])
    store_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q
