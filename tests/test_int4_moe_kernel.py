"""Int4 experts in the fused MoE: the Triton kernels (``triton_moe.py``, ``triton_moe_tiles.py``) against the twin that
dequantizes them (``moe_reference.py``), on CPU under the Triton interpreter, and the twin against a hand computation.

Covered: symmetric and asymmetric experts (``int4_quant.quantize``), one group over all columns, several groups, a
partial last group, K tiles narrowed to fit a group, ``w2`` as a transposed view, a zero of 16, ``moe_experts`` as
well as ``fused_moe``, the ops' schema, and which of kernel and twin ``cuda.py`` sends a call to.  Float32
activations check the nibble, scale and zero indexing tightly (the kernel dequantizes exactly in float32); bf16 and
fp16 ones check the production path (the interpreter rounds fp32 to bf16 by truncation, the GPU to nearest).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import cuda, int4_quant, ops  # noqa: E402
from nanovllm.kernels import moe_reference as ref  # noqa: E402
from nanovllm.kernels.triton_moe import experts_triton, fused_moe_triton, moe_experts_triton  # noqa: E402
from nanovllm.kernels.moe_configs import MoeConfig  # noqa: E402
from nanovllm.kernels.triton_moe_align import chunk_histogram  # noqa: E402
from moe_kernel_cases import (CFG, EXPERTS, GROUPS, HIDDEN, INTER, TOP_K, inputs, rel_err,  # noqa: E402
                              transposed_view)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def int4_experts(group, sym=False, seed=0):
    """(w13, s13, z13, w2, s2, z2) int4; column magnitudes drift over a wide range and asymmetric weights lean
    positive, so every group gets its own scale and zero and one read from the wrong group shows."""
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) + (0 if sym else 0.5)) \
        * torch.logspace(-1, 1, HIDDEN) / HIDDEN ** 0.5
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) + (0 if sym else 0.5)) \
        * torch.logspace(1, -1, INTER) / INTER ** 0.5
    return (*int4_quant.quantize(w13, group, sym), *int4_quant.quantize(w2, group, sym))


def routed(num_tokens, seed):
    """Given routing (an expert cache's slots), both ids of token 0 on one expert."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, EXPERTS, (num_tokens, TOP_K), generator=gen)
    ids[0] = 4
    return torch.rand(num_tokens, TOP_K, generator=gen), ids


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("layout", GROUPS)
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_int4_fused_moe_matches_the_twin(num_tokens, layout, sym):
    group = GROUPS[layout]
    w13, s13, z13, w2, s2, z2 = int4_experts(group, sym, seed=num_tokens)
    x, logits = inputs(num_tokens, seed=num_tokens)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = fused_moe_triton(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2, cfg=CFG)
        want = ref.fused_moe_reference(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2)
        assert got.dtype == dtype and got.shape == x.shape
        assert rel_err(got, want) < TOLERANCE[dtype], f"{dtype}: relative error {rel_err(got, want):.2e}"


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_int4_moe_experts_matches_the_twin_on_given_routing(num_tokens, strided):
    group = GROUPS["partial_last_group"]
    w13, s13, z13, w2, s2, z2 = int4_experts(group, seed=5 + num_tokens)
    x, _ = inputs(num_tokens, seed=5)
    weights, ids = routed(num_tokens, seed=num_tokens)
    w2_in, s2_in, z2_in = (transposed_view(t) for t in (w2, s2, z2)) if strided else (w2, s2, z2)
    if strided:
        assert w2_in.stride(2) != 1 and torch.equal(w2_in, w2)
    for dtype in (torch.float32, torch.bfloat16):
        got = moe_experts_triton(x.to(dtype), weights, ids, w13, w2_in, s13, s2_in, group, z13, z2_in)
        want = ref.experts_reference(x.to(dtype), weights, ids, w13, w2, s13, s2, group, z13, z2)
        assert rel_err(got, want) < TOLERANCE[dtype], f"{dtype}: relative error {rel_err(got, want):.2e}"


def test_int4_fused_moe_reads_a_transposed_w2_view():
    group = GROUPS["several_groups"]
    w13, s13, z13, w2, s2, z2 = int4_experts(group, seed=3)
    x, logits = inputs(7, seed=3)
    got = fused_moe_triton(x, logits, w13, transposed_view(w2), TOP_K, True, s13, transposed_view(s2), group, z13,
                           transposed_view(z2), cfg=CFG)
    assert rel_err(got, ref.fused_moe_reference(x, logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2)) < 1e-5


def test_a_zero_of_16_reads_codes_as_all_negative_steps():
    """Zeros are uint8, up to 16 (GPTQ's stored zero plus one): code 15 is then -1 step, code 0 -16."""
    group = GROUPS["several_groups"]
    w13, s13, z13, w2, s2, z2 = int4_experts(group, sym=True, seed=7)
    z13[:, ::3] = 16
    z2[..., 1::2] = 16
    assert int4_quant.dequantize(w13, s13, z13, group, torch.float32).amax() > 0  # other groups still reach up
    dq2 = int4_quant.dequantize(w2, s2, z2, group, torch.float32)
    assert (dq2[..., group:2 * group] < 0).all()  # every code of a group with zero 16 lies below it
    x, logits = inputs(7, seed=7)
    got = fused_moe_triton(x, logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2, cfg=CFG)
    want = ref.fused_moe_reference(x, logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2)
    assert rel_err(got, want) < 1e-5


def test_a_wide_k_tile_is_narrowed_to_the_group_and_gives_what_a_fitting_tile_gives():
    group = 16
    w13, s13, z13, w2, s2, z2 = int4_experts(group, seed=9)
    x, logits = inputs(5, seed=9)
    weights, ids = ref.route_reference(logits, TOP_K, True)
    args = (x, weights, ids.to(torch.int32), chunk_histogram(ids, EXPERTS), w13, w2)
    wide = experts_triton(*args, MoeConfig(16, 32, 128), s13, s2, group, z13, z2)
    fitting = experts_triton(*args, MoeConfig(16, 32, 16), s13, s2, group, z13, z2)
    assert rel_err(wide, fitting) < 1e-6
    assert rel_err(wide, ref.experts_reference(x, weights, ids, w13, w2, s13, s2, group, z13, z2)) < 1e-5


def test_twin_is_the_hand_computed_expert(monkeypatch):
    """One expert, H = 4, I = 2, groups of 3 (w13: columns 0-2, then a partial group; w2: one group per row)."""
    # w13 codes (gate0, gate1, up0, up1): 9 8 8 10 | 8 10 8 0 | 8 8 12 15 | 0 8 8 8, two per byte, low nibble first
    w13 = torch.tensor([[[0x89, 0xA8], [0xA8, 0x08], [0x88, 0xFC], [0x80, 0x88]]], dtype=torch.uint8)
    s13 = torch.tensor([[[1.0, 0.5], [0.5, 0.25], [0.25, 2.0], [0.5, 1.0]]], dtype=torch.float16)
    z13 = torch.tensor([[[8, 8], [8, 16], [8, 15], [4, 8]]], dtype=torch.uint8)
    # W13 = [1 0 0 1], [0 1 0 -4], [0 0 1 0], [-2 2 2 0]
    w2 = torch.tensor([[[0x79], [0x8A], [0xF0], [0x4C]]], dtype=torch.uint8)  # codes 9 7 | 10 8 | 0 15 | 12 4
    s2 = torch.tensor([[[1.0], [0.5], [1.0], [0.25]]], dtype=torch.float16)
    z2 = torch.tensor([[[8], [8], [16], [8]]], dtype=torch.uint8)
    # W2 = [1 -1], [1 0], [-16 -1], [1 -1]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    gate = torch.tensor([1 + 4.0, 2 - 16.0])  # W13 @ x
    up = torch.tensor([3.0, -2 + 4 + 6.0])
    h0, h1 = (torch.nn.functional.silu(gate) * up).tolist()
    want = torch.tensor([[h0 - h1, h0, -16 * h0 - h1, h0 - h1]]) * 0.75
    args = (x, torch.tensor([[0.75]]), torch.tensor([[0]]), w13, w2, s13, s2, 3, z13, z2)
    torch.testing.assert_close(ref.experts_reference(*args), want, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 1)  # the twin's chunks count int4 columns, not bytes
    torch.testing.assert_close(ref.experts_reference(*args), want, rtol=1e-6, atol=1e-6)


def test_the_ops_take_int4_experts_as_trailing_optional_arguments():
    """Existing callers (no zeros) keep working; int4 zeros follow the group (then only the expert biases and the
    activation, GPT-OSS's, and fused_moe's round_weights), by keyword in the wrappers; the fakes agree."""
    trailing = ["group", "w13_zero", "w2_zero", "w13_bias", "w2_bias", "activation", "swiglu_alpha", "swiglu_limit"]
    for op, last in ((torch.ops.nanovllm.fused_moe.default, ["round_weights"]),
                     (torch.ops.nanovllm.moe_experts.default, [])):
        names = [a.name for a in op._schema.arguments]
        assert names[-len(trailing + last):] == trailing + last, names
    group = GROUPS["partial_last_group"]
    w13, s13, z13, w2, s2, z2 = int4_experts(group, seed=13)
    x, logits = inputs(3, seed=13)
    weights, ids = routed(3, seed=13)
    got = ops.fused_moe(x, logits, w13, w2, TOP_K, True, s13, s2, group, w13_zero=z13, w2_zero=z2)
    torch.testing.assert_close(got, ref.fused_moe_reference(x, logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2))
    got = ops.moe_experts(x, weights, ids, w13, w2, s13, s2, group, w13_zero=z13, w2_zero=z2)
    torch.testing.assert_close(got, ref.experts_reference(x, weights, ids, w13, w2, s13, s2, group, z13, z2))
    checks = ("test_schema", "test_faketensor")
    plain = (None, None, "silu", 1.702, 7.0)
    torch.library.opcheck(torch.ops.nanovllm.fused_moe.default,
                          (x, logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2, *plain, False),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.nanovllm.moe_experts.default,
                          (x, weights, ids, w13, w2, s13, s2, group, z13, z2, *plain), test_utils=checks)


@pytest.mark.parametrize("op", ["fused_moe", "moe_experts"])
def test_cuda_dispatch_sends_int4_to_triton_where_a_tile_fits(op, monkeypatch):
    """bf16 activations with a fitting group -> Triton; fp32 activations or a group no K tile fits -> the twin.
    Both give the twin's result."""
    calls = []
    name = f"{op}_triton"
    real = getattr(cuda, name)
    monkeypatch.setattr(cuda, name, lambda *a: calls.append(a) or real(*a))
    x, logits = inputs(7, seed=11)
    weights, ids = ref.route_reference(logits, TOP_K, True)
    for group, dtype, triton in ((32, torch.bfloat16, True), (32, torch.float32, False), (24, torch.bfloat16, False)):
        w13, s13, z13, w2, s2, z2 = int4_experts(group, seed=11)
        calls.clear()
        if op == "fused_moe":
            got = cuda._fused_moe(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2)
            want = ref.fused_moe_reference(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2)
        else:
            got = cuda._moe_experts(x.to(dtype), weights, ids, w13, w2, s13, s2, group, z13, z2)
            want = ref.experts_reference(x.to(dtype), weights, ids, w13, w2, s13, s2, group, z13, z2)
        assert bool(calls) == triton, (group, dtype)
        assert got.dtype == dtype and rel_err(got, want) < TOLERANCE[dtype]


def test_past_the_row_threshold_int4_experts_are_dequantized_once(monkeypatch, num_tokens=40):
    """Above ``INT4_DEQUANTIZE_ROWS`` rows per expert the step dequantizes every expert once and runs the bf16 kernels
    on them: the twin's weights, so float32 agrees to rounding; at or below it the int4 kernels run; a transposed
    ``w2`` (an expert cache) stays on the int4 kernels."""
    from nanovllm.kernels import moe_configs, triton_moe
    group = GROUPS["partial_last_group"]
    w13, s13, z13, w2, s2, z2 = int4_experts(group, seed=17)
    x, logits = inputs(num_tokens, seed=17)
    calls = []
    real = triton_moe.dequantize_int4_triton
    monkeypatch.setattr(triton_moe, "dequantize_int4_triton", lambda *a: calls.append(a[0].shape) or real(*a))
    want = ref.fused_moe_reference(x, logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2)
    rows = num_tokens * TOP_K / EXPERTS
    for limit, once in ((rows, False), (rows - 0.5, True)):
        monkeypatch.setattr(moe_configs, "INT4_DEQUANTIZE_ROWS", limit)
        calls.clear()
        got = fused_moe_triton(x, logits, w13, w2, TOP_K, True, s13, s2, group, z13, z2, cfg=CFG)
        assert calls == ([(EXPERTS * 2 * INTER, HIDDEN // 2), (EXPERTS * HIDDEN, INTER // 2)] if once else [])
        assert rel_err(got, want) < 1e-6
        calls.clear()
        got = fused_moe_triton(x, logits, w13, transposed_view(w2), TOP_K, True, s13, transposed_view(s2), group,
                               z13, transposed_view(z2), cfg=CFG)
        assert not calls and rel_err(got, want) < 1e-5
