"""Stream-K paged decode attention: a fixed number of programs share the batch's KV tiles equally.

Lay every (sequence b, KV head h) side by side as a run of ``tiles_b = cdiv(context_lens[b], BLOCK_N)`` KV tiles,
b-major then h, for ``total = Hkv * sum(tiles_b)`` tiles in all.  Program ``p`` of the ``P`` launched (P depends
only on the SM count and ``programs_per_sm``) takes tiles ``[p * W, (p + 1) * W)`` with ``W = cdiv(total, P)``:
every program does the same amount of work whatever the mix of lengths, and nothing is launched just to exit.
A program's run may cross (b, h) boundaries; it writes one partial (softmax-normalised output and log-sum-exp,
fp32) per segment, i.e. per (b, h) it touches.  Along the tile order the pair (b*Hkv + h, p) only grows, one
coordinate at a time, so ``segment = b*Hkv + h + p`` is unique and the scratch holds ``B*Hkv + P`` segments.
The reduce kernel recomputes the same layout, finds the programs ``[start // W, (end - 1) // W]`` that covered
(b, h) and merges their segments by log-sum-exp; a row with no tiles (context 0) gets zeros.

Both kernels read all ``context_lens`` (``BATCH_P`` lanes) and take a prefix sum in registers; there is no host
synchronisation and no data-dependent shape, so the launches can be captured in a CUDA graph.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_common import _LOG2E, _attend_tile, _dot_precision, _kv_offsets, _num_sms


@triton.jit
def _tile_layout(context_lens_ptr, batch, num_programs, BATCH_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 NUM_KV_HEADS: tl.constexpr, MIN_TILES: tl.constexpr):
    """(lanes, tiles per row, inclusive prefix sum of tiles over rows, total tiles, tiles per program)."""
    lanes = tl.arange(0, BATCH_P)
    lens = tl.load(context_lens_ptr + lanes, mask=lanes < batch, other=0)
    tiles = (tl.maximum(lens, 0) + BLOCK_N - 1) // BLOCK_N
    cum = tl.cumsum(tiles, 0)
    total = tl.sum(tiles, 0) * NUM_KV_HEADS
    per = tl.maximum(tl.cdiv(total, num_programs), MIN_TILES)
    return lanes, tiles, cum, total, per


@triton.jit
def _streamk_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, part_out_ptr, part_lse_ptr,
                    qk_scale, batch, num_programs, stride_qb, stride_qh, stride_btb, stride_cb, stride_ch, stride_ct,
                    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BATCH_P: tl.constexpr, MIN_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    p = tl.program_id(0)
    lanes, tiles, cum, total, per = _tile_layout(context_lens_ptr, batch, num_programs, BATCH_P, BLOCK_N,
                                                 NUM_KV_HEADS, MIN_TILES)
    t = p * per
    end = tl.minimum(t + per, total)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, HEAD_DIM)
    g_mask = g < GROUP
    while t < end:
        # The row b holding global tile t: rows whose runs (all heads) end at or before t come first.
        b = tl.sum((cum * NUM_KV_HEADS <= t).to(tl.int32), 0)
        tiles_b = tl.sum(tl.where(lanes == b, tiles, 0), 0)
        row_start = (tl.sum(tl.where(lanes == b, cum, 0), 0) - tiles_b) * NUM_KV_HEADS
        kv_head = (t - row_start) // tiles_b
        t0 = t - row_start - kv_head * tiles_b  # first tile of this segment within (b, kv_head)
        t1 = tl.minimum(tiles_b, t0 + (end - t))
        ctx = tl.load(context_lens_ptr + b)
        lo = t0 * BLOCK_N
        hi = tl.minimum(t1 * BLOCK_N, ctx)
        full_hi = lo + ((hi - lo) // BLOCK_N) * BLOCK_N

        q_head = kv_head * GROUP + g
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
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))  # every segment holds >= 1 token
        seg = (b * NUM_KV_HEADS + kv_head + p).to(tl.int64) * GROUP + g  # [GROUP_P] scratch rows
        tl.store(part_out_ptr + seg[:, None] * HEAD_DIM + d[None, :], out, mask=g_mask[:, None])
        tl.store(part_lse_ptr + seg, lse, mask=g_mask)
        t += t1 - t0


@triton.jit
def _streamk_reduce_kernel(part_out_ptr, part_lse_ptr, context_lens_ptr, out_ptr, batch, num_programs,
                           stride_ob, stride_oh, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BATCH_P: tl.constexpr,
                           SEGS_P: tl.constexpr, MIN_TILES: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)  # query head
    kv_head = h // GROUP
    lanes, tiles, cum, total, per = _tile_layout(context_lens_ptr, batch, num_programs, BATCH_P, BLOCK_N,
                                                 NUM_KV_HEADS, MIN_TILES)
    tiles_b = tl.sum(tl.where(lanes == b, tiles, 0), 0)
    start = (tl.sum(tl.where(lanes == b, cum, 0), 0) - tiles_b) * NUM_KV_HEADS + kv_head * tiles_b
    p_first = start // per
    num_segs = tl.where(tiles_b > 0, (start + tiles_b - 1) // per - p_first + 1, 0)
    k = tl.arange(0, SEGS_P)
    k_mask = k < num_segs
    seg = (b * NUM_KV_HEADS + kv_head + p_first + k).to(tl.int64) * GROUP + h % GROUP
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + seg, mask=k_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)
    parts = tl.load(part_out_ptr + seg[:, None] * HEAD_DIM + d[None, :], mask=k_mask[:, None], other=0.0)
    wsum = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(wsum > 0, wsum, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def streamk_num_programs(device: torch.device, programs_per_sm: int) -> int:
    return programs_per_sm * _num_sms(device)


def launch_streamk(q, k_cache, v_cache, block_tables, context_lens, scale, out, block_n, num_warps, num_stages,
                   programs_per_sm, min_tiles=1):
    """Run the stream-K decode kernel and its reduce into ``out`` [B, Hq, D]; contexts may not exceed the table."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    max_tiles = triton.cdiv(block_tables.shape[1] * block_size, block_n)
    num_programs = streamk_num_programs(q.device, programs_per_sm)
    batch_p = triton.next_power_of_2(batch)
    segs = batch * num_kv_heads + num_programs
    part_out = torch.empty((segs, group, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((segs, group), dtype=torch.float32, device=q.device)
    _streamk_kernel[(num_programs,)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse, scale * _LOG2E, batch, num_programs,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, BATCH_P=batch_p, MIN_TILES=min_tiles,
        DOT_PRECISION=_dot_precision(q), num_warps=num_warps, num_stages=num_stages)
    _streamk_reduce_kernel[(batch, num_q_heads)](
        part_out, part_lse, context_lens, out, batch, num_programs, out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_N=block_n, BATCH_P=batch_p,
        SEGS_P=triton.next_power_of_2(max_tiles), MIN_TILES=min_tiles, num_warps=4)
