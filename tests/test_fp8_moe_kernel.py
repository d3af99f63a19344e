"""FP8 experts in the fused MoE's Triton kernels (``triton_moe.py``) against the twin that dequantizes them
(``moe_reference.py``), on CPU under the Triton interpreter: one scale group over all columns, several groups, a
partial last group, K tiles narrowed to fit a group, ``w2`` as a transposed view, ``moe_experts`` as well as
``fused_moe``, and which of the two ``cuda.py`` sends a call to.

Float32 activations check the scale indexing tightly (the kernel widens e4m3 exactly and scales in float32);
bfloat16 ones check the production path, where the twin rounds the dequantized weights to bfloat16.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import cuda, weight_quant  # noqa: E402
from nanovllm.kernels import moe_reference as ref  # noqa: E402
from nanovllm.kernels.triton_moe import experts_triton, fused_moe_triton, moe_experts_triton  # noqa: E402
from nanovllm.kernels.moe_configs import MoeConfig, group_block_k, group_supported  # noqa: E402
from nanovllm.kernels.triton_moe_align import chunk_histogram  # noqa: E402
from moe_kernel_cases import (CFG, EXPERTS, GROUPS, HIDDEN, INTER, TOP_K, inputs, rel_err,  # noqa: E402
                              transposed_view)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def fp8_experts(group, seed=0):
    """FP8 w13, w2 and their scales; column magnitudes drift over a wide range, so every group gets its own scale and
    a scale read from the wrong group shows."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * torch.logspace(-1, 1, HIDDEN) / HIDDEN ** 0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * torch.logspace(1, -1, INTER) / INTER ** 0.5
    return (*weight_quant.quantize(w13, group), *weight_quant.quantize(w2, group))


@pytest.mark.parametrize("layout", GROUPS)
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_fp8_fused_moe_matches_the_twin(num_tokens, layout):
    group = GROUPS[layout]
    w13, s13, w2, s2 = fp8_experts(group, seed=num_tokens)
    x, logits = inputs(num_tokens, seed=num_tokens)
    for dtype in (torch.float32, torch.bfloat16):
        got = fused_moe_triton(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group, cfg=CFG)
        want = ref.fused_moe_reference(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group)
        assert got.dtype == dtype and got.shape == x.shape
        assert rel_err(got, want) < TOLERANCE[dtype], f"{dtype}: relative error {rel_err(got, want):.2e}"


@pytest.mark.parametrize("layout", ["one_group", "several_groups"])
def test_bf16_activations_past_fp16_range_and_small_ones(layout):
    """bf16 x multiplies in fp16 (scaled by 2^-4 first): a token at 3e5 (past fp16's 65504; w13 scaled down so the
    intermediate, the down kernel's input, stays that large) stays finite and right, and a token of small values
    (2^-7 at most) keeps its precision."""
    group = GROUPS[layout]
    w13, s13, w2, s2 = fp8_experts(group, seed=11)
    x, logits = inputs(2, seed=11)
    x = x / x.abs().amax(dim=1, keepdim=True)
    for row, (x_scale, w13_scale) in enumerate(((3e5, 1e-3), (2.0 ** -7, 1.0))):
        xs = (x[row:row + 1] * x_scale).bfloat16()
        got = fused_moe_triton(xs, logits[row:row + 1], w13, w2, TOP_K, True, s13 * w13_scale, s2, group, cfg=CFG)
        want = ref.fused_moe_reference(xs, logits[row:row + 1], w13, w2, TOP_K, True, s13 * w13_scale, s2, group)
        assert torch.isfinite(got).all() and rel_err(got, want) < 2e-2, f"token {row}: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("scale_view", [False, True])
def test_fp8_fused_moe_reads_a_transposed_w2_view(scale_view):
    group = GROUPS["partial_last_group"]
    w13, s13, w2, s2 = fp8_experts(group, seed=3)
    strided = transposed_view(w2)
    assert strided.stride(2) != 1 and torch.equal(strided.float(), w2.float())
    s2_in = transposed_view(s2) if scale_view else s2
    x, logits = inputs(7, seed=3)
    got = fused_moe_triton(x, logits, w13, strided, TOP_K, True, s13, s2_in, group, cfg=CFG)
    assert rel_err(got, ref.fused_moe_reference(x, logits, w13, w2, TOP_K, True, s13, s2, group)) < 1e-5


