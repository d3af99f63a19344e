"""The logits processor ``nanovllm::process_logits`` (penalties and token masks): its twin
(nanovllm/kernels/logits.py) against a naive per-token oracle written from the formula, xgrammar's bitmask layout on
hand-made words, the Triton kernel (nanovllm/kernels/triton_logits.py, on CPU under TRITON_INTERPRET=1) equal to
the twin bit for bit, and the op traced by Dynamo as one graph.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from nanovllm.kernels import ops  # noqa: E402
from nanovllm.kernels.logits import process_logits_reference  # noqa: E402

INF = float("inf")
# State rows: the scratch row (nothing to do), penalties only, mask only, both (negative frequency included).
PARAMS = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.3, 0.5, 0.25], [1.0, 1.0, 0.0, 0.0], [1.0, 0.8, -0.2, 0.7]])


def state(vocab, params=PARAMS, seed=0):
    """(params, bitmask, counts, seen) for ``len(params)`` state rows; row 0 holds zeros, as a scratch row does."""
    gen = torch.Generator().manual_seed(seed)
    rows, words = params.shape[0], -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31, (rows, words), generator=gen, dtype=torch.int64).to(torch.int32)
    counts = torch.randint(0, 3, (rows, vocab), generator=gen, dtype=torch.int32)
    seen = torch.rand(rows, vocab, generator=gen) < 0.3
    bitmask[0], counts[0], seen[0] = 0, 0, False
    return params.clone(), bitmask, counts, seen


def naive(logits, slots, params, bitmask, counts, seen):
    """The formula one token at a time, in float32 0-d tensors (so each step rounds as float32 does)."""
    out = torch.empty(logits.shape, dtype=torch.float32)
    for b, s in enumerate(slots.tolist()):
        mask_on, rep, freq, pres = params[s]
        for v in range(logits.shape[1]):
            x, count = logits[b, v].float(), int(counts[s, v])
            if rep != 1 and (bool(seen[s, v]) or count > 0):
                x = x / rep if x > 0 else x * rep
            x = x - freq * count - pres * (count > 0)
            word = int(bitmask[s, v // 32]) & 0xFFFFFFFF  # the word's 32 bits, unsigned
            if mask_on != 0 and not (word >> (v % 32)) & 1:
                x = torch.tensor(-INF)
            out[b, v] = x
    return out.to(logits.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_matches_the_naive_formula(dtype):
    vocab = 45  # a partial last bitmask word
    slots = torch.tensor([1, 0, 3, 2, 3, 0, 1])  # rows share state rows; two read the scratch row
    logits = (torch.randn(len(slots), vocab, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    logits[:, :3] = 0.0  # zero is neither divided nor multiplied into something else
    args = (logits, slots, *state(vocab))
    got = process_logits_reference(*args)
    assert got.dtype == dtype and got.shape == logits.shape
    assert torch.equal(got, naive(*args))
    assert torch.equal(got[1], logits[1]) and torch.equal(got[5], logits[5])  # the scratch row: unchanged
    assert not torch.equal(got[0], logits[0]) and (got[2] == -INF).any()  # penalties and the mask took effect


def test_each_part_of_the_formula_on_one_token():
    """One token seen in the prompt and twice in the completion: 2.0 / 2 - 0.5 * 2 - 0.25 = -0.25; -2.0 * 2 ..."""
    logits = torch.tensor([[2.0, -2.0, 2.0, 3.0]])
    params = torch.tensor([[0.0, 2.0, 0.5, 0.25]])
    counts = torch.tensor([[2, 0, 0, 1]], dtype=torch.int32)
    seen = torch.tensor([[True, True, False, False]])
    got = ops.process_logits(logits, torch.tensor([0]), params, torch.zeros(1, 1, dtype=torch.int32), counts, seen)
    assert got.tolist() == [[2.0 / 2 - 0.5 * 2 - 0.25, -2.0 * 2, 2.0, 3.0 / 2 - 0.5 - 0.25]]


def test_scratch_row_returns_the_logits_unchanged_in_a_new_tensor():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(3, 70).to(dtype)
        got = ops.process_logits(logits, torch.zeros(3, dtype=torch.long), *state(70))
        assert torch.equal(got, logits) and got.data_ptr() != logits.data_ptr()


def hand_made_bitmask():
    """V = 70, three words (the last one partial): row 0 allows tokens 0 and 33, row 1 token 31 and token 63
    (bit 31: negative words), row 2 nothing."""
    bitmask = torch.tensor([[1, 1 << 1, 0], [-2**31, -2**31, 0], [0, 0, 0]], dtype=torch.int32)
    params = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3 + [[0.0, 1.0, 0.0, 0.0]])  # row 3: mask off
    return params, torch.cat([bitmask, bitmask[:1]]), torch.zeros(4, 70, dtype=torch.int32), \
        torch.zeros(4, 70, dtype=torch.bool)


def process_triton(*args, **kwargs):
    pytest.importorskip("triton")
    from nanovllm.kernels.triton_logits import process_logits_triton
    return process_logits_triton(*args, **kwargs)


@pytest.mark.parametrize("impl", [process_logits_reference, process_triton], ids=["twin", "triton"])
def test_bitmask_bits_allow_exactly_their_tokens(impl):
    logits = torch.randn(4, 70)
    got = impl(logits, torch.tensor([0, 1, 2, 3]), *hand_made_bitmask())
    finite = [torch.isfinite(row).nonzero().flatten().tolist() for row in got]
    assert finite[:3] == [[0, 33], [31, 63], []]
    assert torch.equal(got[0, [0, 33]], logits[0, [0, 33]]) and torch.equal(got[3], logits[3])  # mask off
    assert (got[:3][~torch.isfinite(got[:3])] == -INF).all()


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("vocab,block", [(1100, 1024), (70, 64), (45, 32)])  # V a multiple of neither
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_equals_the_twin(batch, vocab, block, dtype):
    logits = (torch.randn(batch, vocab, generator=torch.Generator().manual_seed(vocab)) * 4).to(dtype)
    slots = torch.tensor([3, 0, 1, 3, 2][:batch])
    args = (logits, slots, *state(vocab, seed=batch))
    got = process_triton(*args, block=block)
    want = process_logits_reference(*args)
    assert got.dtype == dtype and torch.equal(got, want)


def test_triton_kernel_reads_strided_logits():
    wide = torch.randn(3, 128)
    args = (torch.tensor([1, 3, 3]), *state(100))
    assert torch.equal(process_triton(wide[:, :100], *args, block=64), process_logits_reference(wide[:, :100], *args))


def test_op_traces_as_one_graph():
    logits, slots = torch.randn(5, 70), torch.tensor([3, 0, 1, 2, 3])
    args = (logits, slots, *state(70))
    torch._dynamo.reset()
    compiled = torch.compile(ops.process_logits, fullgraph=True, backend="aot_eager")  # the fake's shapes
    assert torch.equal(compiled(*args), process_logits_reference(*args))
    explained = torch._dynamo.explain(ops.process_logits)(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_compiled_cpu_steps_inline_the_logits_processor(restore_options):
    """The CPU platform gives Inductor the twin, so the op is fused into the step, not called; same logits."""
    from torch._inductor.utils import run_and_get_code

    from nanovllm.platforms import get_platform
    get_platform("cpu")
    logits, slots = torch.randn(4, 70), torch.tensor([3, 0, 1, 2])
    args = (logits, slots, *state(70))
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):  # the caches' keys leave out decompositions
        got, code = run_and_get_code(torch.compile(ops.process_logits, fullgraph=True), *args)
    assert not any("nanovllm.process_logits" in c for c in code)
    assert torch.equal(got, process_logits_reference(*args))


def test_the_mask_agrees_with_xgrammars_own_masking():
    xgr = pytest.importorskip("xgrammar")
    bitmask = xgr.allocate_token_bitmask(3, 70)  # xgrammar's layout: [B, ceil(V / 32)] int32
    bitmask.copy_(torch.randint(-2**31, 2**31, bitmask.shape, dtype=torch.int64).to(torch.int32))
    logits = torch.randn(3, 70)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask)
    params = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3)
    got = ops.process_logits(logits, torch.arange(3), params, bitmask, torch.zeros(3, 70, dtype=torch.int32),
                             torch.zeros(3, 70, dtype=torch.bool))
    assert torch.equal(got, want) and (got == -INF).any()
