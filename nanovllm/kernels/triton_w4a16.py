"""w4a16 projections: ``x[M, K] @ W[N, K].T (+ bias)`` with W an int4 weight (``int4_quant.py``), in Triton.

The weight is streamed packed: each [BLOCK_N, BLOCK_K / 2] byte tile is split in registers into its even (low
nibble) and odd (high nibble) columns as exact ``q - zero`` in x's dtype (``triton_common._int4_minus_zero``), the
tile meets x's in ``tl.dot`` with fp32 accumulation, and the product is scaled by its rows' scales: no weight is
rounded to 16 bits, so the result is nearer the real product than the twin's, which rounds ``(q - zero) * scale``
first. BLOCK_K divides ``group`` (or one group covers all of K), so a tile has one scale and zero per row; a partial
last group needs nothing more. Tiles, split K (the last split of an output block to arrive, counted with an atomic,
sums the fp32 partials in a fixed order and resets its counter) and ``SILU_MUL`` (a packed [gate; up] weight of 2I
rows -> ``silu(gate) * up`` [M, I]) follow ``triton_matmul.py``; the kernel takes part in PDL (``pdl.py``). With
``perm`` int32 [K] (GPTQ's act order, applied at load time) it computes ``x[:, perm] @ W.T``, gathering x's columns
through it. ``choose_w4a16`` picks the tiles by row count; past ``W4A16_TRITON_MAX_M`` rows, or where no tile fits,
the CUDA op dequantizes the whole weight once (``dequantize_int4_triton``) and runs cuBLAS.
"""
from dataclasses import replace

import torch
import triton
import triton.language as tl

from nanovllm.kernels.int4_quant import num_groups
from nanovllm.kernels.matmul_configs import MatmulConfig
from nanovllm.kernels.options import current_options
from nanovllm.kernels.pdl import pdl_begin, pdl_launch
from nanovllm.kernels.triton_common import _int4_minus_zero, _num_sms
from nanovllm.kernels.triton_matmul import _program_tile, _write_output, launch_plan

# Past this many rows the weight is dequantized once and multiplied by cuBLAS (prefill).
W4A16_TRITON_MAX_M = 64
_MAX_SPLIT = 16
# At up to 16 rows split K until the launch has this many programs per SM, above that one per SM: the H100 sweep
# (``python -m benchmarks.kernel_bench --int4 --sweep 1,16,32,64``, docs/PERFORMANCE.md) found these tiles within 6%
# of each row count's best on Qwen3-8B's shapes together.
_DECODE_PROGRAMS_PER_SM = 2
_TILES = ((16, MatmulConfig(16, 64, 128)), (32, MatmulConfig(32, 128, 128, num_stages=2)),
          (W4A16_TRITON_MAX_M, MatmulConfig(64, 128, 128, num_stages=2)))  # (max_m, tile) in ascending max_m
_MIN_WIDE_BLOCK_K = 64  # the wider tiles' smallest BLOCK_K


