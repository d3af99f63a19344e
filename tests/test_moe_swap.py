"""Swapped operands in the fused MoE's kernels (``MoeConfig.swap``: the weight tile is the MMA's A operand and the
accumulator [N, M], ``triton_moe_tiles.py``), on CPU under the Triton interpreter: in every expert format, bf16,
FP8 weight-only (bf16 x, multiplied in fp16, and fp16 x), int4 and W8A8 (whose default swaps below 64 rows, so
both overrides are checked), the swapped tiles give the twin's result and the plain tiles' at 1 token (most experts
get none) and at 40 tokens (partial blocks).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import int4_quant, weight_quant  # noqa: E402
from nanovllm.kernels import moe_reference as ref  # noqa: E402
from nanovllm.kernels.act_quant import moe_w8a8  # noqa: E402
from nanovllm.kernels.moe_configs import MoeConfig  # noqa: E402
from nanovllm.kernels.triton_moe import fused_moe_triton  # noqa: E402
from moe_kernel_cases import EXPERTS, HIDDEN, INTER, TOP_K, inputs, rel_err  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def experts(fmt: str, seed: int):
    """(w13, w2, the op's quantization keywords) of ``fmt``."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * torch.logspace(-1, 1, HIDDEN) / HIDDEN ** 0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    if fmt == "bf16":
        return w13, w2, {}
    if fmt == "int4":
        (q13, s13, z13), (q2, s2, z2) = (int4_quant.quantize(w, 16, sym=False) for w in (w13, w2))
        return q13, q2, dict(w13_scale=s13, w2_scale=s2, group=16, w13_zero=z13, w2_zero=z2)
    group = 16 if fmt == "fp8" else max(HIDDEN, INTER)  # W8A8 needs groups a 128-column tile never straddles
    (q13, s13), (q2, s2) = (weight_quant.quantize(w, group) for w in (w13, w2))
    return q13, q2, dict(w13_scale=s13, w2_scale=s2, group=group)


@pytest.mark.parametrize("num_tokens", [1, pytest.param(40, marks=pytest.mark.slow)])  # 40: partial blocks
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int4", "w8a8"])
def test_swapped_tiles_give_the_twins_and_the_plain_tiles_result(fmt, num_tokens):
    w13, w2, quant = experts(fmt, seed=num_tokens)
    assert moe_w8a8(w13, quant.get("w13_scale"), quant.get("w13_zero"), quant.get("group", 0)) == (fmt == "w8a8")
    x, logits = inputs(num_tokens, seed=num_tokens)
    if fmt == "w8a8":  # 128-column K tiles; the default swaps at 16 rows and not at 64
        pairs = [(MoeConfig(16, 64, 128, swap=False), MoeConfig(16, 64, 128)),
                 (MoeConfig(64, 64, 128), MoeConfig(64, 64, 128, swap=True))]
    else:
        pairs = [(MoeConfig(16, 32, 16), MoeConfig(16, 32, 16, swap=True))]
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if fmt in ("fp8", "int4") else ())
    for dtype in dtypes:
        if fmt == "bf16":  # unquantized experts come in x's dtype
            w13, w2 = w13.to(dtype), w2.to(dtype)
        want = ref.fused_moe_reference(x.to(dtype), logits, w13, w2, TOP_K, True, **quant)
        tolerance = 2e-5 if fmt == "w8a8" and dtype == torch.float32 else TOLERANCE[dtype]
        for plain_cfg, swapped_cfg in pairs:
            plain = fused_moe_triton(x.to(dtype), logits, w13, w2, TOP_K, True, **quant, cfg=plain_cfg)
            swapped = fused_moe_triton(x.to(dtype), logits, w13, w2, TOP_K, True, **quant, cfg=swapped_cfg)
            assert swapped.dtype == dtype and rel_err(swapped, want) < tolerance, (dtype, rel_err(swapped, want))
            assert rel_err(swapped, plain) < tolerance, (dtype, rel_err(swapped, plain))
