"""The MoE op's expert biases and GPT-OSS's clamped SwiGLU (``moe_reference.py``): the twin against transformers'
own ``GptOssExperts`` and ``GptOssTopKRouter`` (their checkpoint tensors turned into ours by the loader's
``models/gpt_oss.py`` layouts), and the Triton grouped GEMMs (bias and activation in the up kernel's epilogue, bias
in the down kernel's) against the twin on CPU under the Triton interpreter, in both operand orientations, with a
transposed ``w2``, and for SiLU experts with biases.  Calls without the new arguments are the other MoE tests'.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import cuda, ops  # noqa: E402
from nanovllm.kernels import moe_reference as ref  # noqa: E402
from nanovllm.kernels.moe_configs import MoeConfig  # noqa: E402
from nanovllm.kernels.triton_moe import fused_moe_triton, moe_experts_triton  # noqa: E402
from nanovllm.models.gpt_oss import DOWN, GATE_UP, GATE_UP_BIAS  # noqa: E402

E, H, I, TOP_K, LIMIT = 4, 40, 24, 2, 1.5  # a limit the values below pass, so the clamps bite


def hf_mlp(seed=0):
    """transformers' GPT-OSS router and experts (its loop implementation), random weights and biases."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter
    config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=TOP_K,
                          swiglu_limit=LIMIT, experts_implementation="eager")
    torch.manual_seed(seed)
    router, experts = GptOssTopKRouter(config), GptOssExperts(config)
    with torch.no_grad():
        for p in list(router.parameters()) + list(experts.parameters()):
            p.normal_(0.0, 0.3)
    return router, experts


def ours(experts) -> dict:
    """Our w13, w2 and biases from transformers' tensors, as the loader reads the checkpoint."""
    return dict(w13=GATE_UP.to_ours(experts.gate_up_proj.data).contiguous(), w2=DOWN.to_ours(experts.down_proj.data)
                .contiguous(), w13_bias=GATE_UP_BIAS.to_ours(experts.gate_up_proj_bias.data).contiguous(),
                w2_bias=experts.down_proj_bias.data.clone())


def oss(w: dict) -> dict:
    return dict(w13_bias=w["w13_bias"], w2_bias=w["w2_bias"], activation="swiglu_oss", swiglu_alpha=1.702,
                swiglu_limit=LIMIT)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def test_the_twin_is_transformers_gpt_oss_mlp():
    router, experts = hf_mlp()
    x = torch.randn(9, H)
    with torch.no_grad():
        logits, scores, indices = router(x)
        want = experts(x, indices, scores)
        gate_up = torch.einsum("th,ehn->ten", x, experts.gate_up_proj) + experts.gate_up_proj_bias
    assert (gate_up[..., ::2] > LIMIT).any() and (gate_up[..., 1::2].abs() > LIMIT).any()  # both clamps bite
    weights, ids = ref.route_reference(logits, TOP_K, True)  # softmax, top k, renormalised: the same experts
    assert torch.equal(ids, indices)
    torch.testing.assert_close(weights, scores, rtol=1e-6, atol=1e-6)
    w = ours(experts)
    got = ref.fused_moe_reference(x, logits, w["w13"], w["w2"], TOP_K, True, **oss(w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(ops.fused_moe(x, logits, w["w13"], w["w2"], TOP_K, True, **oss(w)), got)  # the op: the twin
    assert torch.equal(ops.moe_experts(x, weights, ids, w["w13"], w["w2"], **oss(w)), got)


def test_the_twin_adds_biases_to_silu_experts():
    router, experts = hf_mlp(seed=1)
    x = torch.randn(5, H)
    w = ours(experts)
    weights, ids = ref.route_reference(router(x)[0].detach(), TOP_K, True)
    got = ref.experts_reference(x, weights, ids, w["w13"], w["w2"], w13_bias=w["w13_bias"], w2_bias=w["w2_bias"])
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(TOP_K):
            e = ids[t, k]
            gate, up = (w["w13"][e] @ x[t] + w["w13_bias"][e]).chunk(2)
            want[t] += weights[t, k] * (w["w2"][e] @ (torch.nn.functional.silu(gate) * up) + w["w2_bias"][e])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="MoE activation 'gelu'"):
        ref.experts_reference(x, weights, ids, w["w13"], w["w2"], activation="gelu")


@pytest.mark.parametrize("swap", [False, True], ids=["weights_as_b", "weights_as_a"])
@pytest.mark.parametrize("activation", ["swiglu_oss", "silu", "gelu_tanh"])
def test_triton_matches_the_twin_with_biases(activation, swap):
    router, experts = hf_mlp(seed=2)
    w = ours(experts)
    kw = dict(oss(w), activation=activation)
    cfg = MoeConfig(16, 16, 16, swap=swap)  # several column tiles; I = 24 and H = 40 leave partial ones
    for num_tokens in (3, 21):  # one block per expert, and more
        x = torch.randn(num_tokens, H)
        logits = router(x)[0].detach()
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            args = (x.to(dtype), logits, w["w13"].to(dtype), w["w2"].to(dtype), TOP_K, True)
            bias = dict(kw, w13_bias=w["w13_bias"].to(dtype), w2_bias=w["w2_bias"].to(dtype))
            got = fused_moe_triton(*args, cfg=cfg, **bias)
            want = ref.fused_moe_reference(*args, **bias)
            assert got.dtype == dtype and rel_err(got, want) < tol, f"{dtype}: {rel_err(got, want):.2e}"


def test_triton_routed_experts_with_a_transposed_w2_and_one_bias():
    """``moe_experts`` (an expert cache's call): w2 as a transposed view; a down bias without an up bias."""
    router, experts = hf_mlp(seed=3)
    w = ours(experts)
    x = torch.randn(7, H)
    weights, ids = ref.route_reference(router(x)[0].detach(), TOP_K, True)
    w2t = w["w2"].transpose(1, 2).contiguous().transpose(1, 2)
    kw = dict(oss(w), w13_bias=None)
    got = moe_experts_triton(x, weights, ids, w["w13"], w2t, **kw)
    assert rel_err(got, ref.experts_reference(x, weights, ids, w["w13"], w["w2"], **kw)) < 1e-5


def test_cuda_dispatch_keeps_the_epilogue():
    """The registered CUDA function sends bf16 calls with biases and the activation to Triton, float32 to the twin,
    both with every argument."""
    router, experts = hf_mlp(seed=4)
    w = ours(experts)
    x = torch.randn(6, H)
    logits = router(x)[0].detach()
    args = (w["w13"].bfloat16(), w["w2"].bfloat16(), TOP_K, True, None, None, 0, None, None)
    tail = (w["w13_bias"].bfloat16(), w["w2_bias"].bfloat16(), "swiglu_oss", 1.702, LIMIT)
    want = ref.fused_moe_reference(x.bfloat16(), logits, *args, *tail)
    assert rel_err(cuda._fused_moe(x.bfloat16(), logits, *args, *tail), want) < 2e-2
    plain = ref.fused_moe_reference(x.bfloat16(), logits, *args)
    assert rel_err(want, plain) > 0.1  # the epilogue was not dropped
    f32 = (w["w13"], w["w2"], TOP_K, True, None, None, 0, None, None, w["w13_bias"], w["w2_bias"], "swiglu_oss", 1.702,
           LIMIT)
    assert torch.equal(cuda._fused_moe(x, logits, *f32), ref.fused_moe_reference(x, logits, *f32))
