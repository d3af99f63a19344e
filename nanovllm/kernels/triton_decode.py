"""Paged decode attention in Triton: the split-KV kernel, its log-sum-exp reduce and their launch.

One program per (sequence, KV head, split) loads each KV tile once for all the query heads of its GQA group (a
``tl.dot`` over the group padded to 16 rows) and keeps an online softmax.  Each sequence's context (windowed: from
the tile holding the window's first key, no block wholly before it read) is cut into ``num_splits`` equal runs of
tiles, ``num_splits`` sized from static shapes to fill two waves of SMs; with more than one split every program
writes a partial output and its log-sum-exp, which ``_decode_reduce_kernel`` merges.  Split 0 seeds its softmax
with the head's sink logit, so the merge counts a sink once.  The grid runs the KV head fastest and rows come
longest first.  Packed (``cu_seqlens_q``), the kernels take the sequences of one query token out of a prefill
step's layout and write beside the prefill kernel's rows (KV read once per GQA group, not per head).

The grid and every launch parameter depend only on static shapes (batch, KV heads, block-table width, window) and
the SM count, never on ``context_lens`` values, so a launch can be captured in a CUDA graph and replayed with other
lengths.  A row with ``context_lens == 0`` yields zeros.  On Hopper, in bf16/fp16, whole KV tiles are loaded
through TMA descriptors of the cache (``use_tma``); the results are bit-identical to the pointer loads.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.pdl import pdl_begin, pdl_launch
from nanovllm.kernels.triton_common import (_LOG2E, _attend_tile, _check_cache, _dot_precision, _hopper_or_newer,
                                            _fp8_mma_dtype, _kv_offsets, _kv_scales, _num_sms, _softmax_start,
                                            _softmax_step, attention_kind_args, kv_scale_args, launch_fitting,
                                            shrink_configs)

_WAVES = 2  # programs aimed at: this many per SM


@triton.jit
def _query_row(cu_seqlens_ptr, b, PACKED: tl.constexpr):
    """The query row of sequence ``b``: ``b`` itself, or packed (``cu_seqlens``) its one token's, -1 where it has
    another number of tokens (a prefill's, left to the prefill kernel)."""
    if PACKED:
        first = tl.load(cu_seqlens_ptr + b)
        row = tl.where(tl.load(cu_seqlens_ptr + b + 1) - first == 1, first, -1).to(tl.int64)
    else:
        row = b.to(tl.int64)
    return row


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_desc, v_desc, block_tables_ptr, context_lens_ptr, cu_seqlens_ptr,
                   out_ptr, part_out_ptr, part_lse_ptr, k_scale_ptr, v_scale_ptr, sinks_ptr, qk_scale, num_splits,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_btb, stride_cb, stride_ch, stride_ct,
                   NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                   GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, PACKED: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr,
                   WINDOW: tl.constexpr, SINKS: tl.constexpr, SOFTCAP: tl.constexpr):
    pdl_begin(PDL)
    kv_head = tl.program_id(0)  # fastest-varying, so programs start in row order (rows come longest first)
    b = tl.program_id(1)
    split = tl.program_id(2)
    q_row = _query_row(cu_seqlens_ptr, b, PACKED)
    if q_row < 0:
        return
    ctx = tl.load(context_lens_ptr + b)
    # The context (windowed: from the tile holding its first key, kv_lo) cut into num_splits equal runs of whole
    # tiles; an empty run stores lse = -inf.  Split 0's first tile is masked below kv_lo, whose block it holds.
    if WINDOW > 0:
        kv_lo = tl.maximum(ctx - WINDOW, 0)
        base = (kv_lo // BLOCK_N) * BLOCK_N
    else:
        base = 0
    tiles_per_split = tl.cdiv(tl.cdiv(ctx - base, BLOCK_N), num_splits)
    lo = base + split * tiles_per_split * BLOCK_N
    hi = tl.maximum(tl.minimum(lo + tiles_per_split * BLOCK_N, ctx), lo)
    if WINDOW > 0:
        body_lo = tl.where(lo < kv_lo, lo + BLOCK_N, lo)  # past the masked first tile
        full_hi = body_lo + (tl.maximum(hi - body_lo, 0) // BLOCK_N) * BLOCK_N
    else:
        body_lo = lo
        full_hi = lo + ((hi - lo) // BLOCK_N) * BLOCK_N  # [lo, full_hi) is whole tiles; at most one partial after

    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, HEAD_DIM)
    q_head = kv_head * GROUP + g
    g_mask = g < GROUP
    q = tl.load(q_ptr + q_row * stride_qb + q_head[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None], other=0.0)
    m_i, l_i = _softmax_start(sinks_ptr, q_head, g_mask, split == 0, GROUP_P, SINKS)  # split 0 holds the sink
    acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_btb
    head_off = kv_head.to(tl.int64) * stride_ch
    k_scale, v_scale = _kv_scales(k_scale_ptr, v_scale_ptr, kv_head, FP8)
    qk_scale = qk_scale * k_scale
    if FP8:
        q = _fp8_mma_dtype(q)
    if WINDOW > 0:
        for start in range(lo, body_lo, BLOCK_N):  # the tile holding kv_lo, keys before it masked
            n = start + tl.arange(0, BLOCK_N)
            valid = (n >= kv_lo) & (n < hi)
            offs = head_off + _kv_offsets(bt_row, start, n, valid, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
            m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], valid,
                                         valid[None, :], m_i, l_i, acc, qk_scale, True, DOT_PRECISION, SOFTCAP)
    for start in range(body_lo, full_hi, BLOCK_N):
        if TMA:  # whole tiles as bulk copies: row (block, head, token) of the cache viewed as [rows, HEAD_DIM]
            block = tl.load(bt_row + start // BLOCK_SIZE)
            row = (block * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + start % BLOCK_SIZE
            m_i, l_i, acc = _softmax_step(q, k_desc.load([row, 0]), v_desc.load([row, 0]), None, m_i, l_i, acc,
                                          qk_scale, False, DOT_PRECISION, SOFTCAP)
        else:
            n = start + tl.arange(0, BLOCK_N)
            offs = head_off + _kv_offsets(bt_row, start, n, n < full_hi, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
            m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], None, None,
                                         m_i, l_i, acc, qk_scale, False, DOT_PRECISION, SOFTCAP)
    for start in range(full_hi, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        offs = head_off + _kv_offsets(bt_row, start, n, valid, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, offs[:, None] + d[None, :], valid,
                                     valid[None, :], m_i, l_i, acc, qk_scale, True, DOT_PRECISION, SOFTCAP)

    out = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]  # empty context or empty split: zeros
    if not PARTIAL:
        tl.store(out_ptr + q_row * stride_ob + q_head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        row = (b.to(tl.int64) * NUM_Q_HEADS + q_head) * num_splits + split  # [GROUP_P]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=g_mask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, cu_seqlens_ptr, num_splits, stride_ob, stride_oh,
                          NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_P: tl.constexpr,
                          PACKED: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    q_row = _query_row(cu_seqlens_ptr, b, PACKED)
    if q_row < 0:
        return
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
    tl.store(out_ptr + q_row * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _decode_config(q: torch.Tensor, block_size: int):
    """Default (BLOCK_N, num_warps, num_stages): the best of a GPU sweep (``benchmarks/attention_kernels.py``); a head
    too wide for them takes smaller KV tiles at launch (``launch_fitting``)."""
    return (64, 4, 3) if q.dtype == torch.float32 else (64, 2, 3)


def decode_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int, block_n: int,
                      device: torch.device) -> int:
    """Splits per (sequence, KV head): enough programs to fill two waves of SMs, from static shapes only."""
    max_tiles = triton.cdiv(max_blocks * block_size, block_n)
    want = triton.cdiv(_WAVES * _num_sms(device), batch * num_kv_heads)
    return max(1, min(want, triton.cdiv(max_tiles, 4), 64))  # keep >= ~4 tiles of work per split


def use_tma(q: torch.Tensor, k_cache: torch.Tensor, block_n: int) -> bool:
    """Whether the kernel loads whole KV tiles with the tensor memory accelerator: Hopper+ with Hopper features on,
    bf16/fp16, and a contiguous cache whose blocks hold whole tiles."""
    if q.device.type != "cuda" or q.dtype == torch.float32:
        return False  # an FP8 cache loads its tiles the same way (half the bytes per box)
    return _hopper_or_newer(q.device) and k_cache.is_contiguous() and k_cache.shape[2] % block_n == 0 \
        and k_cache.shape[3] <= 256  # a TMA box spans at most 256 elements a dimension


def _kv_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int):
    """Host-side TMA descriptors of both caches viewed as [blocks x heads x tokens, head_dim], [block_n, D] boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    head_dim = k_cache.shape[3]
    return tuple(TensorDescriptor.from_tensor(c.view(-1, head_dim), [block_n, head_dim]) for c in (k_cache, v_cache))


def decode_attention_configured(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale=None, v_scale=None,
                                window=0, sinks=None, softcap=0.0, *, cu_seqlens_q=None, out=None, num_splits=None,
                                block_n=None, num_warps=None, num_stages=None):
    """``decode_attention_triton`` with its launch parameters exposed (tests and kernel benchmarks).  Overrides
    must stay functions of static shapes for the launch to be graph-capturable.  With ``cu_seqlens_q`` (packed, a
    prefill step's layout) only the sequences of one query token are computed, into ``out`` at that token's row."""
    _check_cache(k_cache, v_cache)
    num_q_heads, head_dim = q.shape[1:]
    batch = context_lens.shape[0]  # sequences: q's rows, or cu_seqlens_q's intervals when packed
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(2) == 1 and num_q_heads % num_kv_heads == 0
    assert (cu_seqlens_q is None) == (out is None), "a packed launch writes into the prefill's output"
    cfg_n, cfg_w, cfg_s = _decode_config(q, block_size)
    num_warps = num_warps or cfg_w
    configs = [c[1:] for c in shrink_configs(16, block_n or cfg_n, num_stages or cfg_s)] \
        if (block_n, num_stages) == (None, None) else [(block_n or cfg_n, num_stages or cfg_s)]
    if out is None:
        out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    packed = cu_seqlens_q is not None
    if batch == 0:
        return out
    scales, fp8 = kv_scale_args(k_cache, k_scale, v_scale)
    sinks_arg, kinds = attention_kind_args(q, window, sinks, softcap)
    group = num_q_heads // num_kv_heads

    def launch(config):
        block_n, num_stages = config
        max_blocks = block_tables.shape[1]
        if window > 0:  # a window spans at most this many blocks' worth of tiles
            max_blocks = min(max_blocks, triton.cdiv(window + block_n, block_size))
        splits = num_splits or decode_num_splits(batch, num_kv_heads, max_blocks, block_size, block_n, q.device)
        if splits > 1:
            part_out = torch.empty((batch, num_q_heads, splits, head_dim), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((batch, num_q_heads, splits), dtype=torch.float32, device=q.device)
        else:
            part_out = part_lse = out  # unused
        tma = use_tma(q, k_cache, block_n)
        k_desc, v_desc = _kv_descriptors(k_cache, v_cache, block_n) if tma else (k_cache, v_cache)
        _decode_kernel[(num_kv_heads, batch, splits)](
            q, k_cache, v_cache, k_desc, v_desc, block_tables, context_lens, cu_seqlens_q if packed else context_lens,
            out, part_out, part_lse, *scales, sinks_arg,
            scale * _LOG2E,
            splits, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group,
            GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            BLOCK_N=block_n, PARTIAL=splits > 1, PACKED=packed, DOT_PRECISION=_dot_precision(q), FP8=fp8, TMA=tma,
            num_warps=num_warps, num_stages=num_stages, **kinds, **pdl_launch(q.device))
        if splits > 1:
            _decode_reduce_kernel[(batch, num_q_heads)](
                part_out, part_lse, out, cu_seqlens_q if packed else context_lens, splits, out.stride(0),
                out.stride(1), NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, SPLITS_P=triton.next_power_of_2(splits),
                PACKED=packed, num_warps=4, **pdl_launch(q.device))

    launch_fitting(("decode", head_dim, q.dtype, k_cache.dtype, q.device, packed, *kinds.values()), configs, launch)
    return out


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, k_scale=None,
                            v_scale=None, window: int = 0, sinks=None, softcap: float = 0.0) -> torch.Tensor:
    """Paged decode attention: q [B, Hq, D] -> [B, Hq, D] over each row's ``context_lens`` cached tokens (an FP8
    cache with its per-head scales); ``window``, ``sinks``, ``softcap`` as the twin's (``reference.py``)."""
    return decode_attention_configured(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                       window, sinks, softcap)
