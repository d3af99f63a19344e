"""Skinny matmuls for decode: ``x[M, K] @ w[N, K].T`` with M (the batch) small, in Triton.

At decode a projection reads its whole weight to produce a few rows, so the matmul is bound by memory, by how
many SMs it keeps busy and by fixed launch and ramp-up time.  Which shapes and row counts take this kernel, and
with which configuration, is ``matmul_configs.py``'s table (cuBLAS serves the rest); ``nanovllm::linear``
dispatches (``cuda.py``).  The kernel tiles the output into small ``BLOCK_M x BLOCK_N`` blocks and, where the output
has too few blocks to fill the GPU, also splits K (``SPLIT_K``): every split writes an fp32 partial and the last
split of each output block to finish (counted with an atomic) sums them in a fixed order and writes the result, so
a launch stays one kernel with no memset and no second pass.  That last split resets the counters, so a launch
can be captured in a CUDA graph and replayed.

``SILU_MUL`` fuses the MLP's activation: ``w`` is the packed ``[gate; up]`` weight ``[2I, K]`` and the kernel
writes ``silu(x @ gate.T) * (x @ up.T)`` ``[M, I]``.  ``SWAP`` computes the output block transposed (the same
result).  On Hopper the kernel takes part in programmatic dependent launch (``pdl.py``).
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.matmul_configs import MatmulConfig
from nanovllm.kernels.pdl import pdl_begin, pdl_launch


@triton.jit
def _load_tile(ptr, rows, cols, row_mask, stride_row):
    """A [len(rows), len(cols)] tile of a row-major matrix, rows masked, columns always in range."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :], mask=row_mask[:, None], other=0.0)


@triton.jit
def _partial_product(x_ptr, w_ptr, offs_m, offs_n, m_mask, n_mask, k_start, k_steps, stride_xm, stride_wn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
                     UPCAST: tl.constexpr):
    """sum over k in [k_start, k_start + k_steps * BLOCK_K) of x[m, k] * w[n, k], as an fp32 [BLOCK_M, BLOCK_N]."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # SWAP puts the weight tile on the left of tl.dot, which lets the tensor-core instruction's long side run along
    # N when M is tiny.
    if SWAP:
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(k_steps):
        x = _load_tile(x_ptr, offs_m, offs_k, m_mask, stride_xm)  # [BLOCK_M, BLOCK_K]
        w = _load_tile(w_ptr, offs_n, offs_k, n_mask, stride_wn)  # [BLOCK_N, BLOCK_K]
        if UPCAST:  # the Triton interpreter (CPU tests) multiplies bf16 operands wrongly; fp32 is exact
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP:
            acc_t = tl.dot(w, tl.trans(x), acc_t)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        offs_k += BLOCK_K
    if SWAP:
        return tl.trans(acc_t)
    else:
        return acc


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr, M, N_OUT, K, stride_xm, stride_wn,
                   stride_om, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, SPLIT_K: tl.constexpr,
                   SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N_OUT
    k_steps = K // (SPLIT_K * BLOCK_K)
    k_start = pid_k * k_steps * BLOCK_K
    pdl_begin(PDL)
    acc = _partial_product(x_ptr, w_ptr, offs_m, offs_n, m_mask, n_mask, k_start, k_steps, stride_xm, stride_wn,
                           BLOCK_M, BLOCK_N, BLOCK_K, SWAP, UPCAST)
    # SILU_MUL saves a kernel and a round trip of the [M, 2I] intermediate; the up half of the packed weight starts
    # N_OUT rows further.
    if SILU_MUL:
        acc_up = _partial_product(x_ptr, w_ptr + N_OUT * stride_wn, offs_m, offs_n, m_mask, n_mask, k_start,
                                  k_steps, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, UPCAST)
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


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: MatmulConfig,
                  silu_mul: bool = False) -> torch.Tensor:
    """``x @ weight.T (+ bias)``, or with ``silu_mul`` the fused MLP activation of a packed gate/up weight."""
    m, k = x.shape
    n = weight.shape[0]
    n_out = n // 2 if silu_mul else n
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    assert cfg.fits(m, n_out, k), f"{cfg} cannot run K={k}"
    assert not x.is_cuda or x.dtype in (torch.bfloat16, torch.float16), "fp32 matmuls stay with cuBLAS"
    out = x.new_empty(m, n_out)
    if m == 0:
        return out
    grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
    if cfg.split_k > 1:
        assert grid[0] * grid[1] <= _COUNTER_SLOTS, "too many output blocks for the split-K counters"
        partial = torch.empty(cfg.split_k * (2 if silu_mul else 1) * m * n_out, dtype=torch.float32,
                              device=x.device)
        counters = _counters(x.device)
    else:
        partial = counters = out  # unused
    _linear_kernel[grid](x, weight, bias if bias is not None else out, out, partial, counters, m, n_out, k,
                         x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                         SILU_MUL=silu_mul, SPLIT_K=cfg.split_k, SWAP=cfg.swap, BLOCK_M=cfg.block_m,
                         BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=not x.is_cuda,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x.device))
    return out