@pytest.mark.parametrize("strided", [False, True])
def test_fp8_moe_experts_matches_the_twin_on_given_routing(strided):
    """Tokens routed elsewhere (an expert cache's slots), both ids of a token on one slot included."""
    group = GROUPS["several_groups"]
    w13, s13, w2, s2 = fp8_experts(group, seed=5)
    x, _ = inputs(7, seed=5)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, EXPERTS, (7, TOP_K), generator=gen)
    ids[0] = 4
    weights = torch.rand(7, TOP_K, generator=gen)
    w2_in, s2_in = (transposed_view(w2), transposed_view(s2)) if strided else (w2, s2)
    for dtype in (torch.float32, torch.bfloat16):
        got = moe_experts_triton(x.to(dtype), weights, ids, w13, w2_in, s13, s2_in, group)
        want = ref.experts_reference(x.to(dtype), weights, ids, w13, w2, s13, s2, group)
        assert rel_err(got, want) < TOLERANCE[dtype], f"{dtype}: relative error {rel_err(got, want):.2e}"


def test_a_wide_k_tile_is_narrowed_to_the_group_and_gives_what_a_fitting_tile_gives():
    group = 16
    w13, s13, w2, s2 = fp8_experts(group, seed=9)
    x, logits = inputs(5, seed=9)
    weights, ids = ref.route_reference(logits, TOP_K, True)
    hist = chunk_histogram(ids, EXPERTS)
    args = (x, weights, ids.to(torch.int32), hist, w13, w2)
    wide = experts_triton(*args, MoeConfig(16, 32, 128), s13, s2, group)
    fitting = experts_triton(*args, MoeConfig(16, 32, 16), s13, s2, group)
    assert rel_err(wide, fitting) < 1e-6
    assert rel_err(wide, ref.experts_reference(x, weights, ids, w13, w2, s13, s2, group)) < 1e-5


def test_k_tiles_fit_the_group():
    assert group_block_k(128, 128, 2048) == 128  # online FP8: one tile per group
    assert group_block_k(64, 128, 2048) == 64  # two tiles per group
    assert group_block_k(128, 64, 2048) == 64 and group_block_k(128, 48, 2048) == 16  # narrowed
    assert group_block_k(128, 24, 2048) is None  # no tile of 16 or more fits
    assert group_block_k(128, 24, 24) == 128 and group_block_k(64, 1000, 768) == 64  # one group over all of K
    assert group_supported(128, 2048, 768) and group_supported(16, 80, 48) and group_supported(80, 80, 48)
    assert not group_supported(24, 80, 48) and not group_supported(0, 80, 48)


@pytest.mark.parametrize("op", ["fused_moe", "moe_experts"])
def test_cuda_dispatch_sends_fp8_to_triton_where_a_tile_fits(op, monkeypatch):
    """bf16 activations with a fitting group -> Triton; fp32 activations or a group no K tile fits -> the twin.
    Both give the twin's result."""
    calls = []
    name = f"{op}_triton"
    real = getattr(cuda, name)
    monkeypatch.setattr(cuda, name, lambda *a: calls.append(a) or real(*a))
    x, logits = inputs(7, seed=11)
    weights, ids = ref.route_reference(logits, TOP_K, True)
    for group, dtype, triton in ((32, torch.bfloat16, True), (32, torch.float32, False), (24, torch.bfloat16, False)):
        w13, s13, w2, s2 = fp8_experts(group, seed=11)
        calls.clear()
        if op == "fused_moe":
            got = cuda._fused_moe(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group)
            want = ref.fused_moe_reference(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group)
        else:
            got = cuda._moe_experts(x.to(dtype), weights, ids, w13, w2, s13, s2, group)
            want = ref.experts_reference(x.to(dtype), weights, ids, w13, w2, s13, s2, group)
        assert bool(calls) == triton, (group, dtype)
        assert rel_err(got, want) < TOLERANCE[dtype]
