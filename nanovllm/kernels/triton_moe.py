"""The fused MoE on CUDA: routing, the experts' gate/up GEMM with the optional bias and the activation fused, the down
GEMM with its optional bias and the router weight, then the sum over each token's top-k; static shapes and grids
(no host sync, so a step replays in a CUDA graph).  The contract is ``moe_reference.py``'s.

The (token, k) pairs are sorted by expert into blocks of ``block_m`` rows (``triton_moe_align.py``;
``moe_configs.py`` picks the tiles). A program of ``_grouped_up_kernel`` takes one block and one column tile: it
gathers the block's token rows of x (``pair // top_k``) and writes the activation (e.g. ``silu(gate) * up``) to the
block's rows of the intermediate ``[slots, I]``; ``_grouped_down_kernel`` multiplies those by the expert's ``w2``
tile, adds its bias, scales each row by its router weight and writes the pair's row of ``[P, H]``, summed over top-k
into ``[T, H]``. Empty blocks return at once; int64 offsets, float32 sums, outputs in x's dtype. ``w2`` may be a
transposed view (an expert cache's). FP8 experts that ``act_quant.moe_w8a8`` takes run W8A8 (``triton_moe_w8a8.py``);
other FP8, int4 (uint8 ``w13``/``w2``, fp16 scales, uint8 zeros) and MXFP4 experts (uint8 codes, e8m0 scales) are
weight-only, through ``triton_moe_tiles.py`` (``moe_configs.group_block_k``; MXFP4: ``triton_mxfp4.py``), or, past
``moe_configs.int4_dequantize_once``'s rows per expert, dequantized once a step. bf16 experts at many rows per expert
(prefill) run as two grouped GEMMs (``grouped_moe.py``).
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels import mxfp4_quant
from nanovllm.kernels.act_quant import moe_w8a8
from nanovllm.kernels.grouped_moe import experts_grouped, grouped_usable
from nanovllm.kernels.moe_configs import MoeConfig, choose, group_block_k, int4_dequantize_once, tuned
from nanovllm.kernels.pdl import pdl_begin, pdl_launch
from nanovllm.kernels.triton_common import _dot_precision, device_capability
from nanovllm.kernels.triton_moe_tiles import (ACTIVATION_CODES, _activate, _block, _finish, _halves, _int4_tile,
                                                _k_columns, _oriented, _per_n, _store_weighted, _weight_dot, _zeros)
from nanovllm.kernels.triton_mxfp4 import _mxfp4_tile, dequantize_mxfp4_triton
from nanovllm.kernels.triton_moe_align import align_triton, route_triton, routed_elsewhere
from nanovllm.kernels.triton_moe_w8a8 import w8a8_experts
from nanovllm.kernels.triton_w4a16 import dequantize_int4_triton


@triton.jit
def _grouped_up_kernel(x_ptr, w13_ptr, scale_ptr, zero_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, inter_ptr,
                       bias_ptr, I, H, stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_sg, stride_ze,
                       stride_zn, stride_zg, stride_i, stride_be, alpha, limit, HAS_BIAS: tl.constexpr,
                       ACTIVATION: tl.constexpr, TOP_K: tl.constexpr, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr,
                       FP16_MMA: tl.constexpr, INT4: tl.constexpr, MXFP4: tl.constexpr, SWAP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       PDL: tl.constexpr):
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
    gate_rows, up_rows = gate_rows[:, None], up_rows[:, None]
    gate_scales, up_scales = _halves(scale_ptr, expert, offs_n, I, stride_se, stride_sn)
    gate_zeros, up_zeros = _halves(zero_ptr, expert, offs_n, I, stride_ze, stride_zn)
    acc_gate = _zeros(BLOCK_M, BLOCK_N, SWAP)
    acc_up = _zeros(BLOCK_M, BLOCK_N, SWAP)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H
        a = tl.load(x_ptr + tokens[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if FP16_MMA:  # scaled by 2^-4 into fp16: in range to 1e6, exact from 2^-10 (_finish multiplies it back)
            a = (a.to(tl.float32) * 0.0625).to(tl.float16)
        if INT4:
            gate = _int4_tile(gate_rows, k0, H, n_mask, 1, gate_zeros, stride_zg, a, GROUP, False, BLOCK_N,
                              BLOCK_K, DOT_PRECISION != "upcast")
            up = _int4_tile(up_rows, k0, H, n_mask, 1, up_zeros, stride_zg, a, GROUP, False, BLOCK_N, BLOCK_K,
                            DOT_PRECISION != "upcast")
        elif MXFP4:
            gate = _mxfp4_tile(gate_rows, k0, H, n_mask, gate_scales, stride_sg, a, DOT_PRECISION != "upcast", BLOCK_N,
                               BLOCK_K)
            up = _mxfp4_tile(up_rows, k0, H, n_mask, up_scales, stride_sg, a, DOT_PRECISION != "upcast", BLOCK_N,
                             BLOCK_K)
        else:
            w_mask = n_mask[:, None] & k_mask[None, :]
            gate = tl.load(gate_rows + offs_k[None, :], mask=w_mask, other=0.0)
            up = tl.load(up_rows + offs_k[None, :], mask=w_mask, other=0.0)
        acc_gate = _weight_dot(acc_gate, a, gate, gate_scales, k0, n_mask, stride_sg, GROUP, ONE_GROUP, FP16_MMA,
                               INT4, DOT_PRECISION, SWAP)
        acc_up = _weight_dot(acc_up, a, up, up_scales, k0, n_mask, stride_sg, GROUP, ONE_GROUP, FP16_MMA, INT4,
                             DOT_PRECISION, SWAP)
    acc_gate = _finish(acc_gate, gate_scales, n_mask, GROUP, ONE_GROUP, FP16_MMA, SWAP)
    acc_up = _finish(acc_up, up_scales, n_mask, GROUP, ONE_GROUP, FP16_MMA, SWAP)
    if HAS_BIAS:
        gate_bias, up_bias = _halves(bias_ptr, expert, offs_n, I, stride_be, 1)
        acc_gate += _per_n(tl.load(gate_bias, mask=n_mask, other=0.0).to(tl.float32), SWAP)
        acc_up += _per_n(tl.load(up_bias, mask=n_mask, other=0.0).to(tl.float32), SWAP)
    h = _oriented(_activate(acc_gate, acc_up, alpha, limit, ACTIVATION), SWAP)
    tl.store(inter_ptr + slots[:, None] * stride_i + offs_n[None, :], h.to(inter_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _grouped_down_kernel(inter_ptr, w2_ptr, scale_ptr, zero_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr,
                         weights_ptr, out_ptr, bias_ptr, I, H, stride_i, stride_we, stride_wn, stride_wk, stride_se,
                         stride_sn, stride_sg, stride_ze, stride_zn, stride_zg, stride_o, stride_be,
                         HAS_BIAS: tl.constexpr, W2_STRIDED_K: tl.constexpr, ROUND_WEIGHTS: tl.constexpr,
                         GROUP: tl.constexpr, ONE_GROUP: tl.constexpr, FP16_MMA: tl.constexpr, INT4: tl.constexpr,
                         MXFP4: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    zeros = zero_ptr + expert * stride_ze + offs_n.to(tl.int64) * stride_zn
    acc = _zeros(BLOCK_M, BLOCK_N, SWAP)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < I
        a = tl.load(inter_ptr + slots[:, None] * stride_i + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if FP16_MMA:  # scaled by 2^-4 into fp16: in range to 1e6, exact from 2^-10 (_finish multiplies it back)
            a = (a.to(tl.float32) * 0.0625).to(tl.float16)
        if INT4:
            w = _int4_tile(w_rows, k0, I, n_mask, stride_wk, zeros, stride_zg, a, GROUP, W2_STRIDED_K, BLOCK_N,
                           BLOCK_K, DOT_PRECISION != "upcast")
        elif MXFP4:  # w2 as stored (an expert cache's transposed view holds no MXFP4)
            w = _mxfp4_tile(w_rows, k0, I, n_mask, scales, stride_sg, a, DOT_PRECISION != "upcast", BLOCK_N,
                            BLOCK_K)
        else:
            w = tl.load(_k_columns(w_rows, offs_k, stride_wk, W2_STRIDED_K), mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0)
        acc = _weight_dot(acc, a, w, scales, k0, n_mask, stride_sg, GROUP, ONE_GROUP, FP16_MMA, INT4, DOT_PRECISION,
                          SWAP)
    acc = _oriented(_finish(acc, scales, n_mask, GROUP, ONE_GROUP, FP16_MMA, SWAP), SWAP)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _store_weighted(acc, weights_ptr, pairs, m_mask, out_ptr, stride_o, offs_n, n_mask, ROUND_WEIGHTS)


def _group_args(w: torch.Tensor, t: torch.Tensor | None, group: int, k: int, dtype: torch.dtype) -> tuple:
    """(a per-group tensor of the weight [E, N, k columns] ``w``, its three strides), checked; placeholders
    (w, zeros) where ``t`` is None."""
    if t is None:
        return w, 0, 0, 0
    assert t.dtype == dtype and t.shape == (*w.shape[:2], -(-k // group)), \
        f"{t.dtype} {tuple(t.shape)}: {dtype} [{w.shape[0]}, {w.shape[1]}, ceil({k} / {group})] expected"
    return t, *t.stride()


def _bias_arg(bias: torch.Tensor | None, w13: torch.Tensor, width: int) -> torch.Tensor:
    """An expert bias [E, ``width``] for the kernels (checked, contiguous rows), or a placeholder where None."""
    if bias is None:
        return w13
    assert bias.shape == (w13.shape[0], width) and bias.stride(1) == 1, f"bias {tuple(bias.shape)} [E, {width}]"
    return bias


def _dequantized(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, dtype) -> torch.Tensor:
    """Int4 (with ``zero``) or MXFP4 experts [E, N, K // 2] -> [E, N, K] in ``dtype``: the twin's values."""
    e, n, half_k = w.shape
    rows, scales = w.reshape(e * n, half_k), scale.reshape(e * n, -1)
    flat = dequantize_mxfp4_triton(rows, scales, dtype) if zero is None else \
        dequantize_int4_triton(rows, scales, zero.reshape(e * n, -1), group, dtype)
    return flat.view(e, n, 2 * half_k)


def _entry(x: torch.Tensor, w13: torch.Tensor) -> dict:
    """The measured tile table's entry for these experts on x's GPU (``moe_configs.tuned``; none off the GPU)."""
    arch = "%d.%d" % device_capability(x.device) if x.is_cuda else None
    return tuned(arch, w13.shape[0], w13.shape[1] // 2, x.shape[1])


def dequantized_once(x: torch.Tensor, top_k: int, w13: torch.Tensor, w2: torch.Tensor,
                     w13_scale: torch.Tensor | None, w13_zero: torch.Tensor | None) -> bool:
    """Whether int4 or MXFP4 experts are dequantized first at this step and run by the bf16 kernels
    (``moe_configs.int4_dequantize_once``; never for a transposed ``w2``)."""
    low_bit = w13_zero is not None or mxfp4_quant.is_mxfp4(w13, w13_scale, w13_zero)
    return low_bit and w2.stride(2) == 1 and int4_dequantize_once(x.shape[0], top_k, w13.shape[0], _entry(x, w13))


def moe_plan(x: torch.Tensor, top_k: int, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
             w13_zero: torch.Tensor | None, group: int, once: bool | None) -> tuple[MoeConfig, bool]:
    """(the tiles, whether int4 or MXFP4 experts are dequantized once) of a step: ``once`` None asks
    ``dequantized_once``, then the tiles of the mode that runs."""
    mxfp4 = mxfp4_quant.is_mxfp4(w13, w13_scale, w13_zero)  # dequantized tile by tile: tiles of their own
    mode = "int4" if w13_zero is not None else "mxfp4" if mxfp4 else "bf16" if w13_scale is None else \
        "w8a8" if moe_w8a8(w13, w13_scale, w13_zero, group) else "fp8"
    if once is None:
        once = dequantized_once(x, top_k, w13, w2, w13_scale, w13_zero)
    return choose(x.shape[0], top_k, w13.shape[0], "bf16" if once else mode, _entry(x, w13)), once


def experts_triton(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, hist: torch.Tensor,
                   w13: torch.Tensor, w2: torch.Tensor, cfg: MoeConfig, w13_scale: torch.Tensor | None = None,
                   w2_scale: torch.Tensor | None = None, group: int = 0, w13_zero: torch.Tensor | None = None,
                   w2_zero: torch.Tensor | None = None, once: bool = False, w13_bias: torch.Tensor | None = None,
                   w2_bias: torch.Tensor | None = None, activation: str = "silu", swiglu_alpha: float = 1.702,
                   swiglu_limit: float = 7.0, round_weights: bool = False, grouped: bool = True) -> torch.Tensor:
    """The experts' part of the op for routed tokens (``route_triton``'s ``weights``, ``ids`` and ``hist``)
    -> [T, H] in x's dtype.  FP8 experts come with their scales and ``group``, int4 ones (uint8 ``w13``/``w2``)
    with their scales, zeros and ``group`` (``group_supported`` must hold); ``once``: int4 or MXFP4 experts are
    dequantized first and run by the bf16 kernels (``w2`` not transposed).  Biases and ``activation`` as the op's
    (not with W8A8 experts: the CUDA dispatch sends those to the twin); ``round_weights`` as the op's; ``grouped``: bf16
    experts may run as grouped GEMMs where ``grouped_moe.grouped_usable`` says (else always ``cfg``'s tiles)."""
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    num_experts, two_i, _ = w13.shape
    inter_size = two_i // 2
    int4 = w13_zero is not None
    mxfp4 = mxfp4_quant.is_mxfp4(w13, w13_scale, w13_zero)
    per_byte = 2 if int4 or mxfp4 else 1  # columns a stored element holds
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w13.shape[2] * per_byte == hidden
    assert w2.shape == (num_experts, hidden, inter_size // per_byte), f"w2 {tuple(w2.shape)} for I={inter_size}"
    assert not int4 or (w13.dtype == w2.dtype == torch.uint8 and w2_zero is not None), "int4: uint8 w13, w2, zeros"
    assert not mxfp4 or (w2.dtype == torch.uint8 and w2.stride(2) == 1), "MXFP4: uint8 w2 as stored"
    dev = x.device
    if num_tokens == 0:
        return torch.zeros_like(x)
    epilogue = dict(w13_bias=w13_bias, w2_bias=w2_bias, activation=activation, swiglu_alpha=swiglu_alpha,
                    swiglu_limit=swiglu_limit, round_weights=round_weights)
    if moe_w8a8(w13, w13_scale, w13_zero, group):
        assert w13_bias is None and w2_bias is None and activation == "silu", "W8A8 experts: SiLU, no biases"
        args = dict(DOT_PRECISION=_dot_precision(x), **pdl_launch(dev))
        layout = align_triton(ids, hist, num_experts, cfg.block_m)
        s13 = _group_args(w13, w13_scale, group, hidden, torch.float32)
        s2 = _group_args(w2, w2_scale, group, inter_size, torch.float32)
        per_pair = w8a8_experts(x, layout, weights, w13, w2, s13[0], s2[0], group, cfg, top_k, args)
        return per_pair.view(num_tokens, top_k, hidden).sum(dim=1)
    if (int4 or mxfp4) and once:
        w13 = _dequantized(w13, w13_scale, w13_zero, group, x.dtype)
        w2 = _dequantized(w2, w2_scale, w2_zero, group, x.dtype)
        return experts_triton(x, weights, ids, hist, w13, w2, cfg, **epilogue, grouped=grouped)
    if grouped and grouped_usable(x, top_k, w13, w2, w13_bias is not None or w2_bias is not None):
        return experts_grouped(x, weights, ids, hist, w13, w2, activation, swiglu_alpha, swiglu_limit, round_weights)
    quantized = w13_scale is not None and not mxfp4  # MXFP4 tiles are dequantized whole: no group constraint
    group = group if quantized else 0
    down = cfg.down_tiles
    up_k = group_block_k(cfg.block_k, group, hidden) if quantized else cfg.block_k
    down_k = group_block_k(down.block_k, group, inter_size) if quantized else down.block_k
    assert up_k and down_k, f"no K tile fits group {group} (group_supported)"
    fp16_mma = quantized and not int4 and x.dtype == torch.bfloat16
    scale_dtype = torch.float16 if int4 else torch.uint8 if mxfp4 else torch.float32
    scale_group = mxfp4_quant.BLOCK if mxfp4 else group
    args = dict(FP16_MMA=fp16_mma, INT4=int4, MXFP4=mxfp4, BLOCK_M=cfg.block_m, GROUP=group,
                DOT_PRECISION=_dot_precision(x), **pdl_launch(dev))
    sorted_ids, block_expert, block_rows = align_triton(ids, hist, num_experts, cfg.block_m)
    num_blocks = block_expert.shape[0]
    inter = x.new_empty(num_blocks * cfg.block_m, inter_size)
    # Block index runs fastest in the grid, so the programs that read one expert tile run together and share it
    # through L2.
    s13 = _group_args(w13, w13_scale, scale_group, hidden, scale_dtype)
    z13 = _group_args(w13, w13_zero, group, hidden, torch.uint8)
    b13, b2 = _bias_arg(w13_bias, w13, 2 * inter_size), _bias_arg(w2_bias, w13, hidden)
    _grouped_up_kernel[(num_blocks, triton.cdiv(inter_size, cfg.block_n))](
        x, w13, s13[0], z13[0], sorted_ids, block_expert, block_rows, inter, b13, inter_size, hidden, x.stride(0),
        w13.stride(0), w13.stride(1), *s13[1:], *z13[1:], inter.stride(0), b13.stride(0), float(swiglu_alpha),
        float(swiglu_limit), HAS_BIAS=w13_bias is not None, ACTIVATION=ACTIVATION_CODES[activation], TOP_K=top_k,
        ONE_GROUP=group >= hidden, BLOCK_K=up_k, BLOCK_N=cfg.block_n, **cfg.launch(), **args)
    per_pair = x.new_empty(num_tokens * top_k, hidden)
    s2 = _group_args(w2, w2_scale, scale_group, inter_size, scale_dtype)
    z2 = _group_args(w2, w2_zero, group, inter_size, torch.uint8)
    _grouped_down_kernel[(num_blocks, triton.cdiv(hidden, down.block_n))](
        inter, w2, s2[0], z2[0], sorted_ids, block_expert, block_rows, weights, per_pair, b2, inter_size, hidden,
        inter.stride(0), *w2.stride(), *s2[1:], *z2[1:], per_pair.stride(0), b2.stride(0),
        HAS_BIAS=w2_bias is not None, W2_STRIDED_K=w2.stride(2) != 1, ROUND_WEIGHTS=bool(round_weights),
        ONE_GROUP=group >= inter_size, BLOCK_K=down_k, BLOCK_N=down.block_n, **down.launch(),
        **args)
    return per_pair.view(num_tokens, top_k, hidden).sum(dim=1)


def fused_moe_triton(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                     renormalize: bool, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                     group: int = 0, w13_zero: torch.Tensor | None = None, w2_zero: torch.Tensor | None = None,
                     cfg: MoeConfig | None = None, once: bool | None = None, **epilogue) -> torch.Tensor:
    """``nanovllm::fused_moe`` in Triton; ``cfg`` and ``once`` (``experts_triton``; default: ``moe_plan``'s) the tiles
    and whether int4 experts are dequantized first (a given ``cfg`` runs as given: no grouped GEMMs);
    ``epilogue``: ``experts_triton``'s biases and activation."""
    planned, once = moe_plan(x, top_k, w13, w2, w13_scale, w13_zero, group, once)
    weights, ids, hist = route_triton(router_logits, top_k, renormalize)
    return experts_triton(x, weights, ids, hist, w13, w2, cfg or planned, w13_scale, w2_scale, group, w13_zero,
                          w2_zero, once, **epilogue, grouped=cfg is None)


def moe_experts_triton(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                       w2: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                       group: int = 0, w13_zero: torch.Tensor | None = None,
                       w2_zero: torch.Tensor | None = None, **epilogue) -> torch.Tensor:
    """``nanovllm::moe_experts`` in Triton: the experts' part for tokens routed elsewhere (``ids`` [T, top_k] into
    ``w13``'s experts, e.g. an expert cache's slots; ``weights`` float32); ``epilogue`` as ``fused_moe_triton``'s."""
    cfg, once = moe_plan(x, ids.shape[1], w13, w2, w13_scale, w13_zero, group, None)
    return experts_triton(x.contiguous(), *routed_elsewhere(weights, ids, w13.shape[0]), w13, w2, cfg, w13_scale,
                          w2_scale, group, w13_zero, w2_zero, once, **epilogue)
