"""Triton kernels of the linear-attention ops, with the contracts of their twins (``reference.py``): the causal
depthwise convolution over each row's history and the gated delta rule, for prefill and decode alike.

* ``causal_conv1d_triton``: one program per (block of tokens, block of channels) sums the K taps, reading taps
  before a row's first token from its slot's state (zeros for a new row), then one program per (row, channel block)
  writes the row's last K-1 inputs back to its slot (after every token program has read the old state: a second
  launch), and a snapshot's inputs inside a row's chunk first.  A decode step (as many tokens as rows) takes one
  launch: a program per (row, channel block) does both; with chains (a verify step, ``ops.py``) a chain's first row
  walks its rows' tokens and then writes each row's K-1 inputs to the row's slot, its own (the chain's source) last.
* ``gated_delta_rule_triton``: a decode step (as many tokens as rows) runs the recurrent kernel, one program per
  (row, value head, block of value dims) keeping its slice of the float32 state [DK, BV] in registers, walking
  the row's tokens in order (L2-normalising q and k, decaying, writing the delta, reading the output) and storing
  the slice back in the row's slot (with chains: a chain's first row walks its rows, storing the slice after each
  in that row's slot); every other step runs the chunked WY kernel (``triton_chunked.py``).
Token-to-row maps are built with torch ops before the launch: no host sync, so both are graph-capturable.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.linear_attention.reference import row_layout
from nanovllm.kernels.linear_attention.triton_chunked import gated_delta_rule_chunked

CONV_TOKENS = 16  # tokens a convolution program computes (each over a block of 256 channels)
DECODE_BV, DECODE_WARPS = 128, 4  # the recurrent kernel's value block and warps: the best of the H100 sweep


@triton.jit
def _conv_tokens(x_ptr, w_ptr, state_ptr, out_ptr, row_ptr, local_ptr, slot_ptr, has_state_ptr, T, D,
                 stride_x, stride_s0, stride_s1, K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    mask_t, mask = offs_t < T, offs < D
    row = tl.load(row_ptr + offs_t, mask=mask_t, other=0)
    local = tl.load(local_ptr + offs_t, mask=mask_t, other=0)
    slot = tl.load(slot_ptr + row, mask=mask_t, other=0).to(tl.int64)
    has_state = tl.load(has_state_ptr + row, mask=mask_t, other=0) != 0
    both = mask_t[:, None] & mask[None, :]
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(K):
        src = local + j - (K - 1)  # the tap's index in the token's row; < 0: from the slot's state
        w = tl.load(w_ptr + offs * K + j, mask=mask, other=0.0).to(tl.float32)
        from_x = tl.load(x_ptr + (offs_t + j - (K - 1))[:, None] * stride_x + offs[None, :],
                         mask=both & (src >= 0)[:, None], other=0.0)
        col = tl.maximum(src + K - 1, 0)
        from_state = tl.load(state_ptr + slot[:, None] * stride_s0 + offs[None, :] * stride_s1 + col[:, None],
                             mask=both & ((src < 0) & has_state)[:, None], other=0.0)
        acc += w[None, :] * (from_x.to(tl.float32) + from_state.to(tl.float32))
    tl.store(out_ptr + offs_t[:, None] * D + offs[None, :], _silu_rounded(acc, out_ptr.dtype.element_ty), mask=both)


@triton.jit
def _silu_rounded(acc, dtype: tl.constexpr):
    """SiLU of the float32 sum rounded to ``dtype`` first, as the twin rounds it (``reference.py``), in ``dtype``."""
    acc = acc.to(dtype).to(tl.float32)
    return (acc / (1.0 + tl.exp(-acc))).to(dtype)


@triton.jit
def _conv_state(x_ptr, state_ptr, cu_ptr, slot_ptr, has_state_ptr, cap_slot_ptr, cap_len_ptr, D, stride_x,
                stride_s0, stride_s1, K: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0)
    q_len = tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)
    cap_len = tl.load(cap_len_ptr + b)
    if (cap_len > 0) & (cap_len < q_len):  # a snapshot inside the chunk: before the final write, which it may read
        _write_state(x_ptr, state_ptr, cu_ptr, slot_ptr, has_state_ptr, D, stride_x, stride_s0, stride_s1, K, BD,
                     cap_len, tl.load(cap_slot_ptr + b))
    _write_state(x_ptr, state_ptr, cu_ptr, slot_ptr, has_state_ptr, D, stride_x, stride_s0, stride_s1, K, BD,
                 q_len, tl.load(slot_ptr + b))


@triton.jit
def _conv_rows(x_ptr, w_ptr, state_ptr, out_ptr, cu_ptr, slot_ptr, has_state_ptr, chain_ptr, D, stride_x,
               stride_s0, stride_s1, K: tl.constexpr, BD: tl.constexpr, CHAINED: tl.constexpr):
    """A row's tokens in order (a decode step: one; ``CHAINED``: its chain's, none for a row that continues one),
    each as ``_conv_tokens`` sums it, then its state written back: the program reads its slot before writing it."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = offs < D
    if CHAINED:  # one token a row: the chain's tokens are its rows'
        first = b.to(tl.int64)
        last = first + tl.load(chain_ptr + b)
    else:
        first = tl.load(cu_ptr + b)
        last = tl.load(cu_ptr + b + 1)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    zero = tl.zeros([BD], dtype=tl.int32)
    has_state = (zero + tl.load(has_state_ptr + b)) != 0
    base = state_ptr + slot * stride_s0 + offs * stride_s1
    for t in range(first, last):
        acc = tl.zeros([BD], dtype=tl.float32)
        for j in tl.static_range(K):
            src = zero + (t - first + j - (K - 1))  # the tap's index in the row; < 0: from the slot's state
            w = tl.load(w_ptr + offs * K + j, mask=mask, other=0.0).to(tl.float32)
            from_x = tl.load(x_ptr + (t + j - (K - 1)) * stride_x + offs, mask=mask & (src >= 0), other=0.0)
            from_state = tl.load(base + tl.maximum(src + K - 1, 0), mask=mask & (src < 0) & has_state, other=0.0)
            acc += w * (from_x.to(tl.float32) + from_state.to(tl.float32))
        tl.store(out_ptr + t * D + offs, _silu_rounded(acc, out_ptr.dtype.element_ty), mask=mask)
    if CHAINED:
        n = last - first
        for r in range(0, n):  # the last row's first: the chain's own slot, which the others read, is written last
            i = n - 1 - r
            _write_state(x_ptr, state_ptr, cu_ptr, slot_ptr, has_state_ptr, D, stride_x, stride_s0, stride_s1, K,
                         BD, i + 1, tl.load(slot_ptr + first + i))
    else:
        _write_state(x_ptr, state_ptr, cu_ptr, slot_ptr, has_state_ptr, D, stride_x, stride_s0, stride_s1, K, BD,
                     last - first, slot)


