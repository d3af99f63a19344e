"""Routing and the expert-sorted, block-aligned layout of the fused MoE, in 2-3 Triton launches with static grids.

``route_triton``: one program per chunk of tokens takes the float32 softmax of its router logits, picks the
``top_k`` largest (the lowest expert index among equal ones), renormalises them when asked and writes
``ids``/``weights`` [T, top_k], and how many of its pairs went to each expert, one row per chunk (``hist``
[chunks, E]).  Every id is a valid expert, even for a row of NaN logits (an overflow), so such a
row spoils only its own output.

``align_triton``: each expert's total and its pairs in earlier chunks (the histogram's running sum, ``chunk_scan``,
or up to ``INLINE_SCAN_CHUNKS`` chunks summed in the programs below), then one program per chunk of pairs: the
totals give each expert's group start (counts padded to ``block_m``, an exclusive prefix sum), and a pair's rank
among the chunk's pairs of its expert the rest (for as many experts as pairs or more, by comparing the pairs; else
by a running count per expert, a [pairs, E] tile).  So every pair gets its slot without a sort or an atomic, and
pairs keep their order inside an expert.  The programs also fill the block table (``block_expert``, ``block_rows``)
in strides.  Slots past a block's rows are left unwritten.  ``moe_reference.align_reference`` is that layout in torch.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.moe_reference import num_aligned_blocks
from nanovllm.kernels.pdl import pdl_begin, pdl_launch

_PAIRS_PER_CHUNK = 128  # (token, k) pairs a routing/align program handles, at most
INLINE_SCAN_CHUNKS = 32  # up to this many chunks, each align program sums the histogram itself (no chunk_scan)


@triton.jit
def _route_kernel(logits_ptr, ids_ptr, weights_ptr, hist_ptr, T, E, stride_l, TOP_K: tl.constexpr,
                  RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    pdl_begin(PDL)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = tokens < T
    experts = tl.arange(0, BLOCK_E)
    e_mask = experts < E
    logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * stride_l + experts[None, :],
                     mask=t_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
    logits = tl.where(e_mask[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    p = tl.where(e_mask[None, :], p, -2.0)  # below any probability and below the -1 of a chosen expert
    cols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    hist = tl.zeros([BLOCK_E], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(p, 1)
        idx = tl.min(tl.where(p == best[:, None], experts[None, :], BLOCK_E), 1)
        idx = tl.minimum(idx, E - 1)  # a NaN row matches nothing: keep its ids in range, off other rows' slots
        top_w = tl.where(cols[None, :] == k, best[:, None], top_w)
        top_i = tl.where(cols[None, :] == k, idx[:, None], top_i)
        chosen = experts[None, :] == idx[:, None]
        p = tl.where(chosen, -1.0, p)
        hist += tl.sum((chosen & t_mask[:, None]).to(tl.int32), 0)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 1)[:, None]  # columns past TOP_K hold 0
    out = tokens[:, None].to(tl.int64) * TOP_K + cols[None, :]
    out_mask = t_mask[:, None] & (cols[None, :] < TOP_K)
    tl.store(ids_ptr + out, top_i, mask=out_mask)
    tl.store(weights_ptr + out, top_w, mask=out_mask)
    tl.store(hist_ptr + pid * E + experts, hist, mask=e_mask)


@triton.jit
def _chunk_scan_kernel(hist_ptr, inclusive_ptr, C, E, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
                       PDL: tl.constexpr):
    """The running sum of ``hist`` [C, E] (contiguous) over its C chunks, for ``BLOCK_E`` experts."""
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = experts < E
    pdl_begin(PDL)
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        mask = (rows < C)[:, None] & e_mask[None, :]
        offs = rows[:, None].to(tl.int64) * E + experts[None, :]
        h = tl.load(hist_ptr + offs, mask=mask, other=0)
        tl.store(inclusive_ptr + offs, tl.cumsum(h, 0) + carry[None, :], mask=mask)
        carry += tl.sum(h, 0)


def chunk_scan(hist: torch.Tensor) -> torch.Tensor:
    """``hist.cumsum(0)`` of an int32 [chunks, E] histogram, as int32."""
    chunks, num_experts = hist.shape
    inclusive = torch.empty_like(hist)
    block_e = 16
    _chunk_scan_kernel[(triton.cdiv(num_experts, block_e),)](hist, inclusive, chunks, num_experts, BLOCK_C=64,
                                                             BLOCK_E=block_e, **pdl_launch(hist.device))
    return inclusive


@triton.jit
def _align_kernel(ids_ptr, hist_ptr, inclusive_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, N, E, NUM_CHUNKS,
                  NUM_BLOCKS, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, INLINE_SCAN: tl.constexpr, PDL: tl.constexpr):
    c = tl.program_id(0)
    pdl_begin(PDL)
    experts = tl.arange(0, BLOCK_E)
    e_mask = experts < E
    # every expert's total and its pairs in chunks before this one: summed here from the whole histogram (few
    # chunks: INLINE_SCAN, a power of 2 >= NUM_CHUNKS) or read from its running sum (the last row; this chunk's row
    # minus the chunk's own counts)
    if INLINE_SCAN > 0:
        rows = tl.arange(0, INLINE_SCAN)
        h = tl.load(hist_ptr + rows[:, None] * E + experts[None, :],
                    mask=(rows < NUM_CHUNKS)[:, None] & e_mask[None, :], other=0)
        total = tl.sum(h, 0)
        before = tl.sum(tl.where((rows < c)[:, None], h, 0), 0)
    else:
        total = tl.load(inclusive_ptr + (NUM_CHUNKS - 1) * E + experts, mask=e_mask, other=0)
        before = tl.load(inclusive_ptr + c * E + experts, mask=e_mask, other=0) \
            - tl.load(hist_ptr + c * E + experts, mask=e_mask, other=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded

    offs = tl.arange(0, BLOCK_P)
    pairs = c * CHUNK + offs
    p_mask = (offs < CHUNK) & (pairs < N)
    e = tl.load(ids_ptr + pairs, mask=p_mask, other=0)
    if BLOCK_E >= BLOCK_P:  # many experts: a pair's rank from its earlier pairs ([P, P]), its base gathered
        same = (e[:, None] == e[None, :]) & (offs[None, :] < offs[:, None]) & p_mask[None, :]
        rank = tl.sum(same.to(tl.int32), 1)
        base = tl.gather(start + before, e, 0)
    else:  # few: a running count per expert ([P, E])
        onehot = ((e[:, None] == experts[None, :]) & p_mask[:, None]).to(tl.int32)
        rank = tl.sum(tl.where(onehot != 0, tl.cumsum(onehot, 0) - 1, 0), 1)  # earlier pairs of this chunk
        base = tl.sum(tl.where(onehot != 0, (start + before)[None, :], 0), 1)
    tl.store(sorted_ptr + (base + rank).to(tl.int64), pairs, mask=p_mask)

    for b0 in range(c * BLOCK_B, NUM_BLOCKS, NUM_CHUNKS * BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        row0 = blocks * BLOCK_M
        # the first expert whose group ends past row0: the number of (real) experts that end at or before it
        expert = tl.sum(((end[None, :] <= row0[:, None]) & e_mask[None, :]).to(tl.int32), 1)
        picked = experts[None, :] == expert[:, None]  # all false past the last expert
        first = tl.sum(tl.where(picked, start[None, :], 0), 1)
        count = tl.sum(tl.where(picked, total[None, :], 0), 1)
        block_rows = tl.minimum(tl.maximum(first + count - row0, 0), BLOCK_M)
        b_mask = blocks < NUM_BLOCKS
        tl.store(block_expert_ptr + blocks, tl.where(expert < E, expert, 0), mask=b_mask)
        tl.store(block_rows_ptr + blocks, block_rows, mask=b_mask)


def _tokens_per_chunk(top_k: int) -> int:
    return max(1, triton.next_power_of_2(_PAIRS_PER_CHUNK // top_k + 1) // 2)  # a power of 2, times top_k <= 128


def route_triton(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """(weights float32 [T, top_k], ids int32 [T, top_k], hist int32 [chunks, E]); see the docstring."""
    num_tokens, num_experts = router_logits.shape
    assert router_logits.stride(1) == 1 and 1 <= top_k <= num_experts
    dev = router_logits.device
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=dev)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=dev)
    block_t = _tokens_per_chunk(top_k)
    chunks = triton.cdiv(num_tokens, block_t)
    hist = torch.empty(chunks, num_experts, dtype=torch.int32, device=dev)
    if num_tokens:
        _route_kernel[(chunks,)](router_logits, ids, weights, hist, num_tokens, num_experts,
                                 router_logits.stride(0), TOP_K=top_k, RENORMALIZE=renormalize,
                                 BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(num_experts),
                                 BLOCK_K=triton.next_power_of_2(top_k), **pdl_launch(dev))
    return weights, ids, hist


def chunk_histogram(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``route_triton``'s ``hist`` for ids routed elsewhere (an expert cache's slot ids): int32 [chunks, E], the
    pairs of each chunk of ``_tokens_per_chunk`` tokens per expert, in torch ops of static shape."""
    num_tokens, top_k = ids.shape
    block_t = _tokens_per_chunk(top_k)
    chunks = triton.cdiv(num_tokens, block_t)
    padded = torch.nn.functional.pad(ids.long(), (0, 0, 0, chunks * block_t - num_tokens), value=num_experts)
    counts = torch.nn.functional.one_hot(padded.view(chunks, -1), num_experts + 1)[..., :num_experts].sum(1)
    return counts.to(torch.int32).contiguous()