@triton.jit
def _partial_product(x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, m_mask, n_mask, k_start, k_steps,
                     stride_xm, stride_qn, stride_sn, stride_zn, group, HAS_PERM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """sum over k in [k_start, k_start + k_steps * BLOCK_K) of x[m, perm[k]] * W[n, k], an fp32 [BLOCK_M, BLOCK_N]."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_byte = k_start // 2 + tl.arange(0, BLOCK_K // 2)
    k0 = k_start
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    q_rows = qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    s_row = s_ptr + offs_n.to(tl.int64) * stride_sn
    z_row = z_ptr + offs_n.to(tl.int64) * stride_zn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(k_steps):
        packed = tl.load(q_rows + offs_byte[None, :], mask=n_mask[:, None], other=0)  # [BLOCK_N, BLOCK_K / 2]
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k)
        else:
            cols = offs_k
        x = tl.load(x_rows + cols[None, :], mask=m_mask[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        if UPCAST:  # the Triton interpreter (CPU tests) multiplies bf16 operands wrongly; fp32 is exact
            x = x.to(tl.float32)
        zero = tl.load(z_row + k0 // group, mask=n_mask, other=0)
        even, odd = _int4_minus_zero(packed, zero[:, None], x.dtype, not UPCAST)
        w = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))  # columns back in order: 2j, 2j + 1
        scale = tl.load(s_row + k0 // group, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w)) * scale[None, :]
        offs_k += BLOCK_K
        offs_byte += BLOCK_K // 2
        k0 += BLOCK_K
    return acc


@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel(x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr, M, N_OUT, K,
                  stride_xm, stride_qn, stride_sn, stride_zn, stride_om, group, HAS_PERM: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    pid_m, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask, k_start, k_steps = _program_tile(M, N_OUT, K, SPLIT_K, BLOCK_M,
                                                                                           BLOCK_N, BLOCK_K)
    pdl_begin(PDL)
    acc = _partial_product(x_ptr, perm_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, m_mask, n_mask, k_start, k_steps,
                           stride_xm, stride_qn, stride_sn, stride_zn, group, HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K,
                           UPCAST)
    if SILU_MUL:  # the up half starts N_OUT rows further, in the weight, its scales and its zeros
        acc_up = _partial_product(x_ptr, perm_ptr, qw_ptr + N_OUT * stride_qn, s_ptr + N_OUT * stride_sn,
                                  z_ptr + N_OUT * stride_zn, offs_m, offs_n, m_mask, n_mask, k_start, k_steps,
                                  stride_xm, stride_qn, stride_sn, stride_zn, group, HAS_PERM, BLOCK_M, BLOCK_N,
                                  BLOCK_K, UPCAST)
    _write_output(acc, acc_up if SILU_MUL else acc, offs_m, offs_n, m_mask, n_mask, pid_m, pid_n, pid_k,
                  partial_ptr, counter_ptr, bias_ptr, out_ptr, M, N_OUT, stride_om, HAS_BIAS, SILU_MUL, SPLIT_K,
                  BLOCK_M, BLOCK_N)


def fits(cfg: MatmulConfig, k: int, group: int) -> bool:
    """Whether ``cfg`` runs K columns in groups of ``group``: whole BLOCK_K steps per split, and no K-tile
    straddling two groups (BLOCK_K divides the group, or one group covers all of K)."""
    return k % (cfg.split_k * cfg.block_k) == 0 and (group % cfg.block_k == 0 or group >= k)


def w4a16_config(m: int, n_out: int, k: int, group: int, num_sms: int) -> MatmulConfig | None:
    """The tile for ``m`` rows of an ``[n_out, k]`` output in groups of ``group``, or None if none fits: BLOCK_M by
    row count; split K, up to ``_MAX_SPLIT`` ways, while the launch has fewer programs than ``num_sms`` (at most 16
    rows: ``_DECODE_PROGRAMS_PER_SM`` times that); the largest BLOCK_K (128, 64, 32, 16) that fits. A group below
    ``_MIN_WIDE_BLOCK_K`` columns takes the 16-row tile at every row count: Triton 3.6 fails to compile the
    64x128 tile with BLOCK_K 32 on an H100 (``TritonGPUOptimizeDotOperands``)."""
    tile = next((t for max_m, t in _TILES if m <= max_m), _TILES[-1][1])
    cfg = _fitted(tile, m, n_out, k, group, num_sms)
    if cfg is not None and cfg.block_k < _MIN_WIDE_BLOCK_K and tile != _TILES[0][1]:
        cfg = _fitted(_TILES[0][1], m, n_out, k, group, num_sms)
    return cfg


def _fitted(tile: MatmulConfig, m: int, n_out: int, k: int, group: int, num_sms: int) -> MatmulConfig | None:
    blocks = -(-n_out // tile.block_n) * -(-m // tile.block_m)
    target = num_sms * (_DECODE_PROGRAMS_PER_SM if m <= 16 else 1)
    split = 1
    while blocks * split < target and split < _MAX_SPLIT:
        split *= 2
    for block_k in (128, 64, 32, 16):
        for s in (split >> i for i in range(split.bit_length())):  # split, split / 2, ..., 1
            cfg = replace(tile, block_k=block_k, split_k=s)
            if fits(cfg, k, group):
                return cfg
    return None


def choose_w4a16(x: torch.Tensor, qweight: torch.Tensor, silu_mul: bool, group: int) -> MatmulConfig | None:
    """The kernel's tile for ``x`` and an int4 ``qweight``, or None for dequantize + cuBLAS: float32 x, more than
    ``W4A16_TRITON_MAX_M`` rows, no fitting tile, or ``KernelOptions.triton_matmul`` off."""
    m, k = x.shape
    if x.dtype not in (torch.bfloat16, torch.float16) or m > W4A16_TRITON_MAX_M or not current_options().triton_matmul:
        return None
    n_out = qweight.shape[0] // 2 if silu_mul else qweight.shape[0]
    return w4a16_config(m, n_out, k, group, _num_sms(x.device))


def linear_w4a16_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                        perm: torch.Tensor | None, bias: torch.Tensor | None, cfg: MatmulConfig,
                        silu_mul: bool = False) -> torch.Tensor:
    """``x[:, perm] @ W.T (+ bias)`` (``perm`` None: x as is) for the int4 weight W = (qweight, scale, zero, group);
    with ``silu_mul`` the fused MLP activation of a packed gate/up weight."""
    m, k = x.shape
    n = qweight.shape[0]
    n_out = n // 2 if silu_mul else n
    assert qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == k, f"qweight {tuple(qweight.shape)} for K={k}"
    assert scale.dtype == torch.float16 and zero.dtype == torch.uint8
    assert scale.shape == zero.shape == (n, num_groups(k, group)), f"scale {tuple(scale.shape)} for {n}x{k}"
    assert x.stride(1) == 1 and qweight.stride(1) == 1 and scale.stride(1) == 1 and zero.stride(1) == 1
    assert not x.is_cuda or x.dtype in (torch.bfloat16, torch.float16), "fp32 int4 projections stay with the twin"
    assert perm is None or (perm.dtype == torch.int32 and perm.shape == (k,)), "perm: int32 [K]"
    assert fits(cfg, k, group), (f"{cfg} cannot run K={k} in groups of {group}: BLOCK_K={cfg.block_k} must divide "
                                 f"group={group} (or the group cover K) and split_k * BLOCK_K divide K")
    out = x.new_empty(m, n_out)
    if m == 0:
        return out
    grid, partial, counters = launch_plan(cfg, m, n_out, silu_mul, out)
    _w4a16_kernel[grid](x, perm if perm is not None else out, qweight, scale, zero,
                        bias if bias is not None else out, out, partial, counters, m, n_out, k, x.stride(0),
                        qweight.stride(0), scale.stride(0), zero.stride(0), out.stride(0), group,
                        HAS_PERM=perm is not None, HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
                        SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                        UPCAST=not x.is_cuda, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        **pdl_launch(x.device))
    return out


@triton.jit
def _dequantize_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, HALF_K, stride_qn, stride_sn, stride_zn, stride_on,
                       GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    byte = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    r64 = rows.to(tl.int64)[:, None]
    packed = tl.load(qw_ptr + r64 * stride_qn + byte[None, :], mask=rmask[:, None] & (byte < HALF_K)[None, :],
                     other=0)
    codes = tl.interleave(packed & 0xF, (packed >> 4) & 0xF)  # column 2b: byte b's low nibble, 2b + 1: its high
    cols = tl.program_id(1) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    mask = rmask[:, None] & (cols < 2 * HALF_K)[None, :]
    scale = tl.load(s_ptr + r64 * stride_sn + (cols // GROUP)[None, :], mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + r64 * stride_zn + (cols // GROUP)[None, :], mask=mask, other=0).to(tl.float32)
    out = (codes.to(tl.float32) - zero) * scale
    tl.store(out_ptr + r64 * stride_on + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int4_triton(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """``int4_quant.dequantize`` of a weight [N, K] in one pass (the same values), with no float32 temporaries:
    the large-M path of an int4 projection, ahead of cuBLAS, and MoE's dequantize-once.  A program writes a tile of
    4 rows x 1,024 columns with contiguous stores."""
    n, half_k = qweight.shape
    assert qweight.stride(1) == 1 and scale.stride(1) == 1 and zero.stride(1) == 1
    assert scale.shape == zero.shape == (n, num_groups(2 * half_k, group)), f"scale {tuple(scale.shape)}"
    out = torch.empty(n, 2 * half_k, dtype=dtype, device=qweight.device)
    if n and half_k:
        rows, block = 4, 512
        _dequantize_kernel[(triton.cdiv(n, rows), triton.cdiv(half_k, block))](
            qweight, scale, zero, out, n, half_k, qweight.stride(0), scale.stride(0), zero.stride(0), out.stride(0),
            GROUP=min(group, 2 * half_k), ROWS=rows, BLOCK=block)
    return out
