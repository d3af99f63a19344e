"""The linear-attention ops (nanovllm/kernels/linear_attention): the PyTorch twins against transformers' own torch
implementations of the convolution and the gated delta rule (an independent oracle: a prompt cut into chunks with
the states carried across equals the whole prompt at once, a decode step equals transformers' recurrent step),
and the Triton kernels against the twins on CPU under the Triton interpreter: mixed prefill batches (rows with and
without states, padding rows, a row of no tokens) and decode batches, outputs and every slot of the pools.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels.linear_attention import reference as ref  # noqa: E402
from nanovllm.kernels.linear_attention import triton_kernels as tk  # noqa: E402

HK, HV, DK, DV, D, K = 2, 4, 16, 8, 24, 4


def layout(q_lens, prior):
    """cu_seqlens_q and context_lens of rows with ``q_lens`` new tokens after ``prior`` earlier ones."""
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return cu, (torch.tensor(q_lens) + torch.tensor(prior)).to(torch.int32)


def none(rows):
    """Capture slots and lengths of a step that snapshots nothing."""
    return torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64)


def step_tensors(T, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(q=r(T, HK, DK), k=r(T, HK, DK), v=r(T, HV, DV), g=-torch.rand(T, HV, generator=g),
                beta=torch.rand(T, HV, generator=g))


def test_twins_over_chunks_equal_transformers_on_the_whole_prompt():
    from transformers.models.qwen3_next import modeling_qwen3_next as hf
    T, split = 23, 9
    x = torch.randn(T, D)
    w = torch.randn(D, K)
    want_conv = hf.causal_conv1d_fn(x.T[None], w, None, activation="silu")[0].T
    conv_state = torch.zeros(3, D, K - 1)
    slots = torch.tensor([1])
    got = [ref.causal_conv1d_reference(x[a:b], w, conv_state, slots, *layout([b - a], [a]), *none(1))
           for a, b in ((0, split), (split, T))]
    torch.testing.assert_close(torch.cat(got), want_conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv_state[1], x[-(K - 1):].T)

    s = step_tensors(T, 0)
    want, want_state = hf.torch_chunk_gated_delta_rule(
        *(s[n][None] for n in ("q", "k", "v", "g", "beta")), output_final_state=True, use_qk_l2norm_in_kernel=True)
    ssm = torch.zeros(3, HV, DK, DV)
    got = [ref.gated_delta_rule_reference(*(s[n][a:b] for n in ("q", "k", "v", "g", "beta")), ssm, slots,
                                          *layout([b - a], [a]), *none(1)) for a, b in ((0, split), (split, T))]
    torch.testing.assert_close(torch.cat(got), want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ssm[1], want_state[0], rtol=1e-4, atol=1e-5)

    one = step_tensors(1, 1)  # a decode step from that state: transformers' recurrent step
    want, want_state = hf.torch_recurrent_gated_delta_rule(
        *(one[n][None] for n in ("q", "k", "v", "g", "beta")), initial_state=ssm[1:2].clone(),
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    got = ref.gated_delta_rule_reference(*(one[n] for n in ("q", "k", "v", "g", "beta")), ssm, slots,
                                         *layout([1], [T]), *none(1))
    torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ssm[1], want_state[0], rtol=1e-4, atol=1e-5)


BATCHES = {  # (tokens per row, earlier tokens per row, each row's slot); the last slot (7) is the scratch row
    "prefill": ([5, 1, 7, 3, 0], [0, 12, 4, 0, 0], [2, 0, 5, 7, 7]),
    "decode": ([1, 1, 1, 1], [9, 1, 3, 0], [4, 1, 6, 7]),  # (the convolution's one-launch path)
    "short rows": ([2, 1, 1], [0, 2, 1], [3, 0, 7]),
    "rows across token blocks": ([21, 3, 9], [0, 5, 2], [2, 0, 5]),  # 33 tokens: the convolution's blocks of 16
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_triton_kernels_match_their_twins(name):
    q_lens, prior, slots = BATCHES[name]
    cu, context = layout(q_lens, prior)
    slots = torch.tensor(slots)
    T = int(cu[-1])
    x, w = torch.randn(T, D), torch.randn(D, K)
    conv0, ssm0 = torch.randn(8, D, K - 1), torch.randn(8, HV, DK, DV)
    pools = [(conv0.clone(), ssm0.clone()) for _ in range(2)]
    s = step_tensors(T, 2)
    outs = []
    for (conv, ssm), conv_fn, rule_fn in zip(pools, (ref.causal_conv1d_reference, tk.causal_conv1d_triton),
                                             (ref.gated_delta_rule_reference, tk.gated_delta_rule_triton)):
        y = conv_fn(x, w, conv, slots, cu, context, *none(len(slots)))
        o = rule_fn(*(s[n] for n in ("q", "k", "v", "g", "beta")), ssm, slots, cu, context, *none(len(slots)))
        outs.append((y, o))
    (y_ref, o_ref), (y, o) = outs
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    real = [int(v) for v in slots[:len(q_lens)] if int(v) != 7]
    for pool in (0, 1):  # every real slot written alike, every other slot untouched
        torch.testing.assert_close(pools[1][pool][real], pools[0][pool][real], rtol=1e-4, atol=1e-5)
        untouched = [i for i in range(7) if i not in real]
        assert torch.equal(pools[1][pool][untouched], (conv0, ssm0)[pool][untouched])
    assert torch.isfinite(o).all() and F.silu(torch.zeros(1)).item() == 0.0


@pytest.mark.parametrize("kernels", ["twins", "triton"])
def test_a_snapshot_inside_a_chunk_is_the_state_a_chunk_ending_there_leaves(kernels):
    """Row 0 (70 new tokens after 64) snapshots into slot 6 after 64 of them; rows 1 (20 tokens, length 0) and 2 (7
    tokens, length 7: its end, which the copy after the step takes) none, their slots the scratch row's.  Slot 6 then holds what the row's first
    64 tokens alone leave in its slot; outputs and final states are those of the step without snapshots."""
    conv_fn, rule_fn = ((ref.causal_conv1d_reference, ref.gated_delta_rule_reference) if kernels == "twins" else
                        (tk.causal_conv1d_triton, tk.gated_delta_rule_triton))
    q_lens, prior, slots = [70, 20, 7], [64, 5, 0], torch.tensor([2, 0, 5])
    cu, context = layout(q_lens, prior)
    x, w = torch.randn(97, D), torch.randn(D, K)
    s = step_tensors(97, 4)
    pools0 = torch.randn(8, D, K - 1), torch.randn(8, HV, DK, DV)

    def run(rows, captures, n=97):
        conv, ssm = (p.clone() for p in pools0)
        c, ctx = layout([q_lens[r] if n == 97 else n for r in rows], [prior[r] for r in rows])
        y = conv_fn(x[:n], w, conv, slots[rows], c, ctx, *captures)
        o = rule_fn(*(s[k][:n] for k in ("q", "k", "v", "g", "beta")), ssm, slots[rows], c, ctx, *captures)
        return y, o, conv, ssm

    y, o, conv, ssm = run([0, 1, 2], (torch.tensor([6, 7, 7]), torch.tensor([64, 0, 7])))  # 7: the scratch row
    y0, o0, conv0, ssm0 = run([0, 1, 2], none(3))
    _, _, conv_cut, ssm_cut = run([0], none(1), n=64)  # row 0's first 64 tokens alone
    torch.testing.assert_close(conv[6], conv_cut[2], rtol=0, atol=0)
    torch.testing.assert_close(ssm[6], ssm_cut[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((y, o), (y0, o0), rtol=0, atol=0)
    keep = [i for i in range(8) if i != 6]
    assert torch.equal(conv[keep], conv0[keep]) and torch.equal(ssm[keep], ssm0[keep])
