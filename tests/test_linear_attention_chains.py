"""Chained rows of the linear-attention ops (a verify step of speculative decoding,
``kernels/linear_attention/ops.py``): a chain of n rows, one token each, equals one prefill row of those n tokens from the chain's first slot, and the
state each row writes to its own slot equals the state after that row's token (the prefill of the chain's first
tokens up to it).  The twins are checked so against their own prefill path (itself checked against transformers in
``test_linear_attention_kernels.py``), the Triton kernels against the twins under the Triton interpreter; with
``max_chain`` 1 the ops ignore ``state_chain``.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels.linear_attention import reference as ref  # noqa: E402
from nanovllm.kernels.linear_attention import triton_kernels as tk  # noqa: E402

HK, HV, DK, DV, D, K = 2, 4, 16, 8, 24, 4
SLOTS, SCRATCH = 12, 7
# rows: a chain of 3 (slots 2, 8, 9), a row alone (slot 4), a chain of 2 (slots 1, 10), one of 3 starting without
# state (slots 5, 6, 11), a padding row (slot 7: the scratch)
CHAIN = [3, 0, 0, 1, 2, 0, 3, 0, 0, 1]
ROW_SLOTS = [2, 8, 9, 4, 1, 10, 5, 6, 11, 7]
PRIOR = [6, 0, 0, 3, 2, 0, 0, 0, 0, 0]  # earlier tokens of each chain (its first row's), 0: no state
MAX_CHAIN = 3


def decode_layout():
    """The chained step's cu_seqlens_q, context_lens (a row's tokens with its own) and state_chain."""
    rows = len(CHAIN)
    cu = torch.arange(rows + 1, dtype=torch.int32)
    context, at = [], 0
    for i, n in enumerate(CHAIN):
        if n:
            at, first = i, PRIOR[i]
        context.append(first + i - at + 1 if i < len(CHAIN) - 1 else 0)  # the padding row: no context
    return cu, torch.tensor(context, dtype=torch.int32), torch.tensor(CHAIN, dtype=torch.int64)


def chains():
    """(first row, rows) of each chain but the padding row."""
    return [(i, n) for i, n in enumerate(CHAIN[:-1]) if n]


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    T = len(CHAIN)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(T, D), w=r(D, K), conv=r(SLOTS, D, K - 1), ssm=r(SLOTS, HV, DK, DV), q=r(T, HK, DK),
                k=r(T, HK, DK), v=r(T, HV, DV), g=-torch.rand(T, HV, generator=g), beta=torch.rand(T, HV, generator=g))


def no_captures(rows):
    return torch.full((rows,), SLOTS - 1, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64)


def run_chained(t, conv_fn, delta_fn, max_chain=MAX_CHAIN):
    """(conv out, delta out, conv pool, ssm pool) of the chained step."""
    conv, ssm = t["conv"].clone(), t["ssm"].clone()
    cu, context, chain = decode_layout()
    slots = torch.tensor(ROW_SLOTS)
    rows = len(CHAIN)
    x = conv_fn(t["x"], t["w"], conv, slots, cu, context, *no_captures(rows), chain, max_chain)
    o = delta_fn(*(t[n] for n in ("q", "k", "v", "g", "beta")), ssm, slots, cu, context, *no_captures(rows), chain,
                 max_chain)
    return x, o, conv, ssm


def prefill_of(t, first, n, upto):
    """(conv out, delta out, conv state, ssm state) of the chain at ``first`` run as one prefill row of its first
    ``upto`` tokens from its first slot's states (the twins' prefill path)."""
    conv, ssm = t["conv"].clone(), t["ssm"].clone()
    rows = slice(first, first + upto)
    slot = torch.tensor([ROW_SLOTS[first]])
    cu = torch.tensor([0, upto], dtype=torch.int32)
    context = torch.tensor([PRIOR[first] + upto], dtype=torch.int32)
    x = ref.causal_conv1d_reference(t["x"][rows], t["w"], conv, slot, cu, context, *no_captures(1))
    o = ref.gated_delta_rule_reference(*(t[name][rows] for name in ("q", "k", "v", "g", "beta")), ssm, slot, cu,
                                       context, *no_captures(1))
    return x, o, conv[slot[0]], ssm[slot[0]]


def test_a_chain_is_a_prefill_row_and_each_row_keeps_the_state_after_its_token():
    t = tensors(0)
    x, o, conv, ssm = run_chained(t, ref.causal_conv1d_reference, ref.gated_delta_rule_reference)
    for first, n in chains():
        px, po, _, _ = prefill_of(t, first, n, n)
        torch.testing.assert_close(x[first:first + n], px, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[first:first + n], po, rtol=1e-4, atol=1e-5)
        for i in range(n):
            _, _, conv_i, ssm_i = prefill_of(t, first, n, i + 1)
            torch.testing.assert_close(conv[ROW_SLOTS[first + i]], conv_i, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ssm[ROW_SLOTS[first + i]], ssm_i, rtol=1e-4, atol=1e-5)
    untouched = [s for s in range(SLOTS) if s not in ROW_SLOTS]
    torch.testing.assert_close(conv[untouched], t["conv"][untouched])
    torch.testing.assert_close(ssm[untouched], t["ssm"][untouched])


def test_one_row_chains_are_the_plain_decode_step():
    """Every row alone (``state_chain`` 1): the chained path gives the unchained one's outputs and pools."""
    t = tensors(1)
    rows = len(CHAIN)
    cu = torch.arange(rows + 1, dtype=torch.int32)
    context = torch.tensor([4, 1, 7, 2, 9, 3, 5, 1, 8, 0], dtype=torch.int32)
    slots = torch.tensor(ROW_SLOTS)
    outs = []
    alone, unread = torch.ones(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64)
    for chain, max_chain in ((alone, MAX_CHAIN), (unread, 1)):  # (max_chain 1: state_chain is read nowhere)
        conv, ssm = t["conv"].clone(), t["ssm"].clone()
        x = ref.causal_conv1d_reference(t["x"], t["w"], conv, slots, cu, context, *no_captures(rows), chain,
                                        max_chain)
        o = ref.gated_delta_rule_reference(*(t[n] for n in ("q", "k", "v", "g", "beta")), ssm, slots, cu, context,
                                           *no_captures(rows), chain, max_chain)
        outs.append((x, o, conv, ssm))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_triton_kernels_match_the_twins_on_chains():
    t = tensors(2)
    want = run_chained(t, ref.causal_conv1d_reference, ref.gated_delta_rule_reference)
    got = run_chained(t, tk.causal_conv1d_triton, tk.gated_delta_rule_triton)
    real = [s for s in ROW_SLOTS if s != SCRATCH]  # the padding row's slot takes garbage in both alike
    for name, a, b in zip(("conv out", "delta out"), got[:2], want[:2]):
        torch.testing.assert_close(a[:-1], b[:-1], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(got[2][real], want[2][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3][real], want[3][real], rtol=1e-4, atol=1e-5)
