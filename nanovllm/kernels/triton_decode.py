"""Paged decode attention in Triton: variants, the split-KV kernel they share, its log-sum-exp reduce, dispatch.

Every variant loads each KV tile once for all the query heads of its GQA group (a ``tl.dot`` over the group
padded to 16 rows) and keeps an online softmax; they differ in how the work is cut into programs.  The grid and
every launch parameter depend only on static shapes (batch, KV heads, block-table width) and the SM count, never
on ``context_lens`` values, so a launch can be captured in a CUDA graph and replayed with other lengths.

* ``legacy``: one program per (sequence, KV head, split); each sequence's context is cut into ``num_splits``
  equal parts, with ``num_splits`` sized to fill 2 waves of SMs (1 split at batch 256).  Balanced for uniform
  contexts; with mixed lengths the long sequences' programs would be stragglers, so the grid runs the KV head
  fastest and the scheduler hands rows over longest context first: the longest programs start first.
* ``chunk`` / ``chunk_rev`` (flash-decoding): a split is a fixed number of KV tiles (``decode_chunk_tiles``,
  at most 8 x 64 tokens), the grid holds the most splits any row could need, and programs past their row's
  context exit at once; the reduce merges only non-empty splits.  ``chunk_rev`` launches the highest splits
  first (the far ends of the longest rows start earliest).
* ``streamk`` (``triton_decode_streamk.py``): a fixed number of programs (``programs_per_sm`` x SMs) share the
  batch's total KV tiles equally, each walking a contiguous run of (sequence, head, tile) that may span rows.

On Hopper, in bf16/fp16, the split kernel loads its whole KV tiles through TMA descriptors of the cache
(``use_tma``; bit-identical to the pointer loads, 1-4% faster at bench's batches, ``benchmarks/decode_policy.py``).
``NANOVLLM_DECODE_VARIANT`` picks the variant ``decode_attention_triton`` uses (default ``DEFAULT_VARIANT``).
A row with ``context_lens == 0`` yields zeros in every variant.
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.kernels.pdl import pdl_begin, pdl_launch
from nanovllm.kernels.triton_common import (_LOG2E, _attend_tile, _check_cache, _dot_precision, _hopper_or_newer,
                                            _kv_offsets, _num_sms, _softmax_step)


@dataclass(frozen=True)
class DecodeVariant:
    kind: str  # "split" (the kernel below) or "streamk"
    chunk_tiles: int = 0  # split: 0 = legacy proportional splits, else the largest fixed chunk (in BLOCK_N tiles)
    reverse: bool = False  # split: launch the highest split index first
    # legacy: splits fill this many waves of SMs.  On an H100, 4 (2 splits instead of 1 at batch 33-64) was
    # 10-15% faster per launch at batch 48-64 in benchmarks/decode_policy.py, but not in bench.py --bs 256:
    # its steps at running batch 16-63 took 0.845-0.861 s with 4 against 0.845-0.850 s with 2 (same call).
    waves: int = 2
    programs_per_sm: int = 12  # streamk: a multiple of every likely occupancy (1, 2, 3, 4, 6 programs per SM)


DECODE_VARIANTS = {
    "legacy": DecodeVariant("split"),
    "chunk": DecodeVariant("split", chunk_tiles=8),
    "chunk_rev": DecodeVariant("split", chunk_tiles=8, reverse=True),
    "streamk": DecodeVariant("streamk"),
}
DEFAULT_VARIANT = "legacy"


def decode_variant() -> str:
    """The variant ``decode_attention_triton`` uses: ``NANOVLLM_DECODE_VARIANT`` or ``DEFAULT_VARIANT``."""
    name = os.environ.get("NANOVLLM_DECODE_VARIANT") or DEFAULT_VARIANT
    if name not in DECODE_VARIANTS:
        raise ValueError(f"NANOVLLM_DECODE_VARIANT={name!r}: expected one of {sorted(DECODE_VARIANTS)}")
    return name


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_desc, v_desc, block_tables_ptr, context_lens_ptr,
                   out_ptr, part_out_ptr, part_lse_ptr, qk_scale, num_splits,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_btb, stride_cb, stride_ch, stride_ct,
                   NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                   GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
                   CHUNK_TILES: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   PDL: tl.constexpr, TMA: tl.constexpr):
    pdl_begin(PDL)
    kv_head = tl.program_id(0)  # fastest-varying, so programs start in row order (rows come longest first)
    b = tl.program_id(1)
    split = tl.program_id(2)
    if REVERSE:
        split = num_splits - 1 - split
    ctx = tl.load(context_lens_ptr + b)
    if CHUNK_TILES > 0:  # fixed-size chunks: splits past the context have nothing to do (the reduce skips them)
        tiles_per_split = CHUNK_TILES
        if PARTIAL:
            if split * CHUNK_TILES * BLOCK_N >= ctx:
                return
    else:  # legacy: the context cut into num_splits equal parts (empty ones store lse = -inf)
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
        if TMA:  # whole tiles as bulk copies: row (block, head, token) of the cache viewed as [rows, HEAD_DIM]
            block = tl.load(bt_row + start // BLOCK_SIZE)
            row = (block * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + start % BLOCK_SIZE
            m_i, l_i, acc = _softmax_step(q, k_desc.load([row, 0]), v_desc.load([row, 0]), None, m_i, l_i, acc,
                                          qk_scale, False, DOT_PRECISION)
        else:
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
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, context_lens_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                          NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_P: tl.constexpr,
                          CHUNK_TOKENS: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P)
    d = tl.arange(0, HEAD_DIM)
    if CHUNK_TOKENS > 0:  # only the splits that hold tokens were written
        s_mask = s < tl.minimum(tl.cdiv(tl.load(context_lens_ptr + b), CHUNK_TOKENS), num_splits)
    else:
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
    """Default (BLOCK_N, num_warps, num_stages) for the decode kernels.

    Swept on an H100 (benchmarks/attention_kernels.py, Qwen3-0.6B shape, bf16): 64-token tiles with 2 warps reached
    96.7-97.6% of copy bandwidth at bs256 x ctx1k and bs64 x ctx4k and 91-92% at bs8 x ctx16k for KV block sizes
    16/64/256, at or above every other config tried (4 warps lost 10 points at block size 64, bs64 x ctx4k)."""
    if q.dtype == torch.float32:
        return 64, 4, 3
    return 64, 2, 3


def decode_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int, block_n: int,
                      device: torch.device, waves: int = DecodeVariant.waves) -> int:
    """Legacy splits per (sequence, KV head): enough programs to fill ``waves`` x SM count, from static shapes."""
    max_tiles = triton.cdiv(max_blocks * block_size, block_n)
    want = triton.cdiv(waves * _num_sms(device), batch * num_kv_heads)
    return max(1, min(want, triton.cdiv(max_tiles, 4), 64))  # keep >= ~4 tiles of work per split


def decode_chunk_tiles(batch: int, num_kv_heads: int, max_tiles: int, device: torch.device, max_chunk: int = 8,
                       per_sm: int = 16) -> int:
    """Fixed chunk size (in tiles) from static shapes: the largest power of two <= ``max_chunk`` whose grid still
    has ``per_sm`` x SMs programs (so small batches cut contexts finer and still fill the GPU)."""
    chunk = max_chunk
    while chunk > 1 and batch * num_kv_heads * triton.cdiv(max_tiles, chunk) < per_sm * _num_sms(device):
        chunk //= 2
    return chunk


def use_tma(q: torch.Tensor, k_cache: torch.Tensor, block_n: int) -> bool:
    """Whether the split kernel loads whole KV tiles with the tensor memory accelerator (Hopper+, bf16/fp16, a
    contiguous cache whose blocks hold whole tiles); ``NANOVLLM_DECODE_TMA=0`` turns it off."""
    if not q.is_cuda or os.environ.get("NANOVLLM_DECODE_TMA", "1") == "0" or q.dtype == torch.float32:
        return False
    return _hopper_or_newer(q.device) and k_cache.is_contiguous() and k_cache.shape[2] % block_n == 0


def _kv_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int):
    """Host-side TMA descriptors of both caches viewed as [blocks x heads x tokens, head_dim], [block_n, D] boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    head_dim = k_cache.shape[3]
    return tuple(TensorDescriptor.from_tensor(c.view(-1, head_dim), [block_n, head_dim]) for c in (k_cache, v_cache))