@triton.jit
def _write_state(x_ptr, state_ptr, cu_ptr, slot_ptr, has_state_ptr, D, stride_x, stride_s0, stride_s1,
                 K: tl.constexpr, BD: tl.constexpr, q_len, to_slot):
    """The K-1 inputs of row ``program_id(0)`` before its ``q_len``-th token of the step (from x, or its old state
    where the row is shorter) into slot ``to_slot`` (its own: after its last token, ``q_len`` its tokens)."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = offs < D
    first = tl.load(cu_ptr + b)
    old = state_ptr + tl.load(slot_ptr + b).to(tl.int64) * stride_s0 + offs * stride_s1
    zero = tl.zeros([BD], dtype=tl.int64)
    has_state = (zero + tl.load(has_state_ptr + b)) != 0
    base = state_ptr + to_slot.to(tl.int64) * stride_s0 + offs * stride_s1
    for m in tl.static_range(K - 1):  # ascending: column m reads column m + q_len (> m) before it is written
        src = zero + q_len - (K - 1) + m
        from_x = tl.load(x_ptr + (first + src) * stride_x + offs, mask=mask & (src >= 0), other=0.0)
        col = tl.maximum(src + K - 1, 0)
        from_state = tl.load(old + col, mask=mask & (src < 0) & has_state, other=0.0)
        value = tl.where(src >= 0, from_x.to(tl.float32), from_state.to(tl.float32))
        tl.store(base + m, value.to(state_ptr.dtype.element_ty), mask=mask)


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, state_slots: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, capture_slots: torch.Tensor,
                         capture_lens: torch.Tensor, state_chain: torch.Tensor | None = None,
                         max_chain: int = 1) -> torch.Tensor:
    T, D = x.shape
    K, rows = weight.shape[1], context_lens.shape[0]
    out = torch.empty_like(x)
    weight = weight.contiguous()
    BD, BT = 256, CONV_TOKENS
    if T == rows:  # a decode step: one launch
        q_len = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        has_state = ((context_lens - q_len) > 0).to(torch.int32)
        chained = max_chain > 1
        _conv_rows[(rows, triton.cdiv(D, BD))](x, weight, conv_state, out, cu_seqlens_q, state_slots, has_state,
                                               state_chain if chained else state_slots, D, x.stride(0),
                                               conv_state.stride(0), conv_state.stride(1), K=K, BD=BD,
                                               CHAINED=chained)
        return out
    row, local, _, has_state = row_layout(cu_seqlens_q, context_lens, T)
    has_state = has_state.to(torch.int32)
    _conv_tokens[(triton.cdiv(T, BT), triton.cdiv(D, BD))](x, weight, conv_state, out, row, local, state_slots,
                                                           has_state, T, D, x.stride(0), conv_state.stride(0),
                                                           conv_state.stride(1), K=K, BT=BT, BD=BD)
    _conv_state[(rows, triton.cdiv(D, BD))](x, conv_state, cu_seqlens_q, state_slots, has_state, capture_slots,
                                            capture_lens, D, x.stride(0), conv_state.stride(0), conv_state.stride(1),
                                            K=K, BD=BD)
    return out


@triton.jit
def _delta_rule(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, out_ptr, cu_ptr, slot_ptr, has_state_ptr, chain_ptr,
                HK, HV, DK, DV, scale, BK: tl.constexpr, BV: tl.constexpr, CHAINED: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // (HV // HK)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < DK, offs_v < DV
    if CHAINED:  # one token a row: the chain's tokens are its rows' (none for a row that continues a chain)
        first = b.to(tl.int64)
        last = first + tl.load(chain_ptr + b)
    else:
        first = tl.load(cu_ptr + b)
        last = tl.load(cu_ptr + b + 1)
    slot = tl.load(slot_ptr + b)
    has = tl.load(has_state_ptr + b)
    if CHAINED:
        has = has * tl.minimum(last - first, 1)  # a row that continues a chain reads no state
    has_state = (tl.zeros([BK, BV], dtype=tl.int32) + has) != 0
    state_offs = (h * DK + offs_k[:, None]) * DV + offs_v[None, :]
    s_ptrs = state_ptr + slot * HV * DK * DV + state_offs
    s_mask = mask_k[:, None] & mask_v[None, :]
    S = tl.load(s_ptrs, mask=s_mask & has_state, other=0.0)
    for t in range(first, last):
        qk_off = (t * HK + hk) * DK + offs_k
        q = tl.load(q_ptr + qk_off, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + qk_off, mask=mask_k, other=0.0).to(tl.float32)
        q = q * tl.rsqrt(tl.sum(q * q) + 1e-6) * scale
        k = k * tl.rsqrt(tl.sum(k * k) + 1e-6)
        v = tl.load(v_ptr + (t * HV + h) * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + t * HV + h)
        beta = tl.load(beta_ptr + t * HV + h)
        S = S * tl.exp(g)
        delta = (v - tl.sum(S * k[:, None], 0)) * beta
        S = S + k[:, None] * delta[None, :]
        o = tl.sum(S * q[:, None], 0)
        tl.store(out_ptr + (t * HV + h) * DV + offs_v, o.to(out_ptr.dtype.element_ty), mask=mask_v)
        if CHAINED:  # the state after this row's token, in the row's slot
            tl.store(state_ptr + tl.load(slot_ptr + t) * HV * DK * DV + state_offs, S, mask=s_mask)
    if not CHAINED:
        tl.store(s_ptrs, S, mask=s_mask)


def gated_delta_rule_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            ssm_state: torch.Tensor, state_slots: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, capture_slots: torch.Tensor, capture_lens: torch.Tensor,
                            state_chain: torch.Tensor | None = None, max_chain: int = 1) -> torch.Tensor:
    if q.shape[0] == context_lens.shape[0]:  # a decode step: no snapshot inside one token
        return gated_delta_rule_recurrent(q, k, v, g, beta, ssm_state, state_slots, cu_seqlens_q, context_lens,
                                          chains=state_chain if max_chain > 1 else None)
    return gated_delta_rule_chunked(q, k, v, g, beta, ssm_state, state_slots, cu_seqlens_q, context_lens,
                                    captures=(capture_slots, capture_lens))


def gated_delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, ssm_state: torch.Tensor, state_slots: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_v: int = DECODE_BV,
                               num_warps: int = DECODE_WARPS, chains: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token, any step (decode steps run it; prefill steps run the chunked kernel); each program holds a
    [DK, ``block_v``] slice of a row's state (``benchmarks/kernel_bench.py --delta`` times the choices).  ``chains``:
    a decode step's ``state_chain`` (``ops.py``), its chains' rows walked in order."""
    T, HK, DK = q.shape
    HV, DV = v.shape[1], v.shape[2]
    rows = context_lens.shape[0]
    q_len = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    has_state = ((context_lens - q_len) > 0).to(torch.int32)
    out = torch.empty_like(v)
    BK = triton.next_power_of_2(DK)
    BV = min(block_v, triton.next_power_of_2(DV))
    _delta_rule[(rows, HV, triton.cdiv(DV, BV))](q, k, v, g, beta, ssm_state, out, cu_seqlens_q, state_slots,
                                                 has_state, state_slots if chains is None else chains, HK, HV, DK,
                                                 DV, DK ** -0.5, BK=BK, BV=BV, CHAINED=chains is not None,
                                                 num_warps=num_warps)
    return out
