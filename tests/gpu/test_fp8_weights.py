"""FP8 weights on a GPU: tiny checkpoints of several families, quantized at load time (``quantization="fp8"``) or
stored in the block-FP8 layout, against transformers on the dequantized weights (``quant/fp8_oracle.py``, through
``tools/oracle.run``): float32 token-identical, bfloat16 diverging only at near-ties, in eager and graph mode.  The
Triton kernels serve bfloat16 (the FP8 linear and grouped MoE kernels; CUDA C++ ones at few rows where nvcc builds
them); float32 takes the twins.

bfloat16 Qwen3-MoE has a second kind of near-tie, the router's: such a divergence passes only when both engines'
routing shows it (``router_ties.py``).  Float32 Qwen3-MoE, whose experts are W8A8, is held to the bfloat16 rule:
an activation within an ulp of an e4m3 rounding boundary rounds apart in the two engines (their float32 sums differ
in order), a step of 1/16 (seen on the H100: block-FP8, graph mode, a divergence where transformers' top two were
0.0076 nats apart).
"""
import json
from pathlib import Path

import pytest

import router_ties
from conftest import build_checkpoint
from router_ties import PROMPTS

ENGINE = dict(kvcache_block_size=16, graph_batch_sizes=[8], max_model_len=512, max_num_seqs=8,
              num_kvcache_blocks=256)
# hidden 256: two 128-column groups, so the kernels scale partial products per group
SHAPES = dict(hidden_size=256, intermediate_size=512)
MARGIN = 0.1  # nats: a logit near-tie (oracle.run's rule)
MAX_TOKENS = 24
DEVICE = "cuda"


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen3_moe"])
def checkpoint(request, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(request.param), request.param, **SHAPES)


@pytest.fixture(scope="module")
def block_checkpoint(tmp_path_factory):
    from nanovllm.quant.fp8_checkpoint import quantize_checkpoint_fp8
    path = build_checkpoint(tmp_path_factory.mktemp("block"), "qwen3_moe", **SHAPES)
    quantize_checkpoint_fp8(path, (128, 128))
    return path


def failures(verdicts, dtype, path=None, graph=False, **llm_kwargs) -> list[dict]:
    """The verdicts this test fails: float32 any divergence; bfloat16 one past ``MARGIN``; for an MoE checkpoint
    (``path`` given) in either dtype, one past ``MARGIN`` that no router near-tie explains (``router_ties``)."""
    if dtype == "float32" and path is None:
        return [v for v in verdicts if v["status"] != "identical"]
    if dtype == "float32":  # oracle.run's float32 verdicts are exact: a divergence within MARGIN is a near-tie here
        verdicts = [dict(v, status="near-tie") if v["status"] == "MISMATCH" and v["logprob_gap"] <= MARGIN else v
                    for v in verdicts]
    if path is None:
        return [v for v in verdicts if v["status"] not in ("identical", "near-tie")]
    return router_ties.moe_failures(verdicts, path, dtype, ENGINE, DEVICE, graph, **llm_kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_online_fp8_matches_the_dequantized_oracle(checkpoint, dtype, eager):
    from nanovllm.tools import oracle
    verdicts = oracle.run(checkpoint, dtype, DEVICE, len(PROMPTS), MAX_TOKENS, MARGIN, prompts=PROMPTS,
                          enforce_eager=eager, quantization="fp8", **ENGINE)
    moe = json.loads(Path(checkpoint, "config.json").read_text())["model_type"] == "qwen3_moe"
    bad = failures(verdicts, dtype, checkpoint if moe else None, not eager, quantization="fp8")
    assert not bad, bad  # in full: pytest would cut a comparison's diff


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_block_fp8_checkpoint_matches_its_dequantized_oracle(block_checkpoint, dtype):
    from nanovllm.tools import oracle
    verdicts = oracle.run(block_checkpoint, dtype, DEVICE, len(PROMPTS), MAX_TOKENS, MARGIN, prompts=PROMPTS,
                          enforce_eager=False, **ENGINE)
    bad = failures(verdicts, dtype, block_checkpoint, graph=True)
    assert not bad, bad


def _rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("waves,k,group,silu", [(0.5, 4096, 4096, False), (1.5, 2048, 128, False),
                                                (1.5, 384, 256, True), (0.5, 12288, 12288, False)])
def test_cuda_few_row_fp8_kernel_matches_float64_as_the_twin_does(dtype, m, waves, k, group, silu):
    """``cuda_w8a16`` (``cuda_src/w8a16_mma.cu``) against the float64 product of the dequantized weight: blocks of 8
    warps (tiles within one wave) and of 4, a scale per row (online FP8) or per 128 / 256 columns (block FP8, a
    partial last group at K=384), the fused SiLU product, a bias; no worse than the twin (``linear_reference``)."""
    import torch
    from nanovllm.kernels import cuda_build, cuda_w8a16, reference, weight_quant
    if cuda_build.nvcc_path() is None:
        pytest.skip("no nvcc: the few-row FP8 projection stays on Triton")
    dtype = getattr(torch, dtype)
    n = int(waves * 2 * torch.cuda.get_device_properties(0).multi_processor_count) * 16
    g = torch.Generator(device=DEVICE).manual_seed(n + k + m)
    weight, scale = weight_quant.quantize(torch.randn(n, k, device=DEVICE, generator=g) / k ** 0.5, group)
    x = torch.randn(m, k, device=DEVICE, generator=g).to(dtype)
    bias = (torch.randn(n, device=DEVICE, generator=g) / 4).to(dtype)
    assert cuda_w8a16.usable(x, weight, scale, group), "nvcc is here: the kernel must build and take this call"
    got = cuda_w8a16.linear_w8a16_cuda(x, weight, scale, group, bias, silu)
    twin = reference.linear_reference(x, weight, bias, silu, scale, group)
    exact = x.double() @ weight_quant.dequantize(weight, scale, group, torch.float64).T + bias.double()
    if silu:
        gate, up = exact.chunk(2, dim=-1)
        exact = torch.nn.functional.silu(gate) * up
    assert got.shape == twin.shape == (m, n // 2 if silu else n) and got.dtype == dtype
    assert _rel_err(got, exact) <= 1.1 * _rel_err(twin, exact) + 1e-4, (_rel_err(got, exact), _rel_err(twin, exact))
    assert not cuda_w8a16.usable(torch.randn(9, k, device=DEVICE, dtype=dtype), weight, scale, group)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tokens,group,rounding,block", [
    (1, 128, False, None), (7, 128, True, None), (40, 1024, False, None), (96, 128, True, None),  # 0.25-24 per expert
    (300, 128, False, 8), (300, 128, True, 16), (300, 1024, False, 32), (300, 128, True, 64)])
