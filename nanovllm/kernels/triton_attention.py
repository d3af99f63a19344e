"""Fused Triton kernels for the paged KV cache: KV store, decode attention and varlen prefill attention.

These are the CUDA path of the ops in ``ops.py``; ``reference.py`` holds their pure-PyTorch twins, the cache
layout ``cache[num_blocks, num_kv_heads, block_size, head_dim]`` and the meaning of ``context_lens``.

* ``store_kv_triton``: one program per token writes all its KV heads into their slot (slot -1 is skipped).
* ``decode_attention_triton``: one program per (sequence, KV head, split) loads each KV tile once for all
  the query heads of its GQA group (a ``tl.dot`` over the group padded to 16 rows), keeps an online softmax
  over its share of the context, and a second kernel merges the splits by log-sum-exp.  The number of splits
  depends only on static shapes (batch, KV heads, block-table width) and the SM count, so the grid is fixed
  and the launch can be captured in a CUDA graph.  A row with ``context_lens == 0`` yields zeros.
* ``prefill_attention_triton``: causal flash attention over queries packed by ``cu_seqlens_q``, reading K/V
  straight from the paged cache (cached prefix and chunked prefill need no copy).  The grid is
  ``(T // BLOCK_M + B, Hq)``, an upper bound on the number of query tiles; each program finds its sequence
  by binary search over ``cu_seqlens_q`` and exits when its tile is past that sequence's queries.

No host synchronisation and no data-dependent shapes: everything may run inside a CUDA graph.  The kernels
also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how CI tests them.
"""
import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter runs: any fixed number keeps the split logic exercised
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _dot_precision(q: torch.Tensor) -> str:
    """``tl.dot`` mode: exact fp32 for fp32 inputs; "upcast" off GPU, where the Triton interpreter (3.9)
    multiplies bf16 operands as their raw uint16 bits, so both operands go to fp32 first."""
    if not q.is_cuda:
        return "upcast"
    return "ieee" if q.dtype == torch.float32 else "tf32"  # the flag only matters for fp32 operands


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _kv_offsets(block_table_row, start, n, valid, stride_cb, stride_ct,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets (without the head term) of KV tokens ``n`` of one sequence in the paged cache."""
    if BLOCK_N == BLOCK_SIZE:  # the tile is one cache block
        block = tl.load(block_table_row + start // BLOCK_SIZE).to(tl.int64)
        return block * stride_cb + tl.arange(0, BLOCK_N) * stride_ct
    elif BLOCK_N < BLOCK_SIZE:  # the tile sits inside one cache block
        block = tl.load(block_table_row + start // BLOCK_SIZE).to(tl.int64)
        return block * stride_cb + (start % BLOCK_SIZE + tl.arange(0, BLOCK_N)) * stride_ct
    else:
        block = tl.load(block_table_row + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        return block * stride_cb + (n % BLOCK_SIZE) * stride_ct


@triton.jit
def _attend_tile(q, k_cache_ptr, v_cache_ptr, offs, kv_valid, keep, m_i, l_i, acc, qk_scale,
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of q [M, D] over the KV tile at ``offs`` [N, D]; ``keep`` [M, N] if MASKED."""
    if MASKED:
        k = tl.load(k_cache_ptr + offs, mask=kv_valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=kv_valid[:, None], other=0.0)
        s = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale  # log2 units
        s = tl.where(keep, s, float("-inf"))
    else:
        k = tl.load(k_cache_ptr + offs)
        v = tl.load(v_cache_ptr + offs)
        s = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


# ----------------------------------------------------------------------------------------------- store

@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_ct,
                     NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < NUM_HEADS
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = (slot // BLOCK_SIZE) * stride_cb + h * stride_ch + (slot % BLOCK_SIZE) * stride_ct + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "K and V caches must match"
    assert k_cache.stride(3) == 1, "head_dim must be contiguous in the cache"


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` [T, Hkv, D] into their slots of the paged cache; slot -1 is skipped."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(2) == 1 and value.stride(2) == 1
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, HEADS_P2=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[2], num_warps=4)


# ---------------------------------------------------------------------------------------------- decode

@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                   out_ptr, part_out_ptr, part_lse_ptr, qk_scale, num_splits,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_btb, stride_cb, stride_ch, stride_ct,
                   NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), num_splits)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.maximum(tl.minimum(lo + tiles_per_split * BLOCK_N, ctx), lo)
    full_hi = lo + ((hi - lo) // BLOCK_N) * BLOCK_N  # [lo, full_hi) is whole tiles; at most one partial after

    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, HEAD_DIM)
    q_head = kv_head * GROUP + g
    g_mask = g < GROUP
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + q_head[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None], other=0.0)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_btb
    head_off = kv_head.to(tl.int64) * stride_ch
    for start in range(lo, full_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        offs = head_off + _kv_offsets(bt_row, start, n, n < full_hi, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], None, None,
                                     m_i, l_i, acc, qk_scale, False, DOT_PRECISION)
    for start in range(full_hi, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        offs = head_off + _kv_offsets(bt_row, start, n, valid, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], valid,
                                     valid[None, :], m_i, l_i, acc, qk_scale, True, DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty context or empty split: zeros
    if not PARTIAL:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + q_head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        row = (b.to(tl.int64) * NUM_Q_HEADS + q_head) * num_splits + split  # [GROUP_P]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=g_mask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                          NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P)
    d = tl.arange(0, HEAD_DIM)
    s_mask = s < num_splits
    row = (b * NUM_Q_HEADS + h) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # empty splits weigh 0
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _decode_config(q: torch.Tensor, block_size: int):
    """Default (BLOCK_N, num_warps, num_stages) for the decode kernel.

    Swept on an H100 (benchmarks/attention_kernels.py, Qwen3-0.6B shape, bf16): 64-token tiles with 2 warps reached
    96.7-97.6% of copy bandwidth at bs256 x ctx1k and bs64 x ctx4k and 91-92% at bs8 x ctx16k for KV block sizes
    16/64/256, at or above every other config tried (4 warps lost 10 points at block size 64, bs64 x ctx4k)."""
    if q.dtype == torch.float32:
        return 64, 4, 3
    return 64, 2, 3


def decode_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int, block_n: int,
                      device: torch.device, waves: int = 2) -> int:
    """KV splits per (sequence, KV head): enough programs to fill ``waves`` x SM count, from static shapes only."""
    max_tiles = triton.cdiv(max_blocks * block_size, block_n)
    want = triton.cdiv(waves * _num_sms(device), batch * num_kv_heads)
    return max(1, min(want, triton.cdiv(max_tiles, 4), 64))  # keep >= ~4 tiles of work per split


def decode_attention_configured(q, k_cache, v_cache, block_tables, context_lens, scale, *, num_splits=None,
                                block_n=None, num_warps=None, num_stages=None, waves=2):
    """``decode_attention_triton`` with its launch parameters exposed (for benchmarks and tests)."""
    _check_cache(k_cache, v_cache)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    assert q.stride(2) == 1 and group * num_kv_heads == num_q_heads
    cfg_n, cfg_w, cfg_s = _decode_config(q, block_size)
    block_n, num_warps, num_stages = block_n or cfg_n, num_warps or cfg_w, num_stages or cfg_s
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size, block_n, q.device,
                                       waves)
    out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits > 1:
        part_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTIAL=num_splits > 1, DOT_PRECISION=_dot_precision(q),
        num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1), NUM_Q_HEADS=num_q_heads,
            HEAD_DIM=head_dim, SPLITS_P=triton.next_power_of_2(num_splits), num_warps=4)
    return out


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Paged decode attention: q [B, Hq, D] -> [B, Hq, D] over each row's ``context_lens`` cached tokens."""
    return decode_attention_configured(q, k_cache, v_cache, block_tables, context_lens, scale)


# --------------------------------------------------------------------------------------------- prefill

# num_seqs and the block-table stride change with every prefill batch; Triton would otherwise specialise (and
# JIT-compile a new variant) on whether each is 1 or a multiple of 16, seconds of compilation inside generate.
@triton.jit(do_not_specialize=["num_seqs", "stride_btb"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr, out_ptr,
                    qk_scale, num_seqs, stride_qt, stride_qh, stride_ot, stride_oh, stride_btb,
                    stride_cb, stride_ch, stride_ct,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    # Sequence b owns tiles [cu[b] // BLOCK_M + b, ...): find the last b whose first tile is <= ours.
    lo = tile * 0
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(cu_seqlens_ptr + mid) // BLOCK_M + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid)
    b = lo
    q_begin = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_begin
    m0 = (tile - (q_begin // BLOCK_M + b)) * BLOCK_M
    if m0 >= q_len:
        return
    ctx = tl.load(context_lens_ptr + b)

    i = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    row_valid = i < q_len
    pos = ctx - q_len + i  # absolute position of each query row
    rows = (q_begin + i).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=row_valid[:, None],
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_btb
    head_off = (head // GROUP).to(tl.int64) * stride_ch
    first_pos = ctx - q_len + m0
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N  # KV tiles every row of this tile sees whole
    kv_end = tl.minimum(ctx, first_pos + BLOCK_M)  # nothing past the last row's position
    for start in range(0, full_end, BLOCK_N):  # unmasked tiles
        n = start + tl.arange(0, BLOCK_N)
        offs = head_off + _kv_offsets(bt_row, start, n, n < full_end, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], None, None,
                                     m_i, l_i, acc, qk_scale, False, DOT_PRECISION)
    for start in range(full_end, kv_end, BLOCK_N):  # diagonal tiles
        n = start + tl.arange(0, BLOCK_N)
        valid = n < kv_end
        offs = head_off + _kv_offsets(bt_row, start, n, valid, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
        keep = (n[None, :] <= pos[:, None]) & valid[None, :]
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], valid, keep,
                                     m_i, l_i, acc, qk_scale, True, DOT_PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def _prefill_config(q: torch.Tensor):
    """Default (BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel (bf16: best of the H100 sweep)."""
    if q.dtype == torch.float32:
        return 64, 32, 4, 2
    return 64, 64, 4, 3


def prefill_attention_configured(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, *,
                                 block_m=None, block_n=None, num_warps=None, num_stages=None):
    """``prefill_attention_triton`` with its launch parameters exposed (for benchmarks and tests)."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    num_seqs = cu_seqlens_q.shape[0] - 1
    assert q.stride(2) == 1 and num_q_heads % num_kv_heads == 0
    cfg = _prefill_config(q)
    block_m, block_n = block_m or cfg[0], block_n or cfg[1]
    num_warps, num_stages = num_warps or cfg[2], num_stages or cfg[3]
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    grid = (num_tokens // block_m + num_seqs, num_q_heads)  # upper bound on query tiles over all sequences
    _prefill_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, scale * _LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q), num_warps=num_warps, num_stages=num_stages)
    return out


def prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Varlen causal attention: q [T, Hq, D] packed by ``cu_seqlens_q`` [B+1] over the paged cache."""
    return prefill_attention_configured(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)


__all__ = ["store_kv_triton", "decode_attention_triton", "prefill_attention_triton"]
