"""Pure-PyTorch twins of the linear-attention ops (``ops.py``): the CPU path and the oracle of the Triton kernels.

Layout of a step (as for paged attention, ``kernels/reference.py``): the tokens of sequence row ``b`` are
``cu_seqlens_q[b]:cu_seqlens_q[b+1]``; ``context_lens[b]`` counts its tokens including this step's, so the row
carries a state from earlier steps iff ``context_lens[b] - q_len[b] > 0``.  A step with as many tokens as rows is a
decode step, one token per row (the engine's contract, which the attention kernels rely on as well).

Static shapes only (no host sync): a prefill loops over the step's token count, each row advancing through its own
tokens under a mask; a decode step is one update.  Math as transformers' torch fallbacks compute it in float32:
the convolution sums K taps and applies SiLU; the gated delta rule L2-normalises q and k (eps 1e-6), scales q by
``DK ** -0.5``, and per token decays the state by ``exp(g)``, writes ``k (beta (v - S^T k))^T`` and reads
``S^T q``.
"""
import torch
import torch.nn.functional as F


def chain_layout(state_chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first row of each row's chain [B], the row's place in it [B]) of a decode or verify step, from
    ``state_chain`` (n at a chain's first row, 0 at the n - 1 rows that continue it)."""
    idx = torch.arange(state_chain.shape[0], device=state_chain.device)
    head = torch.cummax(torch.where(state_chain > 0, idx, 0), 0).values
    return head, idx - head


def row_layout(cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, tokens: int):
    """(row of each token [T], each token's index in its row [T], tokens per row [B], whether each row starts from a
    stored state [B])."""
    cu = cu_seqlens_q.long()
    rows = context_lens.shape[0]
    t = torch.arange(tokens, device=cu.device)
    row = torch.searchsorted(cu[1:], t, right=True).clamp(max=rows - 1)
    q_len = cu[1:] - cu[:-1]
    has_state = (context_lens.long() - q_len) > 0
    return row, t - cu[row], q_len, has_state


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor,
                            state_slots: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            capture_slots: torch.Tensor, capture_lens: torch.Tensor,
                            state_chain: torch.Tensor | None = None, max_chain: int = 1) -> torch.Tensor:
    """SiLU of the causal depthwise convolution of ``x`` [T, D] by ``weight`` [D, K], each row's history taken
    from its slot of ``conv_state`` [S, D, K-1] (zeros for a new row); the last K-1 inputs of each row are written
    back to its slot, and, where ``0 < capture_lens[b] < q_len[b]`` (a prefill step's snapshot), the K-1 inputs
    before its ``capture_lens[b]``-th token to slot ``capture_slots[b]``.  Returns [T, D] in x's dtype, rounded
    twice as transformers' ``causal_conv1d_fn`` rounds it (a convolution in x's dtype, then SiLU): the float32 sum
    to x's dtype, then its SiLU.  A decode step with chains (``max_chain`` > 1, ``ops.py``): a chain's rows are one
    row's tokens in order from its first row's slot, each row's K-1 inputs written to its own slot."""
    T, D = x.shape
    K = weight.shape[1]
    row, local, q_len, has_state = row_layout(cu_seqlens_q, context_lens, T)
    chained = max_chain > 1 and T == context_lens.shape[0]
    if chained:  # each token a row of one: its chain's first row gives the slot it starts from
        row, local = chain_layout(state_chain)
    slots = state_slots.long()
    old = conv_state[slots].float()  # [B, D, K-1], read before any row writes
    xf, w = x.float(), weight.float()
    acc = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    t = torch.arange(T, device=x.device)
    for j in range(K):
        back = j - (K - 1)  # this tap reads the input `back` tokens before (<= 0)
        src = local + back
        from_x = xf[(t + back).clamp(min=0)]
        from_state = old[row, :, (src + K - 1).clamp(0, K - 2)] * has_state[row, None]
        acc += torch.where((src >= 0)[:, None], from_x, from_state) * w[:, j]
    cu = cu_seqlens_q.long()

    def inputs_before(length, first=cu[:-1], owner=None):  # [B, D, K-1]: each row's K-1 inputs before its
        # ``length``-th token of the step (chained: before a row's own token's successor in its chain, ``owner``)
        owner = torch.arange(length.shape[0], device=x.device) if owner is None else owner
        cols = []
        for m in range(K - 1):
            src = length - (K - 1) + m  # local index of the input that ends up in state column m
            from_x = xf[(first + src).clamp(0, max(T - 1, 0))]
            from_state = torch.gather(old[owner], 2,
                                      (src + K - 1).clamp(0, K - 2)[:, None, None].expand(-1, D, 1))[..., 0]
            cols.append(torch.where((src >= 0)[:, None], from_x, from_state * has_state[owner, None]))
        return torch.stack(cols, dim=-1)

    if T != context_lens.shape[0]:  # (a decode step takes no snapshot)
        cap = capture_slots.long()
        taken = ((capture_lens > 0) & (capture_lens < q_len))[:, None, None]
        conv_state[cap] = torch.where(taken, inputs_before(capture_lens.long()), conv_state[cap].float()).to(
            conv_state.dtype)
    if chained:
        conv_state[slots] = inputs_before(local + 1, row, row).to(conv_state.dtype)
    else:
        conv_state[slots] = inputs_before(q_len).to(conv_state.dtype)
    return F.silu(acc.to(x.dtype).float()).to(x.dtype)  # rounded before the SiLU too, as transformers' conv


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last dim, in float32 (fla's and transformers' rule)."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def gated_delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, ssm_state: torch.Tensor, state_slots: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, capture_slots: torch.Tensor,
                               capture_lens: torch.Tensor, state_chain: torch.Tensor | None = None,
                               max_chain: int = 1) -> torch.Tensor:
    """The gated delta rule over each row's tokens: q, k [T, HK, DK], v [T, HV, DV] (HV a multiple of HK: each
    q/k head serves HV/HK consecutive value heads), log decays ``g`` and rates ``beta`` [T, HV] (float32), states
    ``ssm_state`` [S, HV, DK, DV] float32; where ``0 < capture_lens[b] < q_len[b]``, the row's state after its
    first ``capture_lens[b]`` tokens is written to slot ``capture_slots[b]`` too (a multiple of ``CAPTURE_ALIGN``
    tokens, ``ops.py``).  A decode step with chains (``max_chain`` > 1): a chain's rows update in order from its
    first row's slot, each writing the state after it to its own slot.  Returns the outputs [T, HV, DV] in v's
    dtype."""
    T, HK, DK = q.shape
    HV = v.shape[1]
    row, local, q_len, has_state = row_layout(cu_seqlens_q, context_lens, T)
    slots = state_slots.long()
    qf = (l2_normalize(q) * DK ** -0.5).repeat_interleave(HV // HK, dim=1)
    kf = l2_normalize(k).repeat_interleave(HV // HK, dim=1)
    vf, gf, bf = v.float(), g.float(), beta.float()
    state = ssm_state[slots].float() * has_state[:, None, None, None]  # [B, HV, DK, DV]

    def update(S, qt, kt, vt, gt, bt):
        S = S * gt.exp()[..., None, None]
        delta = (vt - (S * kt[..., None]).sum(-2)) * bt[..., None]
        S = S + kt[..., None] * delta[..., None, :]
        return S, (S * qt[..., None]).sum(-2)

    if T == context_lens.shape[0] and max_chain > 1:  # decode or verify: chains of rows, in order
        _, place = chain_layout(state_chain)
        start, out = state, torch.zeros(T, HV, v.shape[2], dtype=torch.float32, device=v.device)
        for i in range(max_chain):  # rows at place i continue from the state after the row before
            new, o = update(start if i == 0 else state.roll(1, 0), qf, kf, vf, gf, bf)
            here = place == i
            state = torch.where(here[:, None, None, None], new, state)
            out = torch.where(here[:, None, None], o, out)
    elif T == context_lens.shape[0]:  # decode: one token per row
        state, out = update(state, qf, kf, vf, gf, bf)
    else:
        out = torch.zeros(T + 1, HV, v.shape[2], dtype=torch.float32, device=v.device)  # row T: a sink
        first = cu_seqlens_q.long()[:-1]
        cap = capture_slots.long()
        captured = ssm_state[cap].float()
        taken = (capture_lens > 0) & (capture_lens < q_len)
        for i in range(T):
            live = i < q_len
            idx = (first + i).clamp(max=T - 1)
            new, o = update(state, qf[idx], kf[idx], vf[idx], gf[idx], bf[idx])
            state = torch.where(live[:, None, None, None], new, state)
            captured = torch.where((taken & (capture_lens == i + 1))[:, None, None, None], state, captured)
            out[torch.where(live, idx, T)] = o
        out = out[:T]
        ssm_state[cap] = captured.to(ssm_state.dtype)
    ssm_state[slots] = state.to(ssm_state.dtype)
    return out.to(v.dtype)