def test_cuda_fp8_moe_kernel_matches_float64_as_the_weight_only_twin_does(dtype, tokens, group, rounding, block):
    """``cuda_moe.experts_cuda`` on e4m3 experts (``cuda_src/w8a16_moe.cu``, weight-only) against the float64 product
    of the dequantized experts: each layout block size, scales per 128 columns (block FP8) and one a row (online FP8,
    group >= K), rounded router weights; no worse than the weight-only twin (``experts_reference`` with
    ``moe_w8a8`` off), and ``moe_usable`` at the rows ``moe_faster`` allows."""
    import torch
    from nanovllm.kernels import cuda_build, cuda_moe, moe_reference, weight_quant
    from nanovllm.kernels.options import KernelOptions, current_options, set_options
    from nanovllm.kernels.triton_moe_align import route_triton
    if cuda_build.nvcc_path() is None:
        pytest.skip("no nvcc: FP8 experts stay on Triton")
    dtype = getattr(torch, dtype)
    g = torch.Generator(device=DEVICE).manual_seed(tokens + group)
    e, top_k, h, i = 8, 2, 1024, 384
    q13, s13 = weight_quant.quantize(torch.randn(e, 2 * i, h, device=DEVICE, generator=g) / h ** 0.5, group)
    q2, s2 = weight_quant.quantize(torch.randn(e, h, i, device=DEVICE, generator=g) / i ** 0.5, group)
    x = torch.randn(tokens, h, device=DEVICE, generator=g).to(dtype)
    weights, ids, hist = route_triton(torch.randn(tokens, e, device=DEVICE, generator=g), top_k, True)
    experts = (q13, q2, (s13, s2), (None, None))
    assert cuda_moe.moe_usable(x, top_k, *experts, group) == cuda_moe.moe_faster(tokens, top_k, e, fp8=True)
    got = cuda_moe.experts_cuda(x, weights, ids, hist, *experts, group, rounding, block)
    saved = current_options()
    set_options(KernelOptions(**dict(saved.as_dict(), moe_w8a8=False)))
    try:
        twin = moe_reference.experts_reference(x, weights, ids, q13, q2, s13, s2, group, round_weights=rounding)
        exact = moe_reference.experts_reference(x.double(), weights, ids, q13, q2, s13, s2, group)
    finally:
        set_options(saved)
    assert got.shape == twin.shape == (tokens, h) and got.dtype == dtype
    assert _rel_err(got, exact) <= 1.1 * _rel_err(twin, exact) + 1e-4, (_rel_err(got, exact), _rel_err(twin, exact))
    assert _rel_err(got, twin) < 1e-2
