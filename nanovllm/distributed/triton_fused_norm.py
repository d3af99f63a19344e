"""The Triton kernel of ``fused_norm.py``: a one-shot all-reduce over symmetric memory, residual add and RMSNorm.

Every rank's buffers come in as tensors (peers' mapped over NVLink), so Triton knows them 16-byte aligned and
moves 16 bytes a lane.  Program p copies rows p, p + P, ... of y into this rank's half of the data area, raises
its flag in every peer's pad (slot [p, rank], once the peer has taken the previous one) and takes each peer's
flag in its own (slot [p, peer]): after that, every peer's copy of the same rows is visible.  It then sums the
ranks' rows in rank order in float32, rounds the sum to y's dtype, adds the residual (rounded), and writes it
and its RMSNorm.  The last program to finish counts the call, which picks the next call's half.  Flags are
32-bit words set 0 -> 1 by the sender and 1 -> 0 by the receiver with system-scope release/acquire
compare-and-swaps, so they need no reset.  ``add_norm`` is the add and norm alone, one program a row, for rows
already summed (a call past the buffer).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _add_and_norm(summed, res_row, w, x_row, h_row, cols, live, H, eps, ZERO_CENTERED: tl.constexpr):
    """x = residual + summed, rounded to summed's dtype; h = w * RMSNorm(x) by ``rms_norm``'s rounding, or
    (``ZERO_CENTERED``) RMSNorm(x) * (1 + w) in float32, rounded once."""
    dtype = summed.dtype
    x = (tl.load(res_row + cols, mask=live, other=0.0).to(tl.float32) + summed.to(tl.float32)).to(dtype)
    tl.store(x_row + cols, x, mask=live)
    xf = x.to(tl.float32)
    normed = xf * (1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps))
    if ZERO_CENTERED:
        h = (normed * (1.0 + w)).to(dtype)
    else:
        h = (w * normed.to(dtype).to(tl.float32)).to(dtype)
    tl.store(h_row + cols, h, mask=live)


@triton.jit
def _all_reduce_add_norm_kernel(y_ptr, res_ptr, w_ptr, x_out, h_out, datas, flags, counters, M, H, stride_y, stride_r,
                                half_numel, eps, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                                ZERO_CENTERED: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dtype = y_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    live = cols < H
    calls = tl.load(counters)
    half = (calls % 2).to(tl.int64) * half_numel
    for row in range(pid, M, programs):
        tl.store(datas[RANK] + half + row * H + cols, tl.load(y_ptr + row * stride_y + cols, mask=live), mask=live)
    tl.debug_barrier()  # every thread's rows are written before the signal
    # meet program pid of every peer: raise our flag in its pad once it took the last one, then take its flag in ours
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            while tl.atomic_cas(flags[peer] + pid * WORLD + RANK, 0, 1, sem="release", scope="sys") != 0:
                pass
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            while tl.atomic_cas(flags[RANK] + pid * WORLD + peer, 1, 0, sem="acquire", scope="sys") != 1:
                pass
    tl.debug_barrier()
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    for row in range(pid, M, programs):
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            part = datas[r] + half + row * H + cols
            total += tl.load(part, mask=live, other=0.0, cache_modifier=".cg").to(tl.float32)
        _add_and_norm(total.to(dtype), res_ptr + row * stride_r, w, x_out + row * H, h_out + row * H, cols, live,
                      H, eps, ZERO_CENTERED)
    # the last program to finish moves the calls' count on (the next call's half)
    if tl.atomic_add(counters + 1, 1, sem="acq_rel") == programs - 1:
        tl.store(counters + 1, 0)
        tl.store(counters, calls + 1)


def _row_tiles(hidden: int) -> dict:
    """The launch keywords of a kernel whose program holds one whole row of ``hidden`` columns."""
    block = triton.next_power_of_2(hidden)
    return dict(BLOCK=block, num_warps=min(16, max(4, block // 512)))


def fused(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, datas: tuple, flags: tuple,
          counters: torch.Tensor, rank: int, programs: int, half_numel: int, zero_centered: bool = False):
    """``(residual + sum of y over the ranks, its RMSNorm)``; ``zero_centered``: the norm scales by ``1 + weight``.
    ``datas``: every rank's data area (two halves of ``half_numel`` elements of y's dtype), ``flags``: every rank's
    int32 flags, ``counters``: this rank's two int32 counters, all ``fused_norm``'s buffers.  At most ``programs``
    programs, so that all are resident at once."""
    x, h = torch.empty_like(y), torch.empty_like(y)
    rows, hidden = y.shape
    _all_reduce_add_norm_kernel[(min(rows, programs),)](  # profile_run.py counts it a collective by its name
        y, residual, weight, x, h, tuple(datas), tuple(flags), counters, rows, hidden, y.stride(0),
        residual.stride(0), half_numel, eps, RANK=rank, WORLD=len(datas), ZERO_CENTERED=zero_centered,
        **_row_tiles(hidden))
    return x, h


@triton.jit
def _add_norm_kernel(s_ptr, res_ptr, w_ptr, x_out, h_out, H, stride_s, stride_r, eps, BLOCK: tl.constexpr,
                     ZERO_CENTERED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < H
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    summed = tl.load(s_ptr + row * stride_s + cols, mask=live, other=0.0)
    _add_and_norm(summed, res_ptr + row * stride_r, w, x_out + row * H, h_out + row * H, cols, live, H, eps,
                  ZERO_CENTERED)


def add_norm(summed: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
             zero_centered: bool = False):
    """``(residual + summed, its RMSNorm)`` by the fused kernel's arithmetic, one program a row: what a call past
    the buffer (prefill) does after the collective sum."""
    x, h = torch.empty_like(summed), torch.empty_like(summed)
    rows, hidden = summed.shape
    if rows:
        _add_norm_kernel[(rows,)](summed, residual, weight, x, h, hidden, summed.stride(0), residual.stride(0), eps,
                                  ZERO_CENTERED=zero_centered, **_row_tiles(hidden))
    return x, h
