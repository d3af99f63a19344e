"""``nanovllm::lora_add`` on CUDA (``lora_add_triton``): past a few tokens (``stacked.chosen``) the stacked products
(``stacked.py``), else these per-slot kernels (``lora_add_slots``; Punica's SGMV design without the sort), both
with the twin's contract (``reference.lora_add_reference``, rounded as PEFT rounds).  Two launches (three past
``SLOT_AXIS_TOKENS``, where the stacked pool is too wide for ``stacked.py``):

* Shrink, split over K: a program takes a block of BT tokens, one of ``P`` ranges of K and a slot, and ``tl.dot``s
  that slot's rows of x (the others masked: never read) with the slot's ``a`` tile, into a float32 [P, T, BR]
  buffer.  P grows as tokens shrink, so one decode token still spreads its K over many SMs.
* Expand: a program takes a block of tokens, one of N and a slot; it adds its rows' P partial sums in order
  (deterministic, no atomics; past ``SLOT_AXIS_TOKENS`` a reduce launch adds them first), rounds, ``tl.dot``s
  them with the slot's ``b`` tile, scales and adds to ``y``.
Up to ``SLOT_AXIS_TOKENS`` tokens (small decode batches) the slot is a grid axis and programs whose slot has no
token in their block exit at once; past it a program walks the slots present in its block.  Grids come from
shapes alone: no host sync, graph capture holds.  ``lora_expand_triton`` is the expand launch alone, on a shrink
the base product already made (``folded.py``).
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.lora import stacked
from nanovllm.kernels.pdl import pdl_begin, pdl_launch
from nanovllm.kernels.triton_common import _dot, _dot_precision  # "upcast" off GPU (interpreter's bf16 dot)
from nanovllm.kernels.triton_rope_store import _round  # to the dtype, nearest even (the interpreter's cast truncates)

BT_MAX, BK, BN = 64, 64, 64  # token block (tl.dot's M, 16 to 64), K step of the shrink, N block of the expand
P_MAX = 16  # most K splits the expand adds itself (more: a reduce launch adds them first)
TARGET_PROGRAMS = 256  # (token block, split) pairs to aim for (about two per SM of an H100)
PARTIAL_BYTES = 32 << 20  # at most this much float32 for the shrink's partial sums
SLOT_AXIS_TOKENS = 16  # up to this many tokens, one program per slot; past it, each walks its block's slots


@triton.jit
def _slot_range(slot, mask_t, S, SLOT_AXIS: tl.constexpr, FIRST: tl.constexpr):
    """(first, end) of the slots this program serves, and the token rows it owns, from grid axis 2."""
    if SLOT_AXIS:
        lo = tl.program_id(2) + FIRST
        return lo, lo + 1, mask_t & (slot == lo)
    return FIRST, S, mask_t


@triton.jit
def _shrink(x_ptr, a_ptr, slot_ptr, part_ptr, T, K, R, S, K_PER, stride_x, stride_a0, stride_a1,
            BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, SLOT_AXIS: tl.constexpr,
            PDL: tl.constexpr):
    pdl_begin(PDL)
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    slot = tl.load(slot_ptr + offs_t, mask=mask_t, other=0)
    lo, hi, owned = _slot_range(slot, mask_t, S, SLOT_AXIS, 1)
    if tl.max(owned.to(tl.int32), axis=0) == 0:
        return
    offs_r = tl.arange(0, BR)
    mask_r = offs_r < R
    rows = offs_t[:, None].to(tl.int64)
    k_lo = tl.program_id(1) * K_PER
    acc = tl.zeros([BT, BR], dtype=tl.float32)
    for s in range(lo, hi):
        mine = owned & (slot == s)
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            for k0 in range(k_lo, k_lo + K_PER, BK):
                offs_k = k0 + tl.arange(0, BK)
                mask_k = offs_k < K
                xv = tl.load(x_ptr + rows * stride_x + offs_k[None, :], mask=mine[:, None] & mask_k[None, :],
                             other=0.0)
                av = tl.load(a_ptr + s * stride_a0 + offs_r[None, :] * stride_a1 + offs_k[:, None],
                             mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # a[s].T block [BK, BR]
                acc += _dot(xv, av, PREC)
    part = part_ptr + tl.program_id(1).to(tl.int64) * T * BR
    tl.store(part + rows * BR + offs_r[None, :], acc, mask=owned[:, None])


@triton.jit
def _reduce(part_ptr, T, P, BT: tl.constexpr, BR: tl.constexpr, PDL: tl.constexpr):
    """Adds the P partial sums of a block of rows, in order, into the first."""
    pdl_begin(PDL)
    offs = tl.program_id(0) * BT * BR + tl.arange(0, BT * BR)
    mask = offs < T * BR
    acc = tl.zeros([BT * BR], dtype=tl.float32)
    for p in range(0, P):
        acc += tl.load(part_ptr + p * T * BR + offs, mask=mask, other=0.0)
    tl.store(part_ptr + offs, acc, mask=mask)


@triton.jit
def _expand(y_ptr, part_ptr, b_ptr, slot_ptr, scaling_ptr, out_ptr, T, N, R, S, P, stride_y, stride_out,
            stride_b0, stride_b1, stride_pp, stride_pt, stride_ps, BT: tl.constexpr, BR: tl.constexpr,
            BN: tl.constexpr, P_MAX: tl.constexpr, PREC: tl.constexpr, SLOT_AXIS: tl.constexpr, PDL: tl.constexpr):
    """Partial sums p of token t's slot s at ``part_ptr + p*stride_pp + t*stride_pt + s*stride_ps`` (the shrink's
    buffer: [P, T, BR], ``stride_ps`` 0; a stacked shrink's product: one sum, slot s in columns s*R..)."""
    pdl_begin(PDL)
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    slot = tl.load(slot_ptr + offs_t, mask=mask_t, other=0)
    lo, hi, owned = _slot_range(slot, mask_t, S, SLOT_AXIS, 0)  # slot 0's program copies its rows of y
    if tl.max(owned.to(tl.int32), axis=0) == 0:
        return
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    rows = offs_t[:, None].to(tl.int64)
    yv = tl.load(y_ptr + rows * stride_y + offs_n[None, :], mask=owned[:, None] & mask_n[None, :],
                 other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    offs_r = tl.arange(0, BR)
    mask_r = offs_r < R
    out = yv
    for s in range(lo, hi):
        mine = owned & (slot == s) & (slot != 0)  # slot 0 adds nothing
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            sums = tl.zeros([BT, BR], dtype=tl.float32)
            for p in tl.static_range(P_MAX):  # in order: the same sums every run; loads issued together
                live = tl.full([1, BR], p, tl.int32) < P
                sums += tl.load(part_ptr + p * stride_pp + rows * stride_pt + s * stride_ps + offs_r[None, :],
                                mask=(mine[:, None] & mask_r[None, :]) & live, other=0.0)
            sv = _round(sums, dtype).to(dtype)  # the shrink result in the dtype, as PEFT's (exact cast)
            bv = tl.load(b_ptr + s * stride_b0 + offs_n[None, :] * stride_b1 + offs_r[:, None],
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # b[s].T block [BR, BN]
            delta = _round(_dot(sv, bv, PREC), dtype)  # the expand result in the dtype
            scale = _round(tl.load(scaling_ptr + s), dtype)
            out = tl.where(mine[:, None], _round(yv + _round(delta * scale, dtype), dtype), out)
    tl.store(out_ptr + rows * stride_out + offs_n[None, :], out.to(dtype), mask=owned[:, None] & mask_n[None, :])


def token_block(T: int) -> int:
    """Rows of a program's token block for ``T`` tokens: a power of two, 16 (tl.dot's least) to ``BT_MAX``."""
    return min(BT_MAX, max(16, triton.next_power_of_2(T)))


def split_k(T: int, K: int, BR: int) -> tuple[int, int]:
    """(splits P, K per split) of the shrink: about ``TARGET_PROGRAMS`` (block, split) pairs within
    ``PARTIAL_BYTES``; at most ``P_MAX`` where the expand adds them (up to ``SLOT_AXIS_TOKENS`` tokens)."""
    k_blocks = triton.cdiv(K, BK)
    p = min(k_blocks, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(T, token_block(T))),
            max(1, PARTIAL_BYTES // (T * BR * 4)))
    p = min(p, P_MAX) if T <= SLOT_AXIS_TOKENS else p
    k_per = triton.cdiv(k_blocks, p) * BK
    return triton.cdiv(K, k_per), k_per


def lora_add_triton(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    scaling: torch.Tensor) -> torch.Tensor:
    """The op on CUDA: the stacked products past a few tokens (``stacked.chosen``), else the
    per-slot kernels (``lora_add_slots``)."""
    fn = stacked.lora_add_stacked if stacked.chosen(x, a, y.shape[1]) else lora_add_slots
    return fn(y, x, slots, a, b, scaling)


def lora_add_slots(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scaling: torch.Tensor) -> torch.Tensor:
    (T, N), K, (S, R) = y.shape, x.shape[1], a.shape[:2]
    out = torch.empty((T, N), dtype=y.dtype, device=y.device)
    if T == 0 or N == 0:
        return out
    x, a = x.contiguous(), a.contiguous()
    b = b if b.stride(2) == 1 else b.contiguous()  # the pool's [S, N, R] view of [N, S, R]: read in place
    y = y if y.stride(1) == 1 else y.contiguous()
    slots, scaling = slots.contiguous(), scaling.to(torch.float32).contiguous()
    BT, BR = token_block(T), max(16, triton.next_power_of_2(R))
    prec = _dot_precision(x)  # exact fp32 for fp32; bf16 and fp16 products are exact in any mode
    P, k_per = split_k(T, K, BR)
    part = torch.empty((P, T, BR), dtype=torch.float32, device=x.device)
    axis = T <= SLOT_AXIS_TOKENS
    blocks = triton.cdiv(T, BT)
    pdl = pdl_launch(x.device)  # launch latency overlaps the kernel ahead (``kernels/pdl.py``)
    if S > 1:
        _shrink[(blocks, P, S - 1 if axis else 1)](x, a, slots, part, T, K, R, S, k_per, x.stride(0), a.stride(0),
                                                   a.stride(1), BT=BT, BR=BR, BK=BK, PREC=prec, SLOT_AXIS=axis, **pdl)
    if not axis and P > 1:  # larger blocks: the sums in one more launch, not in every expand program
        _reduce[(blocks,)](part, T, P, BT=BT, BR=BR, **pdl)
        P = 1
    _expand[(blocks, triton.cdiv(N, BN), S if axis else 1)](
        y, part, b, slots, scaling, out, T, N, R, S, P, y.stride(0), out.stride(0), b.stride(0), b.stride(1),
        T * BR, BR, 0, BT=BT, BR=BR, BN=BN, P_MAX=P_MAX if axis else 1, PREC=prec, SLOT_AXIS=axis, **pdl)
    return out


def lora_expand_triton(y: torch.Tensor, h: torch.Tensor, slots: torch.Tensor, b: torch.Tensor,
                       scaling: torch.Tensor) -> torch.Tensor:
    """``reference.lora_expand_reference`` on CUDA: the expand kernel alone (a slot axis up to ``SLOT_AXIS_TOKENS``, as
    ``lora_add_slots``'s), reading each token's own slot's columns of ``h`` (a strided view is read in place: the
    columns past a projection's base outputs, ``folded.py``)."""
    (T, N), (S, _, R) = y.shape, b.shape
    out = torch.empty((T, N), dtype=y.dtype, device=y.device)
    if T == 0 or N == 0:
        return out
    b = b if b.stride(2) == 1 else b.contiguous()
    y = y if y.stride(1) == 1 else y.contiguous()
    h = h if h.stride(1) == 1 else h.contiguous()
    slots, scaling = slots.contiguous(), scaling.to(torch.float32).contiguous()
    BT, BR = token_block(T), max(16, triton.next_power_of_2(R))
    axis = T <= SLOT_AXIS_TOKENS
    _expand[(triton.cdiv(T, BT), triton.cdiv(N, BN), S if axis else 1)](
        y, h, b, slots, scaling, out, T, N, R, S, 1, y.stride(0), out.stride(0), b.stride(0), b.stride(1),
        0, h.stride(0), R, BT=BT, BR=BR, BN=BN, P_MAX=1, PREC=_dot_precision(h), SLOT_AXIS=axis,
        **pdl_launch(y.device))
    return out
