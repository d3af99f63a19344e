"""MXFP4 experts (GPT-OSS's format) on a GPU, where a bf16 cast rounds to nearest and the kernels are compiled:
the dequantize kernel gives the twin's values bit for bit for every code at every kind of scale (subnormal results
included), and the fused MoE with MXFP4 experts (in-kernel tiles and, past the row threshold, dequantized once)
matches its twin in bf16 and fp16 at GPT-OSS-like proportions (float32 calls stay with the twin:
``kernels/cuda._moe_on_twin``), and the CUDA dispatch sends the bf16 call to the kernels."""
import pytest
import torch

from nanovllm.kernels import moe_configs, moe_reference, mxfp4_quant

DEV = "cuda"


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_code_at_every_scale_dequantizes_to_the_twins_value(dtype):
    from nanovllm.kernels.triton_mxfp4 import dequantize_mxfp4_triton
    codes = torch.arange(16, dtype=torch.uint8, device=DEV).repeat(4)  # two blocks of 32 columns
    scales = torch.arange(255, dtype=torch.uint8, device=DEV)  # 255 is e8m0's NaN
    rows = mxfp4_quant.pack(codes.repeat(255, 1))
    row_scales = torch.stack((scales, scales.flip(0)), dim=1)
    got = dequantize_mxfp4_triton(rows, row_scales, dtype)
    want = mxfp4_quant.dequantize(rows, row_scales, dtype)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 64, 256, 2048])
def test_fused_moe_with_mxfp4_experts_matches_its_twin(dtype, tokens, monkeypatch):
    from nanovllm.kernels import cuda
    from nanovllm.kernels.triton_moe import fused_moe_triton
    monkeypatch.setattr(moe_configs, "INT4_DEQUANTIZE_ROWS", 64)  # 2048 tokens: dequantized once
    g = torch.Generator(device=DEV).manual_seed(tokens)
    e, top_k, h, i = 8, 4, 320, 256  # H not a power of two, as GPT-OSS's 2880
    w13, s13 = mxfp4_quant.quantize(torch.randn(e, 2 * i, h, device=DEV, generator=g) / h ** 0.5)
    w2, s2 = mxfp4_quant.quantize(torch.randn(e, h, i, device=DEV, generator=g) / i ** 0.5)
    x = torch.randn(tokens, h, device=DEV, generator=g).to(dtype)
    logits = torch.randn(tokens, e, device=DEV, generator=g).to(dtype)
    kw = dict(w13_bias=torch.randn(e, 2 * i, device=DEV, generator=g).to(dtype) * 0.1,
              w2_bias=torch.randn(e, h, device=DEV, generator=g).to(dtype) * 0.1, activation="swiglu_oss")
    assert not cuda._moe_on_twin(x, w13, s13, None, 32, kw)
    got = fused_moe_triton(x, logits, w13, w2, top_k, True, s13, s2, 32, **kw)
    want = moe_reference.fused_moe_reference(x, logits, w13, w2, top_k, True, s13, s2, 32, **kw)
    assert rel_err(got, want) < 1e-2, rel_err(got, want)
