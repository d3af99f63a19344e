"""``lora_add`` for many tokens as two dense products over every slot at once, with the contract of the twin
(``reference.lora_add_reference``).  Four launches:

* the shrink multiplies the tokens by all slots' A stacked (``a`` viewed [S*R, K]; cuBLAS);
* ``_keep_own`` zeroes, in each token's row, every column but its own slot's R;
* the expand multiplies by all slots' B side by side ([N, S*R]: the pool stores B so, ``lora/pool.py``, and this
  is a view; cuBLAS); the zeros add nothing, so each row is its own adapter's product;
* ``_scale_add`` scales each row by its slot's scaling and adds ``y``.
Each stage is rounded to the dtype as the twin rounds it.  It reads every slot's weights whatever the tokens' slots
and multiplies S times the rank: for a batch spread over the adapters that is the bytes of reading each present
slot once, and the extra products are cheap up to ``MAX_COLUMNS`` stacked columns.  Past ``MIN_TOKENS`` tokens
(``WIDE_MIN_TOKENS`` for outputs of ``WIDE_N`` columns or more) ``triton_lora.lora_add_triton`` takes this path (a
runtime choice inside the op: graphs keep one node).
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_rope_store import _round  # to the dtype, nearest even (the interpreter's cast truncates)

MIN_TOKENS = 16  # at or below: the per-slot kernels (a decode step with few tokens reads only its slots) ...
WIDE_N, WIDE_MIN_TOKENS = 6144, 4  # ... but from 4 tokens where the output is this wide (its expand grid grows)
MAX_COLUMNS = 4096  # most stacked columns (S * R) for which the dense products pay
BLOCK = 1024  # columns of a program in the two glue kernels


def chosen(x: torch.Tensor, a: torch.Tensor, n: int) -> bool:
    """Whether ``lora_add_triton`` takes this path for tokens ``x`` [T, K], pool ``a`` [S, R, K] and ``n`` output
    columns (docs/PERFORMANCE.md, Multi-LoRA, has the timings behind the two thresholds)."""
    fewest = WIDE_MIN_TOKENS - 1 if n >= WIDE_N else MIN_TOKENS
    return x.shape[0] > fewest and a.shape[0] * a.shape[1] <= MAX_COLUMNS


@triton.jit
def _keep_own(z_ptr, slot_ptr, C, R, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    other = (offs < C) & (offs // R != slot)  # slot 0's row: ``_scale_add`` ignores it
    tl.store(z_ptr + t.to(tl.int64) * C + offs, tl.zeros([BLOCK], dtype=z_ptr.dtype.element_ty), mask=other)


@triton.jit
def _scale_add(y_ptr, delta_ptr, slot_ptr, scaling_ptr, N, stride_y, BLOCK: tl.constexpr):
    """delta[t] <- y[t] + delta[t] * scaling[slot[t]] (slot 0: y[t]), each product and sum rounded to the dtype."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dtype = delta_ptr.dtype.element_ty
    yv = tl.load(y_ptr + t.to(tl.int64) * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    row = delta_ptr + t.to(tl.int64) * N + offs
    if slot == 0:
        tl.store(row, yv.to(dtype), mask=mask)
    else:
        scale = _round(tl.load(scaling_ptr + slot), dtype)
        dv = tl.load(row, mask=mask, other=0.0).to(tl.float32)
        tl.store(row, _round(yv + _round(dv * scale, dtype), dtype).to(dtype), mask=mask)


def lora_add_stacked(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     scaling: torch.Tensor) -> torch.Tensor:
    """The twin's result; ``b`` [S, N, R] is read in place when it is a view of [N, S, R] storage."""
    (s, r, k), (t, n) = a.shape, y.shape
    if t == 0 or n == 0:
        return torch.empty_like(y)
    slots, scaling = slots.contiguous(), scaling.to(torch.float32).contiguous()
    z = x @ a.reshape(s * r, k).T  # [T, S*R]: every slot's shrink
    _keep_own[(t, triton.cdiv(s * r, BLOCK))](z, slots, s * r, r, BLOCK=BLOCK)
    delta = z @ b.permute(1, 0, 2).reshape(n, s * r).T  # [T, N]: each row its own slot's expand
    y = y if y.stride(1) == 1 else y.contiguous()
    _scale_add[(t, triton.cdiv(n, BLOCK))](y, delta, slots, scaling, n, y.stride(0), BLOCK=BLOCK)
    return delta