def _launch_split(q, k_cache, v_cache, block_tables, context_lens, scale, out, var, block_n, num_warps,
                  num_stages, num_splits, chunk_tiles):
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    max_tiles = triton.cdiv(block_tables.shape[1] * block_size, block_n)
    if var.chunk_tiles:
        chunk_tiles = chunk_tiles or decode_chunk_tiles(batch, num_kv_heads, max_tiles, q.device, var.chunk_tiles)
        num_splits = triton.cdiv(max_tiles, chunk_tiles)
    else:
        chunk_tiles = 0
        num_splits = num_splits or decode_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size,
                                                     block_n, q.device, var.waves)
    if num_splits > 1:
        part_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    group = num_q_heads // num_kv_heads
    tma = use_tma(q, k_cache, block_n)
    k_desc, v_desc = _kv_descriptors(k_cache, v_cache, block_n) if tma else (k_cache, v_cache)
    _decode_kernel[(num_kv_heads, batch, num_splits)](
        q, k_cache, v_cache, k_desc, v_desc, block_tables, context_lens, out, part_out, part_lse, scale * _LOG2E,
        num_splits, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group,
        GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTIAL=num_splits > 1, CHUNK_TILES=chunk_tiles,
        REVERSE=var.reverse, DOT_PRECISION=_dot_precision(q), TMA=tma, num_warps=num_warps, num_stages=num_stages,
        **pdl_launch(q.device))
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part_out, part_lse, context_lens, out, num_splits, out.stride(0), out.stride(1),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, SPLITS_P=triton.next_power_of_2(num_splits),
            CHUNK_TOKENS=chunk_tiles * block_n, num_warps=4, **pdl_launch(q.device))


