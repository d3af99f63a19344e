"""W8A8 FP8 experts in the fused MoE (``triton_moe.py`` lays the pairs out and calls ``w8a8_experts``): e4m3
activations times e4m3 weights on the tensor cores, accumulated in float32, with the scales applied to each K tile's
product (the activation's per row, the weight's per row and group) or, for a weight with one scale per row, once
after the K loop.  The activation rounding is ``act_quant.py``'s (groups of 128 columns, a K tile each):

* ``_quantize_rows_kernel``: x [T, H] -> e4m3 [T, H] and scales [T, ceil(H / 128)], one pass before the up GEMM;
* ``_w8a8_up_kernel``: a block of pairs times an expert's gate and up tiles of 128 columns, then ``silu(gate) * up``
  quantized in registers, so the intermediate is written once, as e4m3 with a scale per row (its tile is one
  group);
* ``_w8a8_down_kernel``: the intermediate times the expert's ``w2`` tile, scaled by the router weight.

Blocks of fewer than 64 rows swap the operands unless ``MoeConfig.swap`` says otherwise (the weight tile is the
MMA's M side: a tensor-core MMA is at least 64 rows tall), accumulating [N, M] (``triton_moe_tiles.py``).  Under
the Triton interpreter (``DOT_PRECISION`` "upcast") the e4m3 operands are widened to float32 first; the products
are the same.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.act_quant import ACT_GROUP
from nanovllm.kernels.pdl import pdl_begin
from nanovllm.kernels.triton_common import _quantize_fp8
from nanovllm.kernels.triton_moe_tiles import (_block, _halves, _k_columns, _oriented, _per_n, _product,
                                                _store_weighted, _zeros)

QUANTIZE_ROWS = 16  # rows per program of the activation's quantize pass
SWAP_BELOW = 64  # MoeConfig.swap None: blocks of fewer rows swap the operands


@triton.jit
def _row_scales(t):
    """Per row of ``t`` [M, N] (float32): the scale of ``act_quant``'s rule (largest magnitude / 448, 1 for zeros)."""
    amax = tl.max(tl.abs(t), axis=1)
    return tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, T, K, stride_x, stride_q, stride_s, BLOCK_T: tl.constexpr,
                          BLOCK: tl.constexpr):
    """``BLOCK_T`` rows of one group of ``BLOCK`` columns: rounded to e4m3 with a scale per row."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.program_id(1)
    offs = g * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < T
    rows = rows.to(tl.int64)
    mask = row_mask[:, None] & (offs < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _row_scales(x)
    tl.store(q_ptr + rows[:, None] * stride_q + offs[None, :], _quantize_fp8(x, scale[:, None]), mask=mask)
    tl.store(s_ptr + rows * stride_s + g, scale, mask=row_mask)


@triton.jit
def _scaled_dot(acc, a, a_scale, w, scale_rows, k0, n_mask, stride_sg, GROUP: tl.constexpr,
                ONE_GROUP: tl.constexpr, SWAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc`` plus e4m3 ``a`` [M, K] times the e4m3 tile ``w`` [N, K] transposed (``SWAP``'s orientation,
    ``triton_moe_tiles._product``), scaled by ``a_scale`` [M] and, unless ``ONE_GROUP`` (then ``_w8a8_finish``), by
    the rows' scales of the weight group holding column ``k0``."""
    # e4m3 operands: tl.dot's default mode on the GPU ("tf32" has no say below fp32); "upcast" widens them first
    part = _product(a, w, "upcast" if DOT_PRECISION == "upcast" else "tf32", SWAP)
    if SWAP:
        part = part * a_scale[None, :]
    else:
        part = part * a_scale[:, None]
    if not ONE_GROUP:
        part = part * _per_n(tl.load(scale_rows + (k0 // GROUP) * stride_sg, mask=n_mask, other=0.0), SWAP)
    return acc + part


@triton.jit
def _w8a8_finish(acc, scale_rows, n_mask, ONE_GROUP: tl.constexpr, SWAP: tl.constexpr):
    """The sum of ``_scaled_dot``'s products, with the rows' one weight scale where ``ONE_GROUP``."""
    if ONE_GROUP:
        acc = acc * _per_n(tl.load(scale_rows, mask=n_mask, other=0.0), SWAP)
    return acc


@triton.jit
def _w8a8_up_kernel(xq_ptr, xs_ptr, w13_ptr, scale_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, inter_ptr,
                    inter_s_ptr, I, H, stride_x, stride_xs, stride_we, stride_wn, stride_se, stride_sn, stride_sg,
                    stride_i, stride_is, TOP_K: tl.constexpr, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr,
                    SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pdl_begin(PDL)
    rows = tl.load(block_rows_ptr + pid_b)
    if rows == 0:
        return
    expert, m_mask, slots, pairs = _block(pid_b, rows, block_expert_ptr, sorted_ptr, BLOCK_M)
    tokens = pairs // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    gate_rows, up_rows = _halves(w13_ptr, expert, offs_n, I, stride_we, stride_wn)
    gate_scales, up_scales = _halves(scale_ptr, expert, offs_n, I, stride_se, stride_sn)
    acc_gate = _zeros(BLOCK_M, BLOCK_N, SWAP)
    acc_up = _zeros(BLOCK_M, BLOCK_N, SWAP)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H
        a = tl.load(xq_ptr + tokens[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        a_scale = tl.load(xs_ptr + tokens * stride_xs + k0 // BLOCK_K, mask=m_mask, other=0.0)
        w_mask = n_mask[:, None] & k_mask[None, :]
        gate = tl.load(gate_rows[:, None] + offs_k[None, :], mask=w_mask, other=0.0)
        up = tl.load(up_rows[:, None] + offs_k[None, :], mask=w_mask, other=0.0)
        acc_gate = _scaled_dot(acc_gate, a, a_scale, gate, gate_scales, k0, n_mask, stride_sg, GROUP, ONE_GROUP,
                               SWAP, DOT_PRECISION)
        acc_up = _scaled_dot(acc_up, a, a_scale, up, up_scales, k0, n_mask, stride_sg, GROUP, ONE_GROUP, SWAP,
                             DOT_PRECISION)
    acc_gate = _w8a8_finish(acc_gate, gate_scales, n_mask, ONE_GROUP, SWAP)
    acc_up = _w8a8_finish(acc_up, up_scales, n_mask, ONE_GROUP, SWAP)
    h = _oriented(acc_gate * tl.sigmoid(acc_gate) * acc_up, SWAP)  # columns past I are 0: their weights read as 0
    scale = _row_scales(h)
    tl.store(inter_ptr + slots[:, None] * stride_i + offs_n[None, :], _quantize_fp8(h, scale[:, None]),
             mask=m_mask[:, None] & n_mask[None, :])
    tl.store(inter_s_ptr + slots * stride_is + pid_n, scale, mask=m_mask)


@triton.jit
def _w8a8_down_kernel(inter_ptr, inter_s_ptr, w2_ptr, scale_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr,
                      weights_ptr, out_ptr, I, H, stride_i, stride_is, stride_we, stride_wn, stride_wk, stride_se,
                      stride_sn, stride_sg, stride_o, W2_STRIDED_K: tl.constexpr, GROUP: tl.constexpr,
                      ONE_GROUP: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pdl_begin(PDL)
    rows = tl.load(block_rows_ptr + pid_b)
    if rows == 0:
        return
    expert, m_mask, slots, pairs = _block(pid_b, rows, block_expert_ptr, sorted_ptr, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    w_rows = w2_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    scales = scale_ptr + expert * stride_se + offs_n.to(tl.int64) * stride_sn
    acc = _zeros(BLOCK_M, BLOCK_N, SWAP)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < I
        a = tl.load(inter_ptr + slots[:, None] * stride_i + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        a_scale = tl.load(inter_s_ptr + slots * stride_is + k0 // BLOCK_K, mask=m_mask, other=0.0)
        w = tl.load(_k_columns(w_rows, offs_k, stride_wk, W2_STRIDED_K), mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc = _scaled_dot(acc, a, a_scale, w, scales, k0, n_mask, stride_sg, GROUP, ONE_GROUP, SWAP, DOT_PRECISION)
    acc = _oriented(_w8a8_finish(acc, scales, n_mask, ONE_GROUP, SWAP), SWAP)
    _store_weighted(acc, weights_ptr, pairs, m_mask, out_ptr, stride_o, offs_n, n_mask, False)  # float32 (twin)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``act_quant.quantize`` of x [T, K] on the GPU: (e4m3 [T, K], float32 scales [T, ceil(K / 128)])."""
    rows, k = x.shape
    groups = triton.cdiv(k, ACT_GROUP)
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(triton.cdiv(rows, QUANTIZE_ROWS), groups)](x, q, s, rows, k, x.stride(0), q.stride(0),
                                                                          s.stride(0), BLOCK_T=QUANTIZE_ROWS,
                                                                          BLOCK=ACT_GROUP)
    return q, s


def w8a8_experts(x, layout, weights, w13, w2, w13_scale, w2_scale, group: int, cfg, top_k: int,
                 args: dict) -> torch.Tensor:
    """The experts of routed pairs in W8A8 -> per-pair rows [T * top_k, H] in x's dtype.  ``layout``:
    ``align_triton``'s (sorted ids, block experts, block rows) at ``cfg.block_m``; ``cfg.down_tiles`` the down
    GEMM's; ``args``: the launch keywords both share (``DOT_PRECISION``, PDL)."""
    num_tokens, hidden = x.shape
    inter_size = w13.shape[1] // 2
    sorted_ids, block_expert, block_rows = layout
    num_blocks = block_expert.shape[0]
    xq, xs = quantize_rows(x)
    slots = num_blocks * cfg.block_m
    inter = torch.empty(slots, inter_size, dtype=torch.float8_e4m3fn, device=x.device)
    inter_s = torch.empty(slots, triton.cdiv(inter_size, ACT_GROUP), dtype=torch.float32, device=x.device)
    down = cfg.down_tiles
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_K=ACT_GROUP, GROUP=group, **args)
    _w8a8_up_kernel[(num_blocks, triton.cdiv(inter_size, ACT_GROUP))](
        xq, xs, w13, w13_scale, sorted_ids, block_expert, block_rows, inter, inter_s, inter_size, hidden,
        xq.stride(0), xs.stride(0), w13.stride(0), w13.stride(1), *w13_scale.stride(), inter.stride(0),
        inter_s.stride(0), TOP_K=top_k, ONE_GROUP=group >= hidden, BLOCK_N=ACT_GROUP, **cfg.launch(SWAP_BELOW),
        **tiles)
    per_pair = x.new_empty(num_tokens * top_k, hidden)
    _w8a8_down_kernel[(num_blocks, triton.cdiv(hidden, down.block_n))](
        inter, inter_s, w2, w2_scale, sorted_ids, block_expert, block_rows, weights, per_pair, inter_size, hidden,
        inter.stride(0), inter_s.stride(0), *w2.stride(), *w2_scale.stride(), per_pair.stride(0),
        W2_STRIDED_K=w2.stride(2) != 1, ONE_GROUP=group >= inter_size, BLOCK_N=down.block_n,
        **down.launch(SWAP_BELOW), **tiles)
    return per_pair
