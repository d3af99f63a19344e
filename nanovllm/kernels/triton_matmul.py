"""Skinny matmuls for decode: ``x[M, K] @ w[N, K].T`` with M (the batch) small, in Triton.

At decode a projection is bound by memory, SM occupancy and launch time.  Which shapes and row counts take this
kernel, and with which configuration, is ``matmul_configs.py``'s table (cuBLAS serves the rest).  The kernel tiles
the output into small ``BLOCK_M x BLOCK_N`` blocks and, where the output has too few blocks to fill the GPU, also
splits K (``SPLIT_K``): every split writes an fp32 partial and the last split of each output block to finish
(counted with an atomic) sums them in a fixed order and writes the result, so a launch stays one kernel with no
memset and no second pass; it resets the counters, so a launch can be replayed in a CUDA graph.

``SILU_MUL`` fuses the MLP's activation: ``w`` is the packed ``[gate; up]`` weight ``[2I, K]`` and the kernel writes
``silu(x @ gate.T) * (x @ up.T)`` ``[M, I]``.  ``SWAP`` computes the output block transposed (the same result).  On
Hopper the kernel takes part in programmatic dependent launch (``pdl.py``).  ``W_FP8`` reads an FP8 weight
(``weight_quant.py``: e4m3 with a float32 scale per row and group of columns) at half the bytes of bf16, widens each
tile in registers (to fp16 beside bf16 x, ``FP16_MMA``) and scales each group's partial product
(``matmul_configs.choose_fp8`` picks its tiles; BLOCK_K divides the group unless one scale covers a whole split).
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.matmul_configs import MatmulConfig
from nanovllm.kernels.pdl import pdl_begin, pdl_launch
from nanovllm.kernels.weight_quant import FP8_DTYPE, num_groups


@triton.jit
def _load_tile(ptr, rows, cols, row_mask, stride_row):
    """A [len(rows), len(cols)] tile of a row-major matrix, rows masked, columns always in range."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :], mask=row_mask[:, None], other=0.0)


