"""The Triton grouped GEMMs on MXFP4 experts (``kernels/triton_mxfp4.py``: each group of 32 columns dequantized in
the kernel with its e8m0 scale, even and odd columns apart) against the twin (``moe_reference``, which dequantizes
whole experts first), on CPU under the Triton interpreter: GPT-OSS's biases and clamped SwiGLU and plain SiLU,
both operand orientations, partial row tiles, scales spread over many binades, float32 and bf16; the dequantize
kernel and the dequantize-once path past the row threshold; and the CUDA dispatch sends bf16 MXFP4 calls to the
kernels, not the twin.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import cuda, mxfp4_quant  # noqa: E402
from nanovllm.kernels import triton_mxfp4 as tiles  # noqa: E402
from nanovllm.kernels import moe_reference as ref  # noqa: E402
from nanovllm.kernels.moe_configs import MoeConfig  # noqa: E402
from nanovllm.kernels.triton_moe import fused_moe_triton, moe_experts_triton  # noqa: E402

E, H, I, TOP_K = 4, 96, 64, 2


def experts(seed: int) -> dict:
    """MXFP4 experts whose rows' magnitudes span 2^-6..2^3 (scales differ block to block), and float biases."""
    g = torch.Generator().manual_seed(seed)
    spread = lambda *shape: torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-6, 4, shape[:-1] + (1,),
                                                                                          generator=g).float())
    w13, s13 = mxfp4_quant.quantize(spread(E, 2 * I, H) * 0.05)
    w2, s2 = mxfp4_quant.quantize(spread(E, H, I) * 0.05)
    assert len(s13.unique()) > 6
    return dict(w13=w13, w2=w2, w13_scale=s13, w2_scale=s2, w13_bias=torch.randn(E, 2 * I, generator=g) * 0.1,
                w2_bias=torch.randn(E, H, generator=g) * 0.1)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("swap", [False, True], ids=["weights_as_b", "weights_as_a"])
@pytest.mark.parametrize("activation", ["swiglu_oss", "silu"])
def test_triton_matches_the_twin(activation, swap):
    w = experts(seed=1)
    cfg = MoeConfig(16, 16, 32, swap=swap)  # several row and K tiles, a K tile of one block
    for num_tokens in (3, 21):  # one block per expert, and more
        x = torch.randn(num_tokens, H)
        logits = torch.randn(num_tokens, E)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            kw = dict(w13_bias=w["w13_bias"].to(dtype), w2_bias=w["w2_bias"].to(dtype), activation=activation,
                      swiglu_limit=1.5)
            args = (x.to(dtype), logits, w["w13"], w["w2"], TOP_K, True, w["w13_scale"], w["w2_scale"], 32)
            got = fused_moe_triton(*args, cfg=cfg, **kw)
            want = ref.fused_moe_reference(*args, **kw)
            assert got.dtype == dtype and rel_err(got, want) < tol, f"{dtype}: {rel_err(got, want):.2e}"


def test_triton_routed_experts_with_a_wide_k_tile():
    """``moe_experts`` (routed elsewhere), a K tile of two blocks and no biases."""
    w = experts(seed=2)
    x = torch.randn(9, H)
    weights, ids = ref.route_reference(torch.randn(9, E), TOP_K, True)
    args = (w["w13"], w["w2"], w["w13_scale"], w["w2_scale"], 32)
    got = moe_experts_triton(x, weights, ids, *args)
    assert rel_err(got, ref.experts_reference(x, weights, ids, *args)) < 1e-5


def test_cuda_dispatch_sends_bf16_mxfp4_to_the_kernels():
    w = experts(seed=3)
    x = torch.randn(4, H, dtype=torch.bfloat16)
    assert not cuda._moe_on_twin(x, w["w13"], w["w13_scale"], None, 32, {"activation": "swiglu_oss"})
    assert cuda._moe_on_twin(x.float(), w["w13"], w["w13_scale"], None, 32, {})


def test_the_dequantize_kernel_gives_the_twins_values():
    w = experts(seed=4)
    rows, scales = w["w13"].reshape(E * 2 * I, H // 2), w["w13_scale"].reshape(E * 2 * I, -1)
    for dtype in (torch.float32, torch.bfloat16):
        got = tiles.dequantize_mxfp4_triton(rows[:37], scales[:37], dtype)  # a partial row block
        assert torch.equal(got, mxfp4_quant.dequantize(rows[:37], scales[:37], dtype))


def test_every_code_at_every_kind_of_scale_dequantizes_to_the_twins_value():
    """All 16 codes (code 1 is 2^-126 times 0.5 before the scale: a float32 subnormal) against scales 0 (2^-127),
    1, 100, 127 and 140 to 254 (2^127) in float32, bit for bit; in bf16 and fp16 from scale 2 on (the interpreter
    rounds a bf16 subnormal wrongly; a GPU is checked in tests/gpu/test_mxfp4.py)."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(4)  # 64 columns: two blocks
    every = torch.tensor([0, 1, 2, 100, 120, 126, 127, 128, 140, 200, 254], dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        scales = every if dtype == torch.float32 else every[2:]
        rows = mxfp4_quant.pack(codes.repeat(len(scales), 1))
        row_scales = torch.stack((scales, scales.flip(0)), dim=1)  # each row's two blocks differ
        got = tiles.dequantize_mxfp4_triton(rows, row_scales, dtype)
        want = mxfp4_quant.dequantize(rows, row_scales, dtype)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), dtype


def test_past_the_row_threshold_mxfp4_experts_are_dequantized_once(monkeypatch, num_tokens=21):
    """Above ``INT4_DEQUANTIZE_ROWS`` rows per expert the step dequantizes both stacks once and runs the bf16
    kernels on them (the twin's weights); at or below it the MXFP4 tiles run; both give the twin's result."""
    from nanovllm.kernels import moe_configs, triton_moe
    w = experts(seed=5)
    x, logits = torch.randn(num_tokens, H), torch.randn(num_tokens, E)
    kw = dict(w13_bias=w["w13_bias"], w2_bias=w["w2_bias"], activation="swiglu_oss", swiglu_limit=1.5)
    args = (x, logits, w["w13"], w["w2"], TOP_K, True, w["w13_scale"], w["w2_scale"], 32)
    want = ref.fused_moe_reference(*args, **kw)
    calls, real = [], triton_moe.dequantize_mxfp4_triton
    monkeypatch.setattr(triton_moe, "dequantize_mxfp4_triton", lambda *a: calls.append(a[0].shape) or real(*a))
    rows = num_tokens * TOP_K / E
    for limit, once in ((rows, False), (rows - 0.5, True)):
        monkeypatch.setattr(moe_configs, "INT4_DEQUANTIZE_ROWS", limit)
        calls.clear()
        got = fused_moe_triton(*args, cfg=MoeConfig(16, 16, 32), **kw)
        assert calls == ([(E * 2 * I, H // 2), (E * H, I // 2)] if once else [])
        assert rel_err(got, want) < 1e-5