def decode_attention_configured(q, k_cache, v_cache, block_tables, context_lens, scale, *, variant=None,
                                num_splits=None, chunk_tiles=None, programs_per_sm=None, waves=None,
                                block_n=None, num_warps=None, num_stages=None):
    """``decode_attention_triton`` with the variant and its launch parameters exposed (benchmarks and tests).

    ``variant`` defaults to ``decode_variant()``, or to ``legacy`` when ``num_splits``/``waves`` is given.
    ``num_splits``/``waves`` override the legacy split count, ``chunk_tiles`` the chunk size of the chunk
    variants, ``programs_per_sm`` the streamk grid; all must stay functions of static shapes for graph capture."""
    _check_cache(k_cache, v_cache)
    batch, num_q_heads, head_dim = q.shape
    assert q.stride(2) == 1 and num_q_heads % k_cache.shape[1] == 0
    if variant is None:
        variant = "legacy" if (num_splits or waves) else decode_variant()
    var = DECODE_VARIANTS[variant]
    if waves:
        var = DecodeVariant(var.kind, var.chunk_tiles, var.reverse, waves, var.programs_per_sm)
    cfg_n, cfg_w, cfg_s = _decode_config(q, k_cache.shape[2])
    block_n, num_warps, num_stages = block_n or cfg_n, num_warps or cfg_w, num_stages or cfg_s
    out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if var.kind == "streamk":
        from nanovllm.kernels.triton_decode_streamk import launch_streamk
        launch_streamk(q, k_cache, v_cache, block_tables, context_lens, scale, out, block_n, num_warps, num_stages,
                       programs_per_sm or var.programs_per_sm)
    else:
        _launch_split(q, k_cache, v_cache, block_tables, context_lens, scale, out, var, block_n, num_warps,
                      num_stages, num_splits, chunk_tiles)
    return out


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Paged decode attention: q [B, Hq, D] -> [B, Hq, D] over each row's ``context_lens`` cached tokens."""
    return decode_attention_configured(q, k_cache, v_cache, block_tables, context_lens, scale)
