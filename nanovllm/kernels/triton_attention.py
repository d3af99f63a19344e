"""Fused Triton kernels for the paged KV cache: KV store, decode attention and varlen prefill attention.

``cuda.py`` registers them for CUDA tensors as implementations of the ops in ``ops.py``; ``reference.py`` holds
their pure-PyTorch twins, the cache layout and the meaning of ``context_lens``, ``window``, ``sinks``, ``softcap``.

* ``store_kv_triton``: one program per token writes all its KV heads into their slot (slot -1 is skipped).
* ``decode_attention_triton``: split-KV decode attention, in ``triton_decode.py`` (re-exported here).
* ``prefill_attention_triton``: causal flash attention over queries packed by ``cu_seqlens_q``, reading K/V
  straight from the paged cache (cached prefix and chunked prefill need no copy).  The grid is ``(T // BLOCK_M +
  B, Hq)``, an upper bound on the query tiles; each program finds its sequence by binary search over
  ``cu_seqlens_q`` and exits past its queries, or where it has one (the decode kernel's, launched packed after).
  A windowed tile reads KV only from the tile holding its first row's earliest key on.  Window, sinks and
  softcap are compile-time constants: 0, None, 0.0 compile the plain causal kernels.

No host sync, no data-dependent shapes (all CUDA-graph capturable); CI runs them under ``TRITON_INTERPRET=1`` on CPU.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.pdl import pdl_begin, pdl_launch
from nanovllm.kernels.triton_common import (_LOG2E, _attend_tile, _check_cache, _dot_precision, _kv_offsets,
                                            _fp8_mma_dtype, _kv_scales, _quantize_fp8, _softmax_start,
                                            attention_kind_args, kv_scale_args, launch_fitting,
                                            shrink_configs)
from nanovllm.kernels.triton_decode import (  # noqa: F401  (decode lives in its own modules; re-exported here)
    _decode_config, decode_attention_configured, decode_attention_triton, decode_num_splits)


# ----------------------------------------------------------------------------------------------- store

@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_ct,
                     NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < NUM_HEADS
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:
        k = _quantize_fp8(k, tl.load(k_scale_ptr + h, mask=mask, other=1.0))
        v = _quantize_fp8(v, tl.load(v_scale_ptr + h, mask=mask, other=1.0))
    dst = (slot // BLOCK_SIZE) * stride_cb + h * stride_ch + (slot % BLOCK_SIZE) * stride_ct + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
    """Write ``key``/``value`` [T, Hkv, D] into their slots of the paged cache (quantised with the per-head
    scales into an FP8 cache); slot -1 is skipped."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(2) == 1 and value.stride(2) == 1
    scales, fp8 = kv_scale_args(k_cache, k_scale, v_scale)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, *scales,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, HEADS_P2=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[2], FP8=fp8, num_warps=4, **pdl_launch(key.device))


# --------------------------------------------------------------------------------------------- prefill

