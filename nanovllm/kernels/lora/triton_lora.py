"""Triton kernels of ``nanovllm::lora_add`` (Punica's BGMV design), with the contract of the twin
(``reference.lora_add_reference``): ``y`` [T, N] plus, for each token t of slot s = ``slots[t]`` != 0,
``((x[t] @ a[s].T) @ b[s].T) * scaling[s]``, rounded as PEFT rounds (shrink, expand, scale, add: each to the dtype).

* shrink: one program per token gathers its slot's ``a[s]`` [R, K] and walks K in blocks, accumulating the R
  (padded to a power of two, masked) dot products in float32; the result, rounded to the dtype, goes to a float32
  buffer [T, R].  Tokens of slot 0 return at once: they read nothing.
* expand: one program per (token, block of N) reads the token's R shrink values and ``b[s]``'s [BN, R] tile, rounds
  the product to the dtype, scales it, adds it to ``y``; a token of slot 0 copies its block of ``y``.
Shapes alone fix the grids: no host sync, no data-dependent shape, so the pair is graph-capturable.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_rope_store import _round  # to the dtype, nearest even (the interpreter's cast truncates)

SHRINK_TILE = 8192  # elements of a shrink step's a tile [BR, BK] (BK: 32 to 256)
EXPAND_BN = 128  # the N block of an expand program


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
    BR = max(triton.next_power_of_2(R), 2)
    BK = max(32, min(256, SHRINK_TILE // BR))
    s = torch.empty((T, BR), dtype=torch.float32, device=x.device)  # shrink results; slot-0 rows never read
    _shrink[(T,)](x, a, slots, s, K, R, x.stride(0), a.stride(0), a.stride(1), BR=BR, BK=BK)
    _expand[(T, triton.cdiv(N, EXPAND_BN))](y, s, b, slots, scaling, out, N, R, y.stride(0), out.stride(0),
                                            b.stride(0), b.stride(1), BR=BR, BN=EXPAND_BN)
    return out
