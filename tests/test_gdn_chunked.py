"""The chunked (WY) Triton kernel of the gated delta rule (``triton_chunked.py``) against its twin
``gated_delta_rule_reference`` on CPU under the Triton interpreter, with chunks of 16 tokens: a prefill batch of rows
longer than several chunks, of lengths that are and are not multiples of the chunk, with and without stored states, a
row of no tokens with a state (its slot stays as it was) and a padding row, a snapshot inside a row's chunk; two
blocks of value dims; outputs and every slot of the pool. A second batch of nearly equal keys with beta near 1 and
strong decays is the hard case of the triangular inverse (its Neumann series would cancel badly).

Measured on CPU (float32, seeds 0-2): the outputs differ from the twin's by at most 1.5e-7 (|o| up to 0.5), the states
by at most 7e-7 (random) and 9e-6 (nearly equal keys; |S| up to 4); the tolerances below leave a margin of 3x or more.
The file's tests take ~11 s on a shared 2-core CPU (~17 s with imports).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels.linear_attention import reference as ref  # noqa: E402
from nanovllm.kernels.linear_attention import triton_chunked as tc  # noqa: E402
from nanovllm.kernels.linear_attention import triton_kernels as tk  # noqa: E402

HK, HV, DK, DV, C = 2, 4, 32, 32, 16
Q_LENS = [37, 0, 16, 50, 5, 0, 3]  # tokens per row: ragged, none with a state, exact multiple of C, ...
PRIOR = [0, 3, 10, 0, 7, 0, 2]  # earlier tokens: row 1 has a state and no tokens, row 5 is padding
SLOTS = [2, 0, 5, 4, 1, 7, 6]  # slot 7: the scratch slot of the padding row; slot 3 belongs to no row


def step(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + Q_LENS).cumsum(0).to(torch.int32)
    context = (torch.tensor(Q_LENS) + torch.tensor(PRIOR)).to(torch.int32)
    T = int(cu[-1])
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(T, HK, DK), r(T, HK, DK), r(T, HV, DV)
    decay, beta = -torch.rand(T, HV, generator=g), torch.rand(T, HV, generator=g)
    if case == "nearly equal keys":
        k = k[:1] + 1e-3 * k
        decay, beta = decay * 8, 0.9 + 0.1 * beta
    return (q, k, v, decay, beta), cu, context


@pytest.mark.parametrize("case", ["random", "nearly equal keys"])
def test_chunked_kernel_matches_the_twin(case):
    inputs, cu, context = step(case)
    slots = torch.tensor(SLOTS)
    ssm0 = torch.randn(8, HV, DK, DV, generator=torch.Generator().manual_seed(1))
    want_pool, got_pool = ssm0.clone(), ssm0.clone()
    # row 0 also snapshots its state after 32 of its 37 tokens (two chunks) into slot 3; the others none (scratch)
    captures = torch.tensor([3, 7, 7, 7, 7, 7, 7]), torch.tensor([32, 0, 0, 0, 0, 0, 0])
    want = ref.gated_delta_rule_reference(*inputs, want_pool, slots, cu, context, *captures)
    got = tc.gated_delta_rule_chunked(*inputs, got_pool, slots, cu, context, chunk=C, block_v=16, captures=captures)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got_pool[:7], want_pool[:7], rtol=1e-5, atol=3e-5)
    assert torch.equal(got_pool[0], ssm0[0]) and not torch.equal(got_pool[3], ssm0[3])  # the row of no tokens: as it
    # was; slot 3: the snapshot (checked against the twin's above)


def test_chunk_table_covers_each_row_once():
    cu = torch.tensor([0] + Q_LENS).cumsum(0).to(torch.int32)
    chunk0, start, length = tc.chunk_table(cu, len(Q_LENS), int(cu[-1]), C)
    want = [(int(cu[b]) + i, min(C, Q_LENS[b] - i)) for b in range(len(Q_LENS)) for i in range(0, Q_LENS[b], C)]
    got = [(int(s), int(n)) for s, n in zip(start, length) if n > 0]
    assert got == want and (length[len(want):] == 0).all()
    n_chunks = [(n + C - 1) // C for n in Q_LENS]
    assert chunk0.tolist() == [sum(n_chunks[:b]) for b in range(len(Q_LENS))]


def test_prefill_steps_take_the_chunked_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(tk, "gated_delta_rule_chunked", lambda *a, **kw: calls.append("chunked"))
    monkeypatch.setattr(tk, "gated_delta_rule_recurrent", lambda *a, **kw: calls.append("recurrent"))
    (q, k, v, g, beta), cu, context = step("random")
    tk.gated_delta_rule_triton(q, k, v, g, beta, None, None, cu, context, None, None)
    tk.gated_delta_rule_triton(q[:7], k[:7], v[:7], g[:7], beta[:7], None, None, torch.arange(8), context, None, None)
    assert calls == ["chunked", "recurrent"]