@triton.jit
def _partial_product(x_ptr, w_ptr, s_ptr, offs_m, offs_n, m_mask, n_mask, k_start, k_steps, stride_xm, stride_wn,
                     stride_sn, group, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SWAP: tl.constexpr, UPCAST: tl.constexpr, W_FP8: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                     FP16_MMA: tl.constexpr):
    """sum over k in [k_start, k_start + k_steps * BLOCK_K) of x[m, k] * w[n, k], as an fp32 [BLOCK_M, BLOCK_N].

    With ``W_FP8`` the weight is e4m3 with a float32 scale per row and ``group`` columns (``weight_quant.py``):
    each tile is widened to x's dtype (exact) and its product scaled by its group's scale (``SCALE_PER_TILE``,
    BLOCK_K divides ``group``), or, where every column of the product shares one group, the sum once at the end.
    ``FP16_MMA`` (an FP8 weight, bf16 x) multiplies in fp16: e4m3 widens to fp16 in one instruction, to bf16 only
    through fp32.  x is scaled by 2^-4 first, so activations up to 1.0e6 stay inside fp16's range, and the sum
    by 2^4 at the end: exact for every x of magnitude 2^-10 or more (fp16 carries more mantissa than bf16), and
    below that an absolute error under 2^-20 per element."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    k0 = k_start
    if W_FP8:
        s_row = s_ptr + offs_n.to(tl.int64) * stride_sn
    # SWAP puts the weight tile on the left of tl.dot, which lets the tensor-core instruction's long side run along
    # N when M is tiny.
    if SWAP:
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(k_steps):
        x = _load_tile(x_ptr, offs_m, offs_k, m_mask, stride_xm)  # [BLOCK_M, BLOCK_K]
        w = _load_tile(w_ptr, offs_n, offs_k, n_mask, stride_wn)  # [BLOCK_N, BLOCK_K]
        if FP16_MMA:
            x = (x.to(tl.float32) * 0.0625).to(tl.float16)
            w = w.to(tl.float16)
        if UPCAST:  # the Triton interpreter (CPU tests) multiplies bf16 operands wrongly; fp32 is exact
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        elif W_FP8 and not FP16_MMA:
            w = w.to(x.dtype)
        if W_FP8 and SCALE_PER_TILE:
            s = tl.load(s_row + k0 // group, mask=n_mask, other=0.0)  # [BLOCK_N]
            if SWAP:
                acc_t += tl.dot(w, tl.trans(x)) * s[:, None]
            else:
                acc += tl.dot(x, tl.trans(w)) * s[None, :]
        elif SWAP:
            acc_t = tl.dot(w, tl.trans(x), acc_t)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        offs_k += BLOCK_K
        k0 += BLOCK_K
    if SWAP:
        acc = tl.trans(acc_t)
    if W_FP8 and not SCALE_PER_TILE:
        acc = acc * tl.load(s_row + k_start // group, mask=n_mask, other=0.0)[None, :]
    if FP16_MMA:
        acc = acc * 16.0
    return acc


@triton.jit
def _write_output(acc, acc_up, offs_m, offs_n, m_mask, n_mask, pid_m, pid_n, pid_k, partial_ptr, counter_ptr,
                  bias_ptr, out_ptr, M, N_OUT, stride_om, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                  SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write one output block from this split's fp32 sums (``acc_up``: the up half's, with ``SILU_MUL``): alone, or
    with ``SPLIT_K`` > 1 through ``partial_ptr``, where the last split to arrive (``counter_ptr``) sums every
    split's in a fixed order and resets its counter; then bias, SiLU-and-multiply and the store in out's dtype.
    Shared by every skinny-matmul kernel (this file's and ``triton_w4a16.py``'s)."""
    out_mask = m_mask[:, None] & n_mask[None, :]
    finish = True
    if SPLIT_K > 1:
        # partial[split, half, m, n] in fp32; the last split to arrive at this output block sums them.
        plane = M * N_OUT
        cell = offs_m[:, None].to(tl.int64) * N_OUT + offs_n[None, :]
        halves = 2 if SILU_MUL else 1
        tl.store(partial_ptr + pid_k * halves * plane + cell, acc, mask=out_mask)
        if SILU_MUL:
            tl.store(partial_ptr + (pid_k * 2 + 1) * plane + cell, acc_up, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        counter = counter_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        finish = arrived == SPLIT_K - 1
        if finish:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if SILU_MUL:
                acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):  # a fixed order, so the result does not depend on arrival order
                acc += tl.load(partial_ptr + s * halves * plane + cell, mask=out_mask, other=0.0,
                               cache_modifier=".cg")
                if SILU_MUL:
                    acc_up += tl.load(partial_ptr + (s * 2 + 1) * plane + cell, mask=out_mask, other=0.0,
                                      cache_modifier=".cg")
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    if finish:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if SILU_MUL:
                acc_up += tl.load(bias_ptr + N_OUT + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            acc = acc * tl.sigmoid(acc) * acc_up
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _program_tile(M, N_OUT, K, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """This program's output block and K range in a skinny launch (grid: N blocks, M blocks, K splits): its ids,
    row and column offsets and masks, and the first column and number of BLOCK_K steps of its split."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_steps = K // (SPLIT_K * BLOCK_K)
    return pid_m, pid_n, pid_k, offs_m, offs_n, offs_m < M, offs_n < N_OUT, pid_k * k_steps * BLOCK_K, k_steps


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr, M, N_OUT, K, stride_xm,
                   stride_wn, stride_sn, stride_om, group, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                   SPLIT_K: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, W_FP8: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                   FP16_MMA: tl.constexpr, PDL: tl.constexpr):
    pid_m, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask, k_start, k_steps = _program_tile(M, N_OUT, K, SPLIT_K, BLOCK_M,
                                                                                           BLOCK_N, BLOCK_K)
    pdl_begin(PDL)
    acc = _partial_product(x_ptr, w_ptr, s_ptr, offs_m, offs_n, m_mask, n_mask, k_start, k_steps, stride_xm,
                           stride_wn, stride_sn, group, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, UPCAST, W_FP8,
                           SCALE_PER_TILE, FP16_MMA)
    # SILU_MUL saves a kernel and a round trip of the [M, 2I] intermediate; the up half of the packed weight starts
    # N_OUT rows further (and so do its scales).
    if SILU_MUL:
        acc_up = _partial_product(x_ptr, w_ptr + N_OUT * stride_wn, s_ptr + N_OUT * stride_sn, offs_m, offs_n,
                                  m_mask, n_mask, k_start, k_steps, stride_xm, stride_wn, stride_sn, group, BLOCK_M,
                                  BLOCK_N, BLOCK_K, SWAP, UPCAST, W_FP8, SCALE_PER_TILE, FP16_MMA)
    _write_output(acc, acc_up if SILU_MUL else acc, offs_m, offs_n, m_mask, n_mask, pid_m, pid_n, pid_k,
                  partial_ptr, counter_ptr, bias_ptr, out_ptr, M, N_OUT, stride_om, HAS_BIAS, SILU_MUL, SPLIT_K,
                  BLOCK_M, BLOCK_N)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, N_OUT, stride_in, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N_OUT
    g = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + row * stride_in + N_OUT + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a packed ``[M, 2I]`` tensor, one kernel (the unfused path of large batches)."""
    m, two_i = gate_up.shape
    out = gate_up.new_empty(m, two_i // 2)
    if m:
        block = 1024
        _silu_mul_kernel[(m, triton.cdiv(two_i // 2, block))](gate_up, out, two_i // 2, gate_up.stride(0),
                                                              out.stride(0), BLOCK=block,
                                                              **pdl_launch(gate_up.device))
    return out


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, out_ptr, K, stride_wn, stride_sn, stride_on, group, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    w = tl.load(w_ptr + row * stride_wn + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + row * stride_sn + cols // group, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_on + cols, (w * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_triton(weight: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``weight_quant.dequantize`` of an FP8 weight [N, K] in one pass (the same values: an fp32 product rounded
    once), with no float32 temporaries: the large-M path of an FP8 projection, ahead of cuBLAS."""
    n, k = weight.shape
    assert weight.stride(1) == 1 and scale.stride(1) == 1 and scale.shape == (n, num_groups(k, group))
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    if n and k:
        block = 1024
        _dequantize_kernel[(n, triton.cdiv(k, block))](weight, scale, out, k, weight.stride(0), scale.stride(0),
                                                        out.stride(0), group, BLOCK=block)
    return out


_COUNTERS: dict = {}
_COUNTER_SLOTS = 1 << 16


def _counters(device: torch.device) -> torch.Tensor:
    """Per-device zeroed int32 arrival counters, one per output block; the kernel leaves them zero again.

    Made on first use, which must not be inside a CUDA-graph capture (the engine runs every shape eagerly
    before it captures)."""
    key = (device.type, device.index)
    if key not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K matmul first used inside a graph capture; run it once eagerly first")
        _COUNTERS[key] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def launch_plan(cfg: MatmulConfig, m: int, n_out: int, silu_mul: bool, out: torch.Tensor) -> tuple:
    """(grid, fp32 partials, arrival counters) of a skinny-matmul launch writing ``out`` [m, n_out]: one program per
    output block and split; without split K the two buffers are ``out`` itself, unused."""
    grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
    if cfg.split_k == 1:
        return grid, out, out
    assert grid[0] * grid[1] <= _COUNTER_SLOTS, "too many output blocks for the split-K counters"
    partial = torch.empty(cfg.split_k * (2 if silu_mul else 1) * m * n_out, dtype=torch.float32, device=out.device)
    return grid, partial, _counters(out.device)


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: MatmulConfig,
                  silu_mul: bool = False, weight_scale: torch.Tensor | None = None, group: int = 0) -> torch.Tensor:
    """``x @ weight.T (+ bias)``, or with ``silu_mul`` the fused MLP activation of a packed gate/up weight.  An FP8
    ``weight`` comes with its float32 ``weight_scale`` [N, ceil(K / group)] (``weight_quant.py``)."""
    m, k = x.shape
    n = weight.shape[0]
    n_out = n // 2 if silu_mul else n
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    assert cfg.fits(m, n_out, k), f"{cfg} cannot run K={k}"
    assert not x.is_cuda or x.dtype in (torch.bfloat16, torch.float16), "fp32 matmuls stay with cuBLAS"
    fp8 = weight_scale is not None
    if fp8:
        assert weight.dtype == FP8_DTYPE and weight_scale.dtype == torch.float32 and weight_scale.stride(1) == 1
        assert weight_scale.shape == (n, num_groups(k, group)), f"scale {tuple(weight_scale.shape)} for {n}x{k}"
        assert cfg.fits_fp8(k, group), f"{cfg} cannot run K={k} in groups of {group}"
    else:
        assert weight.dtype == x.dtype, f"weight {weight.dtype} for x {x.dtype}"
    out = x.new_empty(m, n_out)
    if m == 0:
        return out
    grid, partial, counters = launch_plan(cfg, m, n_out, silu_mul, out)
    scale = weight_scale if fp8 else out  # unused without FP8
    _linear_kernel[grid](x, weight, scale, bias if bias is not None else out, out, partial, counters, m, n_out, k,
                         x.stride(0), weight.stride(0), scale.stride(0) if fp8 else 0, out.stride(0), max(group, 1),
                         HAS_BIAS=bias is not None, SILU_MUL=silu_mul, SPLIT_K=cfg.split_k, SWAP=cfg.swap,
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=not x.is_cuda,
                         W_FP8=fp8, SCALE_PER_TILE=fp8 and cfg.scales_per_tile(k, group),
                         FP16_MMA=fp8 and x.dtype == torch.bfloat16,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x.device))
    return out
