"""bf16 experts at prefill sizes on the grouped GEMMs (``grouped_moe.py``, sm90), through ``ops.fused_moe``:
against the twin (``moe_reference``) for bf16 experts and for int4 ones dequantized once, and a CUDA-graph replay
equal to the eager call."""
import math

import pytest
import torch

from nanovllm.kernels import grouped_moe, int4_quant, moe_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                reason="the grouped GEMMs run on sm90")
E, TOP_K, H, I = 8, 2, 512, grouped_moe.GROUPED_FROM[0][0]
TOKENS = grouped_moe.GROUPED_FROM[0][1] * E // TOP_K * 2  # twice the mean rows from which the path is taken


def rel_err(out, want) -> float:
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).nan_to_num(math.inf).item()


def case(seed):
    from nanovllm.kernels.cuda import register_cuda_kernels
    register_cuda_kernels()
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5
    x = torch.randn(TOKENS, H, device="cuda", generator=g).bfloat16()
    return w13, w2, x, torch.randn(TOKENS, E, device="cuda", generator=g).bfloat16()


@pytest.mark.parametrize("round_weights", [False, True])
def test_bf16_experts_on_grouped_gemms_match_the_twin(round_weights):
    from nanovllm.kernels import ops
    w13, w2, x, logits = case(1)
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    assert grouped_moe.grouped_usable(x, TOP_K, w13, w2, False)
    got = ops.fused_moe(x, logits, w13, w2, TOP_K, True, round_weights=round_weights)
    want = moe_reference.fused_moe_reference(x, logits, w13, w2, TOP_K, True, round_weights=round_weights)
    assert rel_err(got, want) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = ops.fused_moe(x, logits, w13, w2, TOP_K, True, round_weights=round_weights)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, got)


def test_int4_experts_dequantized_once_match_the_twin():
    from nanovllm.kernels import ops, triton_moe
    w13, w2, x, logits = case(2)
    q13, s13, z13 = int4_quant.quantize(w13, 128)
    q2, s2, z2 = int4_quant.quantize(w2, 128, sym=False)
    assert triton_moe.dequantized_once(x, TOP_K, q13, q2, s13, z13)
    assert grouped_moe.grouped_usable(x, TOP_K, w13.bfloat16(), w2.bfloat16(), False)  # once dequantized
    got = ops.fused_moe(x, logits, q13, q2, TOP_K, True, s13, s2, 128, w13_zero=z13, w2_zero=z2)
    want = moe_reference.fused_moe_reference(x, logits, q13, q2, TOP_K, True, s13, s2, 128, z13, z2)
    assert rel_err(got, want) < 1e-2