def routed_elsewhere(weights: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """Routing done elsewhere (an expert cache's slot ``ids`` [T, top_k], their ``weights``) in ``route_triton``'s
    form: (weights float32, ids int32, hist), contiguous."""
    return weights.float().contiguous(), ids.to(torch.int32).contiguous(), chunk_histogram(ids, num_experts)


def align_triton(ids: torch.Tensor, hist: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_ids, block_expert, block_rows) of ``route_triton``'s ids and histogram (``align_reference``'s
    layout; padding slots of ``sorted_ids`` are left unwritten)."""
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    num_blocks = num_aligned_blocks(num_pairs, num_experts, block_m)
    dev = ids.device
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    block_rows = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    chunk = _tokens_per_chunk(top_k) * top_k
    chunks = hist.shape[0]
    assert chunks == triton.cdiv(num_tokens, chunk // top_k), "hist must come from route_triton of these ids"
    if num_pairs:
        hist = hist.contiguous()  # both kernels index it as [chunks, E] rows
        inline = chunks <= INLINE_SCAN_CHUNKS
        inclusive = hist if inline else chunk_scan(hist)
        _align_kernel[(chunks,)](ids, hist, inclusive, sorted_ids, block_expert, block_rows, num_pairs, num_experts,
                                 chunks, num_blocks, CHUNK=chunk, BLOCK_P=triton.next_power_of_2(chunk),
                                 BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_B=64, BLOCK_M=block_m,
                                 INLINE_SCAN=triton.next_power_of_2(chunks) if inline else 0, num_warps=8,
                                 **pdl_launch(dev))  # a [128, E] running count or [128, 128] comparison
    return sorted_ids, block_expert, block_rows
