"""Int4 (GPTQ, AWQ) weights on a GPU, where the Triton kernels unpack codes with inline assembly the CPU interpreter
cannot run: the w4a16 projection, its few-row CUDA C++ kernel (where nvcc builds it) and the fused MoE with int4
experts (Triton; CUDA C++ where nvcc builds it) against the real product (float64) at least as closely as their
twins, in bf16 and fp16; tiny checkpoints against transformers on the dequantized weights
(``quant/int4_oracle.py``, through ``tools/oracle.run``), bf16 diverging only at near-ties, in eager and graph mode;
for the mixtures of experts, also at the router's near-ties (``router_ties.py``)."""
import json
from pathlib import Path

import pytest
import torch

import router_ties
from conftest import build_checkpoint
from nanovllm.kernels import int4_quant, moe_reference, reference

ENGINE = dict(kvcache_block_size=16, graph_batch_sizes=[8], max_model_len=512, max_num_seqs=8,
              num_kvcache_blocks=256)
SHAPES = dict(hidden_size=256, intermediate_size=512)  # two groups of 128 along the hidden size


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("k,group,silu,perm", [(512, 128, False, False), (384, 64, True, False),
                                               (256, 256, False, True), (512, 32, True, True)])
def test_w4a16_kernel_is_as_close_to_the_real_product_as_its_twin(dtype, m, k, group, silu, perm):
    from nanovllm.kernels.triton_common import _num_sms
    from nanovllm.kernels.triton_w4a16 import linear_w4a16_triton, w4a16_config
    g = torch.Generator(device="cuda").manual_seed(m + k)
    n = 192
    weight = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
    q, s, z = int4_quant.quantize(weight, group, sym=group != 64)  # one asymmetric case: zeros other than 8
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    p = torch.randperm(k, device="cuda", generator=g).to(torch.int32) if perm else None
    cfg = w4a16_config(m, n // 2 if silu else n, k, group, _num_sms(x.device))
    got = linear_w4a16_triton(x, q, s, z, group, p, None, cfg, silu)
    twin = reference.linear_int4_reference(x, q, s, z, group, p, None, silu)
    real = int4_quant.dequantize(q, s, z, group, torch.float64)
    xs = x.double()[:, p.long()] if perm else x.double()
    exact = xs @ real.T
    if silu:
        gate, up = exact.chunk(2, dim=-1)
        exact = torch.nn.functional.silu(gate) * up
    assert got.shape == twin.shape and got.dtype == dtype
    assert rel_err(got, exact) <= 1.1 * rel_err(twin, exact) + 1e-4, (rel_err(got, exact), rel_err(twin, exact))
    assert rel_err(got, twin) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k,group,silu,perm,sym", [(192, 512, 128, False, False, True),
                                                     (200, 384, 128, True, False, False),
                                                     (72, 256, 256, False, True, False),
                                                     (136, 2048, 128, True, True, True)])
def test_cuda_few_row_kernel_is_as_close_to_the_real_product_as_its_twin(dtype, m, n, k, group, silu, perm, sym):
    _check_few_row_kernel(dtype, m, n, k, group, silu, perm, sym)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("waves,k,group,silu", [(0.5, 4096, 128, False), (1.5, 2048, 128, False),
                                                (1.5, 384, 128, True), (1.5, 4096, 4096, True)])
def test_cuda_few_row_kernel_takes_each_launch_shape(dtype, m, waves, k, group, silu):
    """Blocks of 8 warps (tiles within one wave of them) and of 4 (past it), with K a whole number of the warps'
    rounds of chunks (no bounds checks) or not, groups of one chunk or one group."""
    tiles = int(waves * 2 * torch.cuda.get_device_properties(0).multi_processor_count)  # 2 blocks of 8 warps an SM
    _check_few_row_kernel(dtype, m, tiles * 16, k, group, silu, False, True)


