"""Triton kernels of ``nanovllm::lora_add`` (Punica's BGMV and SGMV designs), with the contract of the twin
(``reference.lora_add_reference``): ``y`` [T, N] plus, for each token t of slot s = ``slots[t]`` != 0,
``((x[t] @ a[s].T) @ b[s].T) * scaling[s]``, rounded as PEFT rounds (shrink, expand, scale, add: each to the
dtype, to nearest even).  Two launches: a shrink into a float32 buffer [T, R] (dtype-rounded values), an expand.

* Fewer than ``GROUP_MIN_TOKENS`` tokens (decode), per token: one shrink program per token walks K in blocks over
  its slot's ``a[s]`` (R padded to a power of two, masked); one expand program per (token, N block).
* More (prefill), grouped: tokens sorted by slot on the device (argsort, per-slot counts and starts); a program
  takes a block of one slot's tokens and ``tl.dot``s it with that slot's ``a`` / ``b`` tiles; programs past
  their slot's count exit.
Slot 0 costs nothing: its tokens' shrink is skipped and their expand only copies ``y``.  Grids depend on shapes
alone: no host sync, no data-dependent shape, so both paths are graph-capturable.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_common import _dot, _dot_precision  # "upcast" off GPU (interpreter's bf16 dot)
from nanovllm.kernels.triton_rope_store import _round  # to the dtype, nearest even (the interpreter's cast truncates)

SHRINK_TILE = 8192  # elements of a shrink step's a tile [BR, BK] (BK: 32 to 256)
EXPAND_BN = 128  # the N block of an expand program
GROUP_MIN_TOKENS = 64  # from this many tokens on, the grouped (SGMV) kernels
GROUP_BT, GROUP_BK, GROUP_BN = 64, 64, 64  # the grouped kernels' token, K and N blocks (tl.dot tiles)


@triton.jit
def _shrink(x_ptr, a_ptr, slot_ptr, s_ptr, K, R, stride_x, stride_a0, stride_a1,
            BR: tl.constexpr, BK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot == 0:
        return
    offs_r = tl.arange(0, BR)
    mask_r = offs_r < R
    a_base = a_ptr + slot * stride_a0 + offs_r[:, None] * stride_a1
    x_base = x_ptr + t * stride_x
    acc = tl.zeros([BR], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        xv = tl.load(x_base + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        av = tl.load(a_base + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
    acc = _round(acc, x_ptr.dtype.element_ty)  # the shrink result in the dtype, as PEFT's
    tl.store(s_ptr + t * BR + offs_r, acc, mask=mask_r)


@triton.jit
def _expand(y_ptr, s_ptr, b_ptr, slot_ptr, scaling_ptr, out_ptr, N, R, stride_y, stride_out, stride_b0,
            stride_b1, BR: tl.constexpr, BN: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    slot = tl.load(slot_ptr + t).to(tl.int64)
    yv = tl.load(y_ptr + t * stride_y + offs_n, mask=mask_n, other=0.0)
    if slot != 0:
        dtype = y_ptr.dtype.element_ty
        offs_r = tl.arange(0, BR)
        mask_r = offs_r < R
        sv = tl.load(s_ptr + t * BR + offs_r, mask=mask_r, other=0.0)
        bv = tl.load(b_ptr + slot * stride_b0 + offs_n[:, None] * stride_b1 + offs_r[None, :],
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        delta = _round(tl.sum(bv * sv[None, :], axis=1), dtype)  # the expand result in the dtype
        scale = _round(tl.load(scaling_ptr + slot), dtype)
        yv = _round(yv.to(tl.float32) + _round(delta * scale, dtype), dtype).to(dtype)  # exact cast
    tl.store(out_ptr + t * stride_out + offs_n, yv, mask=mask_n)


@triton.jit
def _slot_block(order_ptr, start_ptr, count_ptr, slot, BT: tl.constexpr):
    """(token rows [BT], their mask) of this program's block (axis 0) of ``slot``'s tokens, in sorted order."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    mask_t = offs_t < tl.load(count_ptr + slot)
    tok = tl.load(order_ptr + tl.load(start_ptr + slot) + offs_t, mask=mask_t, other=0).to(tl.int64)
    return tok, mask_t