# num_seqs and the block-table stride change with every prefill batch; Triton would otherwise specialise (and
# JIT-compile a new variant) on whether each is 1 or a multiple of 16, seconds of compilation inside generate.
@triton.jit(do_not_specialize=["num_seqs", "stride_btb"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr, out_ptr,
                    k_scale_ptr, v_scale_ptr, sinks_ptr, qk_scale, num_seqs, stride_qt, stride_qh, stride_ot,
                    stride_oh, stride_btb, stride_cb, stride_ch, stride_ct,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    FP8: tl.constexpr, SKIP_SINGLE: tl.constexpr, PDL: tl.constexpr, WINDOW: tl.constexpr,
                    SINKS: tl.constexpr, SOFTCAP: tl.constexpr):
    pdl_begin(PDL)
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
    if SKIP_SINGLE:  # a sequence of one query token is the packed decode kernel's
        if q_len == 1:
            return
    ctx = tl.load(context_lens_ptr + b)

    i = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    row_valid = i < q_len
    pos = ctx - q_len + i  # absolute position of each query row
    rows = (q_begin + i).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=row_valid[:, None],
                other=0.0)
    m_i, l_i = _softmax_start(sinks_ptr, head, head >= 0, head >= 0, BLOCK_M, SINKS)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_btb
    head_off = (head // GROUP).to(tl.int64) * stride_ch
    k_scale, v_scale = _kv_scales(k_scale_ptr, v_scale_ptr, head // GROUP, FP8)
    qk_scale = qk_scale * k_scale
    if FP8:
        q = _fp8_mma_dtype(q)
    first_pos = ctx - q_len + m0
    # KV tiles every row of this tile sees whole.  At least 0: a padding sequence (context 0, any number of
    # tokens) has negative positions, attends to nothing and gets zeros, reading no block-table entry.
    full_end = tl.maximum(((first_pos + 1) // BLOCK_N) * BLOCK_N, 0)
    kv_end = tl.minimum(ctx, first_pos + BLOCK_M)  # nothing past the last row's position (kv_end - 1)
    if WINDOW > 0:
        # Keys from kv_lo (the first row's earliest) on, in tiles from the one holding it: no block wholly before
        # kv_lo is read (masked loads skip its table entry).  Tiles from front_end on are in every row's window.
        kv_lo = tl.maximum(first_pos - WINDOW + 1, 0)
        lo = (kv_lo // BLOCK_N) * BLOCK_N
        shared = tl.maximum(kv_end - WINDOW, 0)  # the last row's earliest key
        front_end = tl.minimum(tl.maximum(tl.cdiv(shared, BLOCK_N) * BLOCK_N, lo), full_end)
        for start in range(lo, front_end, BLOCK_N):  # window-edge tiles, before the diagonal
            n = start + tl.arange(0, BLOCK_N)
            valid = n >= kv_lo
            offs = head_off + _kv_offsets(bt_row, start, n, valid, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
            keep = (n[None, :] > pos[:, None] - WINDOW) & valid[None, :]
            m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], valid, keep,
                                         m_i, l_i, acc, qk_scale, True, DOT_PRECISION, SOFTCAP)
    else:
        front_end = 0
    for start in range(front_end, full_end, BLOCK_N):  # unmasked tiles
        n = start + tl.arange(0, BLOCK_N)
        offs = head_off + _kv_offsets(bt_row, start, n, n < full_end, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], None, None,
                                     m_i, l_i, acc, qk_scale, False, DOT_PRECISION, SOFTCAP)
    for start in range(full_end, kv_end, BLOCK_N):  # diagonal tiles
        n = start + tl.arange(0, BLOCK_N)
        valid = n < kv_end
        if WINDOW > 0:
            valid = valid & (n >= kv_lo)
        offs = head_off + _kv_offsets(bt_row, start, n, valid, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
        keep = (n[None, :] <= pos[:, None]) & valid[None, :]
        if WINDOW > 0:
            keep = keep & (n[None, :] > pos[:, None] - WINDOW)
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], valid, keep,
                                     m_i, l_i, acc, qk_scale, True, DOT_PRECISION, SOFTCAP)
    out = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def _prefill_config(q: torch.Tensor):
    """Default (BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel (bf16: the best of a GPU sweep); a
    head too wide for them takes smaller tiles at launch (``launch_fitting``)."""
    return (64, 32, 4, 2) if q.dtype == torch.float32 else (64, 64, 4, 3)


def prefill_attention_configured(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, k_scale=None,
                                 v_scale=None, window=0, sinks=None, softcap=0.0, *, skip_single=False, block_m=None,
                                 block_n=None, num_warps=None, num_stages=None):
    """``prefill_attention_triton`` with its launch parameters exposed (for benchmarks and tests); ``skip_single``
    leaves the rows of one-token sequences unwritten (``prefill_attention_triton`` has the decode kernel write
    them)."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    num_seqs = cu_seqlens_q.shape[0] - 1
    assert q.stride(2) == 1 and num_q_heads % num_kv_heads == 0
    cfg = _prefill_config(q)
    tiles = (block_m or cfg[0], block_n or cfg[1], num_stages or cfg[3])
    configs = shrink_configs(*tiles) if (block_m, block_n, num_stages) == (None, None, None) else [tiles]
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    scales, fp8 = kv_scale_args(k_cache, k_scale, v_scale)
    sinks_arg, kinds = attention_kind_args(q, window, sinks, softcap)

    def launch(config):
        block_m, block_n, stages = config
        grid = (num_tokens // block_m + num_seqs, num_q_heads)  # upper bound on query tiles over all sequences
        _prefill_kernel[grid](
            q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, *scales, sinks_arg, scale * _LOG2E,
            num_seqs,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
            BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q), FP8=fp8, SKIP_SINGLE=skip_single,
            num_warps=num_warps or cfg[2], num_stages=stages, **kinds, **pdl_launch(q.device))

    launch_fitting(("prefill", head_dim, q.dtype, k_cache.dtype, q.device, *kinds.values()), configs, launch)
    return out


def prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                             scale: float, k_scale=None, v_scale=None, window: int = 0, sinks=None,
                             softcap: float = 0.0) -> torch.Tensor:
    """Varlen causal attention: q [T, Hq, D] packed by ``cu_seqlens_q`` [B+1] over the paged cache (an FP8 cache
    with its per-head scales).  The sequences of one query token (decode rows riding in a prefill step) take the
    packed decode kernel, which reads their KV once per GQA group; the prefill kernel leaves their rows."""
    out = prefill_attention_configured(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                       k_scale, v_scale, window, sinks, softcap, skip_single=True)
    return decode_attention_configured(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                       window, sinks, softcap, cu_seqlens_q=cu_seqlens_q, out=out)


__all__ = ["store_kv_triton", "decode_attention_triton", "prefill_attention_triton"]
