"""``quantization="fp8"`` end to end on CPU: the decoder layers' projections and experts are quantized at load time
(float8 e4m3, a float32 scale per row) and greedy float32 tokens equal transformers' on a copy of
the checkpoint whose weights are those FP8 values dequantized, in eager and graph mode, with chunked prefill,
prefix hits and preemption; MiniCPM4 and a vision-language model's language part too; two ranks equal one.

The oracle (``quant/fp8_oracle.py``) is independent of our model code: it quantizes each checkpoint tensor the FP8
layout would store with ``weight_quant.quantize`` and writes back ``dequantize`` of it.  Scales are per row, so
quantizing q, k and v (or gate and up, or one expert) apart equals quantizing them packed.  MoE experts are W8A8:
transformers runs them through ``quant/w8a8_oracle.py``.
"""
import random
from pathlib import Path

import pytest
import torch

from conftest import build_checkpoint, build_minicpm_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.quant import fp8_oracle
from nanovllm.tools import minicpm

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=24, max_model_len=128, max_num_seqs=4,
              graph_batch_sizes=[1, 2, 4], quantization="fp8")
# hidden 200 and intermediate 136: no power of two
SHAPES = dict(hidden_size=200, intermediate_size=136)


def prompts_of(n, seed, max_len):
    rng = random.Random(seed)
    return [[rng.randint(3, 383) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def greedy(llm, prompts, n=12):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def fp8_copy(path: str, out: Path) -> str:
    """A float32 copy of checkpoint ``path`` whose quantizable weights are their FP8 values, dequantized."""
    return fp8_oracle.write_dequantized(path, out, online=torch.float32)


@pytest.fixture(scope="module", params=["qwen3", pytest.param("llama", marks=pytest.mark.slow),
                                        pytest.param("qwen3_moe", marks=pytest.mark.slow),
                                        pytest.param("mixtral", marks=pytest.mark.slow)])
def checkpoint(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    path = build_checkpoint(tmp / "plain", request.param, **SHAPES)
    return path, fp8_copy(path, tmp / "oracle")


def test_quantized_weights_are_float8_with_one_scale_per_row(checkpoint):
    llm = LLM(checkpoint[0], enforce_eager=True, **ENGINE)
    layer = llm.engine.runner.model.model.layers[0]
    qkv = layer.self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (qkv.weight.shape[0], 1)
    assert llm.engine.runner.model.lm_head.weight.dtype == torch.float32  # the LM head stays
    assert llm.engine.runner.model.model.embed_tokens.weight.dtype == torch.float32
    experts = getattr(layer.mlp, "experts", None)
    if experts is not None:  # MoE: experts quantized, router not
        assert experts.gate_up_proj.dtype == torch.float8_e4m3fn and experts.gate_up_proj_scale.shape[-1] == 1
        assert experts.down_proj_scale.shape[-1] == 1
        assert layer.mlp.gate.weight.dtype == torch.float32
    assert "scales per row)" in llm.engine.describe()["quantization"]


def test_eager_matches_transformers_on_the_dequantized_weights_with_chunks_hits_and_preemption(checkpoint):
    path, oracle = checkpoint
    shared = prompts_of(1, seed=0, max_len=1)[0] * 40  # two full blocks, then each prompt's own tokens
    prompts = [shared + tail for tail in prompts_of(6, seed=1, max_len=30)]
    llm = LLM(path, enforce_eager=True, **dict(ENGINE, max_num_batched_tokens=40, num_kvcache_blocks=10))
    got = greedy(llm, prompts, 24)
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.block_manager.cache_hit_tokens > 0
    assert got == hf_greedy(oracle, prompts, 24, w8a8=True)


def test_graph_mode_equals_eager_and_the_oracle(checkpoint):
    path, oracle = checkpoint
    prompts = prompts_of(5, seed=2, max_len=40)
    graph = LLM(path, **ENGINE)
    assert graph.engine.runner.mode == "graph"
    assert greedy(graph, prompts) == hf_greedy(oracle, prompts, 12, w8a8=True)


def test_quantization_changes_tokens_so_the_oracle_is_not_the_plain_model(tmp_path):
    path = build_checkpoint(tmp_path / "plain", "qwen3", std=0.3, **SHAPES)
    prompts = prompts_of(6, seed=3, max_len=30)
    assert hf_greedy(path, prompts, 24) != hf_greedy(fp8_copy(path, tmp_path / "oracle"), prompts, 24)


@pytest.mark.slow
def test_minicpm4_matches_its_dequantized_oracle(tmp_path):
    path = build_minicpm_checkpoint(tmp_path / "plain")  # its oracle: Llama with the scalings folded in, then FP8
    oracle = fp8_copy(str(minicpm.to_llama(path, tmp_path / "llama")), tmp_path / "oracle")
    prompts = prompts_of(4, seed=4, max_len=30)
    want = hf_greedy(oracle, prompts, 12)
    assert greedy(LLM(path, enforce_eager=True, **ENGINE), prompts) == want
    assert greedy(LLM(path, **ENGINE), prompts) == want


def test_a_vision_language_models_language_part_matches_its_dequantized_oracle(tmp_path):
    from test_kv_fp8_capabilities import VL_ENGINE, VL_PROMPTS, vl_oracle
    from vl_checkpoints import build_vl_checkpoint
    path = build_vl_checkpoint(tmp_path / "plain", "qwen2_5_vl")
    llm = LLM(path, enforce_eager=True, **dict(VL_ENGINE, kv_cache_dtype="auto", quantization="fp8"))
    model = llm.engine.runner.model
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert model.visual.blocks[0].attn.qkv.weight.dtype == torch.float32  # the tower stays
    assert greedy(llm, VL_PROMPTS, 10) == vl_oracle(fp8_copy(path, tmp_path / "oracle"), llm, None)


def test_dummy_weights_are_quantized_too(tmp_path):
    path = build_checkpoint(tmp_path / "plain", "qwen3", **SHAPES)
    llm = LLM(path, load_format="dummy", enforce_eager=True, **ENGINE)
    assert llm.engine.runner.model.model.layers[1].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert len(greedy(llm, prompts_of(2, seed=5, max_len=10))[0]) == 12


def test_the_compile_cache_keys_by_the_quantization(tmp_path):
    from nanovllm.compile.cache import key_fields
    from nanovllm.config import EngineConfig
    from nanovllm.platforms import platform_class
    path = build_checkpoint(tmp_path / "plain", "qwen3")
    platform = platform_class("cpu")("cpu")
    keys = [key_fields(EngineConfig(path, **options), dtype=torch.float32, kv_dtype=torch.float32, num_kv_blocks=8,
                       platform=platform) for options in ({}, {"quantization": "fp8"})]
    assert keys[0]["quantization"] is None and keys[1]["quantization"] == "fp8"


def test_an_unknown_quantization_is_refused_by_name(tmp_path):
    path = build_checkpoint(tmp_path / "plain", "qwen3")
    with pytest.raises(ValueError, match=r"quantization must be None or one of 'fp8', got 'int8'"):
        LLM(path, quantization="int8")


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    # a row-parallel shard's scale comes from the whole row: 200 MLP columns, halved, on shards that
    # no power-of-two group of 8 or more divides
    path = build_checkpoint(tmp_path / "plain", "qwen3", hidden_size=192, intermediate_size=200,
                            num_attention_heads=8, num_key_value_heads=2)
    prompts = prompts_of(4, seed=6, max_len=30)
    one = greedy(LLM(path, enforce_eager=True, **ENGINE), prompts)
    with LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE) as two:
        assert greedy(two, prompts) == one
        layer = two.engine.runner.model.model.layers[0]  # rank 0's half of the rows' columns, the whole rows' scales
        assert layer.mlp.down_proj.weight.shape[1] == 100 and layer.mlp.down_proj.weight_scale.shape[1] == 1


def test_the_config_flag_reaches_the_command_line():
    import argparse

    from nanovllm.cli import add_engine_args, engine_kwargs
    parser = add_engine_args(argparse.ArgumentParser())
    assert engine_kwargs(parser.parse_args(["--quantization", "fp8"]))["quantization"] == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int4"])
