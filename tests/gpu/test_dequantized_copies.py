"""Quantized projections' dequantized copies on a GPU (``quant/dequantized.py``): with them kept
(``NANOVLLM_DEQUANTIZED_COPIES=on``: cuBLAS multiplies by the copies in place of dequantizing, in 96-row decode
steps and the prompts' prefill) a block-FP8 and a GPTQ mixture of experts give ``off``'s tokens exactly, in graph
mode; each copy equals what the GPU's dequantize kernel makes, bit for bit."""
import random

import pytest
import torch

from conftest import build_checkpoint

ENGINE = dict(kvcache_block_size=16, max_model_len=512, max_num_seqs=96, num_kvcache_blocks=256,
              graph_batch_sizes=[8, 96])
SHAPES = dict(hidden_size=256, intermediate_size=512)  # two groups of 128 along the hidden size


@pytest.fixture(scope="module", params=["block-fp8", "gptq"])
def checkpoint(request, tmp_path_factory):
    from nanovllm.quant.fp8_checkpoint import quantize_checkpoint_fp8
    from nanovllm.quant.int4_checkpoint import quantize_checkpoint_int4
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), "qwen3_moe", **SHAPES)
    if request.param == "gptq":
        quantize_checkpoint_int4(path, "gptq", group=128)
    else:
        quantize_checkpoint_fp8(path, (128, 128))
    return path


def dequantize_on_gpu(m):
    """What ``kernels/cuda.py`` dequantizes module ``m``'s weight into for cuBLAS when no copy is kept."""
    from nanovllm.kernels.triton_matmul import dequantize_triton
    from nanovllm.kernels.triton_w4a16 import dequantize_int4_triton
    if hasattr(m, "weight_zero"):
        return dequantize_int4_triton(m.weight, m.weight_scale, m.weight_zero, m.quant_group, torch.bfloat16)
    return dequantize_triton(m.weight, m.weight_scale, m.quant_group, torch.bfloat16)


def test_kept_dequantized_copies_change_no_token(checkpoint, monkeypatch):
    from nanovllm import LLM, SamplingParams
    rng = random.Random(7)
    prompts = [[rng.randint(3, 300) for _ in range(rng.randint(4, 30))] for _ in range(96)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("NANOVLLM_DEQUANTIZED_COPIES", mode)
        llm = LLM(checkpoint, dtype="bfloat16", **ENGINE)
        kept = [m for m in llm.engine.runner.model.modules() if hasattr(m, "weight_dequantized")]
        assert bool(kept) == (mode == "on")
        for m in kept:
            assert torch.equal(m.weight_dequantized, dequantize_on_gpu(m))
        tokens[mode] = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.close()
    assert tokens["on"] == tokens["off"]