@triton.jit
def _shrink_grouped(x_ptr, a_ptr, order_ptr, start_ptr, count_ptr, s_ptr, K, R, stride_x, stride_a0, stride_a1,
                    BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    slot = tl.program_id(1).to(tl.int64) + 1  # slot 0's tokens add nothing: no programs
    if tl.program_id(0) * BT >= tl.load(count_ptr + slot):
        return
    tok, mask_t = _slot_block(order_ptr, start_ptr, count_ptr, slot, BT)
    offs_r = tl.arange(0, BR)
    mask_r = offs_r < R
    acc = tl.zeros([BT, BR], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        xv = tl.load(x_ptr + tok[:, None] * stride_x + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                     other=0.0)
        av = tl.load(a_ptr + slot * stride_a0 + offs_r[None, :] * stride_a1 + offs_k[:, None],
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # a[slot].T block [BK, BR]
        acc += _dot(xv, av, PREC)
    acc = _round(acc, x_ptr.dtype.element_ty)
    tl.store(s_ptr + tok[:, None] * BR + offs_r[None, :], acc, mask=mask_t[:, None] & mask_r[None, :])


@triton.jit
def _expand_grouped(y_ptr, s_ptr, b_ptr, order_ptr, start_ptr, count_ptr, scaling_ptr, out_ptr, N, R, stride_y,
                    stride_out, stride_b0, stride_b1, BT: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
                    PREC: tl.constexpr):
    slot = tl.program_id(2).to(tl.int64)  # slot 0's programs copy y
    if tl.program_id(0) * BT >= tl.load(count_ptr + slot):
        return
    tok, mask_t = _slot_block(order_ptr, start_ptr, count_ptr, slot, BT)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = mask_t[:, None] & (offs_n < N)[None, :]
    yv = tl.load(y_ptr + tok[:, None] * stride_y + offs_n[None, :], mask=mask, other=0.0)
    if slot != 0:
        dtype = y_ptr.dtype.element_ty
        offs_r = tl.arange(0, BR)
        mask_r = offs_r < R
        sv = tl.load(s_ptr + tok[:, None] * BR + offs_r[None, :], mask=mask_t[:, None] & mask_r[None, :],
                     other=0.0).to(dtype)  # dtype values already: exact
        bv = tl.load(b_ptr + slot * stride_b0 + offs_n[None, :] * stride_b1 + offs_r[:, None],
                     mask=mask_r[:, None] & (offs_n < N)[None, :], other=0.0)  # b[slot].T block [BR, BN]
        delta = _round(_dot(sv, bv, PREC), dtype)
        scale = _round(tl.load(scaling_ptr + slot), dtype)
        yv = _round(yv.to(tl.float32) + _round(delta * scale, dtype), dtype).to(dtype)
    tl.store(out_ptr + tok[:, None] * stride_out + offs_n[None, :], yv, mask=mask)


def _lora_add_grouped(out, y, x, slots, a, b, scaling):
    """SGMV: tokens sorted by slot (a stable argsort and per-slot counts, on the device), each program one block of
    BT tokens of one slot: tl.dot over the block for the shrink and the expand."""
    (T, N), K, (S, R) = y.shape, x.shape[1], a.shape[:2]
    order = torch.argsort(slots, stable=True)
    count = torch.zeros(S, dtype=torch.int64, device=slots.device).scatter_add_(0, slots, torch.ones_like(slots))
    start = torch.cumsum(count, 0) - count
    BR = max(16, triton.next_power_of_2(R))
    prec = _dot_precision(x)  # exact fp32 for fp32; bf16 and fp16 products are exact in any mode
    s = torch.empty((T, BR), dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(T, GROUP_BT)
    if S > 1:
        _shrink_grouped[(blocks, S - 1)](x, a, order, start, count, s, K, R, x.stride(0), a.stride(0), a.stride(1),
                                         BT=GROUP_BT, BR=BR, BK=GROUP_BK, PREC=prec)
    _expand_grouped[(blocks, triton.cdiv(N, GROUP_BN), S)](
        y, s, b, order, start, count, scaling, out, N, R, y.stride(0), out.stride(0), b.stride(0), b.stride(1),
        BT=GROUP_BT, BR=BR, BN=GROUP_BN, PREC=prec)
    return out


def lora_add_triton(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    scaling: torch.Tensor) -> torch.Tensor:
    T, N = y.shape
    K, R = x.shape[1], a.shape[1]
    out = torch.empty((T, N), dtype=y.dtype, device=y.device)
    if T == 0 or N == 0:
        return out
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    y = y if y.stride(1) == 1 else y.contiguous()
    slots = slots.contiguous()
    scaling = scaling.to(torch.float32).contiguous()
    if T >= GROUP_MIN_TOKENS:
        return _lora_add_grouped(out, y, x, slots, a, b, scaling)
    BR = max(triton.next_power_of_2(R), 2)
    BK = max(32, min(256, SHRINK_TILE // BR))
    s = torch.empty((T, BR), dtype=torch.float32, device=x.device)  # shrink results; slot-0 rows never read
    _shrink[(T,)](x, a, slots, s, K, R, x.stride(0), a.stride(0), a.stride(1), BR=BR, BK=BK)
    _expand[(T, triton.cdiv(N, EXPAND_BN))](y, s, b, slots, scaling, out, N, R, y.stride(0), out.stride(0),
                                            b.stride(0), b.stride(1), BR=BR, BN=EXPAND_BN)
    return out