def _check_few_row_kernel(dtype, m, n, k, group, silu, perm, sym):
    from nanovllm.kernels import cuda_build, cuda_w4a16
    if cuda_build.nvcc_path() is None:
        pytest.skip("no nvcc: the few-row int4 projection stays on Triton")
    g = torch.Generator(device="cuda").manual_seed(n + k + m)
    q, s, z = int4_quant.quantize(torch.randn(n, k, device="cuda", generator=g) / k ** 0.5, group, sym=sym)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype) / 4
    p = torch.randperm(k, device="cuda", generator=g).to(torch.int32) if perm else None
    assert cuda_w4a16.usable(x, q, s, z, group), "nvcc is here: the kernel must build and take this call"
    got = cuda_w4a16.linear_w4a16_cuda(x, q, s, z, group, p, bias, silu)
    twin = reference.linear_int4_reference(x, q, s, z, group, p, bias, silu)
    xs = x.double()[:, p.long()] if perm else x.double()
    exact = xs @ int4_quant.dequantize(q, s, z, group, torch.float64).T + bias.double()
    if silu:
        gate, up = exact.chunk(2, dim=-1)
        exact = torch.nn.functional.silu(gate) * up
    assert got.shape == twin.shape == (m, n // 2 if silu else n) and got.dtype == dtype
    assert rel_err(got, exact) <= 1.1 * rel_err(twin, exact) + 1e-4, (rel_err(got, exact), rel_err(twin, exact))
    assert rel_err(got, twin) < 1e-2


def test_cuda_few_row_kernel_reads_a_strided_x_and_leaves_other_calls_to_triton():
    from nanovllm.kernels import cuda_build, cuda_w4a16
    if cuda_build.nvcc_path() is None:
        pytest.skip("no nvcc: the few-row int4 projection stays on Triton")
    q, s, z = int4_quant.quantize(torch.randn(64, 256, device="cuda") / 16, 128)
    wide = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    x = wide[:, :256]  # row stride 512
    want = reference.linear_int4_reference(x.contiguous(), q, s, z, 128, None, None, False)
    assert rel_err(cuda_w4a16.linear_w4a16_cuda(x, q, s, z, 128, None, None), want) < 1e-2
    assert not cuda_w4a16.usable(torch.randn(9, 256, device="cuda", dtype=torch.bfloat16), q, s, z, 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_fused_moe_with_int4_experts_matches_its_twin(dtype, tokens):
    from nanovllm.kernels import ops
    from nanovllm.kernels.cuda import register_cuda_kernels
    register_cuda_kernels()
    g = torch.Generator(device="cuda").manual_seed(tokens)
    e, top_k, h, i, group = 16, 4, 256, 384, 128
    q13, s13, z13 = int4_quant.quantize(torch.randn(e, 2 * i, h, device="cuda", generator=g) / h ** 0.5, group)
    q2, s2, z2 = int4_quant.quantize(torch.randn(e, h, i, device="cuda", generator=g) / i ** 0.5, group, sym=False)
    x = torch.randn(tokens, h, device="cuda", generator=g).to(dtype)
    logits = torch.randn(tokens, e, device="cuda", generator=g).to(dtype)
    got = ops.fused_moe(x, logits, q13, q2, top_k, True, s13, s2, group, w13_zero=z13, w2_zero=z2)
    want = moe_reference.fused_moe_reference(x, logits, q13, q2, top_k, True, s13, s2, group, z13, z2)
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,group,rounding,block", [
    (1, 128, False, None), (7, 128, True, None), (40, 128, False, None), (96, 1024, True, None),  # 0.25-24 per expert
    (300, 128, False, 8), (300, 128, True, 16), (300, 1024, False, 32), (300, 128, True, 64), (150, 128, False, 64)])
def test_cuda_moe_kernel_is_as_close_to_the_real_product_as_its_twin(dtype, tokens, group, rounding, block):
    from nanovllm.kernels import cuda_build, cuda_moe
    from nanovllm.kernels.triton_moe_align import route_triton
    if cuda_build.nvcc_path() is None:
        pytest.skip("no nvcc: int4 experts stay on Triton")
    g = torch.Generator(device="cuda").manual_seed(tokens)
    e, top_k, h, i = 8, 2, 1024, 384
    q13, s13, z13 = int4_quant.quantize(torch.randn(e, 2 * i, h, device="cuda", generator=g) / h ** 0.5, group)
    q2, s2, z2 = int4_quant.quantize(torch.randn(e, h, i, device="cuda", generator=g) / i ** 0.5, group, sym=False)
    x = torch.randn(tokens, h, device="cuda", generator=g).to(dtype)
    weights, ids, hist = route_triton(torch.randn(tokens, e, device="cuda", generator=g), top_k, True)
    experts = (q13, q2, (s13, s2), (z13, z2))
    assert cuda_moe.moe_usable(x, top_k, *experts, group) == cuda_moe.moe_faster(tokens, top_k, e)
    got = cuda_moe.experts_cuda(x, weights, ids, hist, *experts, group, rounding, block)
    twin = moe_reference.experts_reference(x, weights, ids, q13, q2, s13, s2, group, z13, z2, round_weights=rounding)
    exact = moe_reference.experts_reference(x.double(), weights, ids, q13, q2, s13, s2, group, z13, z2)
    assert got.shape == twin.shape == (tokens, h) and got.dtype == dtype
    assert rel_err(got, exact) <= 1.1 * rel_err(twin, exact) + 1e-4, (rel_err(got, exact), rel_err(twin, exact))
    assert rel_err(got, twin) < 1e-2


@pytest.fixture(scope="module", params=[("qwen3", "gptq"), ("qwen3_moe", "awq"), ("mixtral", "gptq")])
def int4_model(request, tmp_path_factory):
    from nanovllm.quant.int4_checkpoint import quantize_checkpoint_int4
    arch, method = request.param
    path = build_checkpoint(tmp_path_factory.mktemp(f"{arch}-{method}"), arch, **SHAPES)
    quantize_checkpoint_int4(path, method, group=128)
    return path


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_int4_checkpoints_match_their_dequantized_oracle(int4_model, eager):
    from nanovllm.tools import oracle
    verdicts = oracle.run(int4_model, "bfloat16", "cuda", len(router_ties.PROMPTS), 24, 0.1,
                          prompts=router_ties.PROMPTS, enforce_eager=eager, **ENGINE)
    if json.loads(Path(int4_model, "config.json").read_text())["model_type"] in ("qwen3_moe", "mixtral"):
        bad = router_ties.moe_failures(verdicts, int4_model, "bfloat16", ENGINE, "cuda", not eager)
    else:
        bad = [v for v in verdicts if v["status"] not in ("identical", "near-tie")]
    assert not bad, bad
