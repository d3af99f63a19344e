"""The chunked (WY) Triton kernel of the gated delta rule for prefill steps (``gated_delta_rule_chunked``), with
the contract of its twin ``reference.gated_delta_rule_reference``: q, k [T, HK, DK], v [T, HV, DV], g and beta
[T, HV] float32, contiguous; states ``ssm_state`` [S, HV, DK, DV] float32.  Each row starts from its slot's state iff
``context_lens[b] - q_len[b] > 0`` (else zeros) and writes its final state back (a row of no tokens writes back what
it started from, as the recurrent kernel does); outputs [T, HV, DV] in v's dtype.

Two launches: ``_chunk_prep`` (one program per chunk and value head, every chunk of the step at once) inverts each
chunk's unit lower-triangular I + A by forward substitution in float32 (no Neumann series: its powers of A cancel
badly when keys are alike) and writes it with the chunk's causal q.k weights to a float32 scratch; ``_chunk_scan``
(one program per row, value head and block of value dims) keeps its state slice in registers and walks the row's
chunks in order with tensor-core dots (formulas: ``gated_delta_rule_chunked``).  Float32 inputs take three tf32
passes per dot (float32 accuracy), 16-bit ones one.  Graph-capturable: the chunk table (P = (T + B (C - 1)) // C
entries, an upper bound of the chunks) is built on the device, grids depend only on shapes, no host sync.  Timings
and errors against the recurrent kernel: docs/PERFORMANCE.md.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.linear_attention.ops import CAPTURE_ALIGN


@triton.jit
def _load_rows(ptr, tok, live, head, heads, D, offs, mask_d):
    """[C, BD] of tokens ``tok`` (masked by ``live``) at ``head`` of a contiguous [T, heads, D] tensor, in its dtype."""
    ptrs = ptr + (tok[:, None].to(tl.int64) * heads + head) * D + offs[None, :]
    return tl.load(ptrs, mask=live[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _rnorm(x):
    """1 / the L2 norm of each row (eps 1e-6 as the twin's)."""
    x = x.to(tl.float32)
    return tl.rsqrt(tl.sum(x * x, 1) + 1e-6)


@triton.jit
def _chunk_prep(q_ptr, k_ptr, g_ptr, beta_ptr, start_ptr, len_ptr, ti_ptr, HK, HV, DK, scale,
                C: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    p = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // (HV // HK)
    t0 = tl.load(start_ptr + p)
    n = tl.load(len_ptr + p)
    r = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    live = r < n
    tok = t0 + r
    k = _load_rows(k_ptr, tok, live, hk, HK, DK, offs_k, offs_k < DK)
    rk = _rnorm(k)
    g = tl.load(g_ptr + tok * HV + h, mask=live, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + tok * HV + h, mask=live, other=0.0).to(tl.float32)
    gc = tl.cumsum(g, 0)
    kk = tl.dot(k, tl.trans(k), input_precision=PREC) * rk[:, None] * rk[None, :]
    upper = r[None, :] > r[:, None]  # At[j, i] = A[i, j]: kept where i > j
    At = tl.where(upper, kk * beta[None, :] * tl.exp(tl.where(upper, gc[None, :] - gc[:, None], 0.0)), 0.0)
    X = (r[:, None] == r[None, :]).to(tl.float32)
    for i in range(1, n):  # row i of (I + A)^-1 = e_i - sum_{j < i} A[i, j] * row j (rows >= i still e_j)
        a = tl.sum(tl.where(r[None, :] == i, At, 0.0), 1)
        X = tl.where(r[:, None] == i, X - tl.sum(a[:, None] * X, 0)[None, :], X)
    base = ti_ptr + (p.to(tl.int64) * HV + h) * (2 * C * C) + r[:, None] * C + r[None, :]
    tl.store(base, X)
    q = _load_rows(q_ptr, tok, live, hk, HK, DK, offs_k, offs_k < DK)
    causal = r[:, None] >= r[None, :]
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * (_rnorm(q) * scale)[:, None] * rk[None, :]
    tl.store(base + C * C, tl.where(causal, qk * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0))


@triton.jit
def _chunk_scan(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, ti_ptr, state_ptr, out_ptr, cu_ptr, chunk0_ptr, slot_ptr,
                has_state_ptr, cap_slot_ptr, cap_len_ptr, HK, HV, DK, DV, scale, C: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // (HV // HK)
    r = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < DK, offs_v < DV
    first = tl.load(cu_ptr + b)
    last = tl.load(cu_ptr + b + 1)
    chunk0 = tl.load(chunk0_ptr + b)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    has_state = (tl.zeros([BK, BV], dtype=tl.int32) + tl.load(has_state_ptr + b)) != 0
    s_ptrs = state_ptr + ((slot * HV + h) * DK + offs_k[:, None]) * DV + offs_v[None, :]
    s_mask = mask_k[:, None] & mask_v[None, :]
    S = tl.load(s_ptrs, mask=s_mask & has_state, other=0.0)
    cap_len = tl.load(cap_len_ptr + b)
    cap_chunks = tl.where((cap_len > 0) & (cap_len < last - first) & (cap_len % C == 0), cap_len // C, -1)
    cap_ptrs = state_ptr + ((tl.load(cap_slot_ptr + b).to(tl.int64) * HV + h) * DK + offs_k[:, None]) * DV \
        + offs_v[None, :]
    for c in range(0, tl.cdiv(last - first, C)):
        tok = first + c * C + r
        live = tok < last
        q = _load_rows(q_ptr, tok, live, hk, HK, DK, offs_k, mask_k)
        k = _load_rows(k_ptr, tok, live, hk, HK, DK, offs_k, mask_k)
        rq, rk = _rnorm(q) * scale, _rnorm(k)
        v = _load_rows(v_ptr, tok, live, h, HV, DV, offs_v, mask_v).to(tl.float32)
        g = tl.load(g_ptr + tok * HV + h, mask=live, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + tok * HV + h, mask=live, other=0.0).to(tl.float32)
        gc = tl.cumsum(g, 0)
        g_last = tl.sum(g, 0)
        base = ti_ptr + ((chunk0 + c).to(tl.int64) * HV + h) * (2 * C * C) + r[:, None] * C + r[None, :]
        ti = tl.load(base)
        att = tl.load(base + C * C)
        kS = tl.dot(k.to(tl.float32), S, input_precision=PREC) * (rk * beta * tl.exp(gc))[:, None]
        u = tl.dot(ti, v * beta[:, None] - kS, input_precision=PREC)
        o = tl.dot(q.to(tl.float32), S, input_precision=PREC) * (rq * tl.exp(gc))[:, None]
        o += tl.dot(att, u, input_precision=PREC)
        o_ptrs = out_ptr + (tok[:, None].to(tl.int64) * HV + h) * DV + offs_v[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=live[:, None] & mask_v[None, :])
        ud = u * (rk * tl.exp(g_last - gc))[:, None]
        S = S * tl.exp(g_last) + tl.dot(tl.trans(k.to(tl.float32)), ud, input_precision=PREC)
        if c + 1 == cap_chunks:
            tl.store(cap_ptrs, S, mask=s_mask)
    tl.store(s_ptrs, S, mask=s_mask)


def chunk_table(cu_seqlens_q: torch.Tensor, rows: int, tokens: int, C: int):
    """(first chunk of each row [B], first token [P] and token count [P] of each chunk of the step), P the static
    bound (T + B (C - 1)) // C; torch ops on the device, no host sync."""
    cu = cu_seqlens_q.long()
    n_chunks = (cu[1:] - cu[:-1] + C - 1) // C
    ends = n_chunks.cumsum(0)
    first_chunk = ends - n_chunks
    P = max(1, (tokens + rows * (C - 1)) // C)
    p = torch.arange(P, device=cu.device)
    row = torch.searchsorted(ends, p, right=True).clamp(max=rows - 1)
    start = cu[row] + (p - first_chunk[row]) * C
    length = (cu[row + 1] - start).clamp(0, C)
    return first_chunk.to(torch.int32), start.to(torch.int32), length.to(torch.int32)


def gated_delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             beta: torch.Tensor, ssm_state: torch.Tensor, state_slots: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, chunk: int = 32,
                             block_v: int = 32, precision: str | None = None, num_warps: int = 4,
                             num_stages: int = 2, prep_warps: int = 2, captures=None) -> torch.Tensor:
    """Within a chunk of C tokens (Gc the cumulative sum of g from the chunk start, S the state at its start, q
    L2-normalised and scaled by DK ** -0.5, k L2-normalised):

        A[i, j] = beta_i (k_i . k_j) exp(Gc_i - Gc_j) for i > j, else 0;        Ti = (I + A)^-1
        U = Ti @ (beta v - (beta exp(Gc) k) @ S)                                 (the deltas each token writes)
        o = (q exp(Gc)) @ S + Att @ U,    Att[i, j] = (q_i . k_j) exp(Gc_i - Gc_j) for i >= j, else 0
        S' = exp(Gc_last) S + (k exp(Gc_last - Gc))^T @ U

    Tail tokens load as zeros (beta = g = 0), which leaves U, the state and Gc_last untouched; L2 norms scale the
    dots' results, so 16-bit q and k enter the dots exactly.  ``prep_warps`` stays 2: one warp gave wrong results
    on an H200 with C = 32 (not with 64), not understood."""
    T, HK, DK = q.shape
    HV, DV = v.shape[1], v.shape[2]
    rows = context_lens.shape[0]
    if precision is None:  # float32 steps keep float32 accuracy (3 tf32 passes); 16-bit ones take one pass
        precision = "tf32x3" if q.dtype == torch.float32 else "tf32"
    q_len = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    has_state = ((context_lens - q_len) > 0).to(torch.int32)
    chunk0, start, length = chunk_table(cu_seqlens_q, rows, T, chunk)
    BK = max(16, triton.next_power_of_2(DK))
    BV = max(16, min(block_v, triton.next_power_of_2(DV)))
    ti = torch.empty(start.shape[0], HV, 2, chunk, chunk, dtype=torch.float32, device=q.device)
    _chunk_prep[(start.shape[0], HV)](q, k, g, beta, start, length, ti, HK, HV, DK, DK ** -0.5, C=chunk, BK=BK,
                                      PREC=precision, num_warps=prep_warps)
    out = torch.empty_like(v)
    if captures is None:  # (``captures``: the op's snapshot slots and lengths, multiples of CAPTURE_ALIGN)
        captures = (state_slots, torch.zeros_like(state_slots))
    # the scan stores a snapshot at a chunk's end only: one CAPTURE_ALIGN tokens in must end a chunk
    assert CAPTURE_ALIGN % chunk == 0, f"chunk {chunk} does not divide CAPTURE_ALIGN {CAPTURE_ALIGN}"
    _chunk_scan[(rows, HV, triton.cdiv(DV, BV))](q, k, v, g, beta, ti, ssm_state, out, cu_seqlens_q, chunk0,
                                                 state_slots, has_state, *captures, HK, HV, DK, DV, DK ** -0.5,
                                                 C=chunk, BK=BK, BV=BV, PREC=precision, num_warps=num_warps,
                                                 num_stages=num_stages)
    return out
