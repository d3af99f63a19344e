"""``kv_cache_dtype="fp8"`` end to end on CPU: greedy float32 tokens equal an oracle with the same rounding, in
eager and graph mode, with prefix hits, preemption and chunked prefill; scales from the checkpoint or calibrated.

The oracle is transformers' own model (float32, its ``generate``) with one change: an attention function
(``tools/oracle.py:fp8_kv_attention``), registered under ``transformers.AttentionInterface``, that passes the
layer's K and V through the FP8 cache's rounding (``kv_quant.round_trip``: x / scale to the nearest e4m3 value, saturated at ±448, times scale, per KV head)
and then runs transformers' SDPA attention.  transformers caches K and V unrounded and rounds them again at every
step; rounding is a function of the value, so every position sees what our cache stores for it.
"""
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.tools import oracle

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=24, max_model_len=128, max_num_seqs=4,
              graph_batch_sizes=[1, 2, 4], kv_cache_dtype="fp8")


def prompts_of(n, seed, max_len):
    rng = random.Random(seed)
    return [[rng.randint(3, 383) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def fp8_oracle(path: str, prompts, max_new_tokens: int, scales: list) -> list[list[int]]:
    """transformers' greedy tokens with K and V rounded as an FP8 cache with per-layer ``scales`` [(k, v)] does."""
    return hf_greedy(path, prompts, max_new_tokens, attn_implementation=oracle.fp8_kv_attention(scales))


def engine_scales(llm) -> list:
    return oracle.engine_kv_scales(llm)


def greedy(llm, prompts, n):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module", params=["qwen3", *(pytest.param(arch, marks=pytest.mark.slow)
                                                   for arch in ("qwen2", "llama", "qwen3_moe", "mixtral"))])
def checkpoint(request, tmp_path_factory):
    # std 0.3: K and V spread over e4m3's range, so that rounding changes tokens (checked below)
    return build_checkpoint(tmp_path_factory.mktemp(request.param), request.param, std=0.3)


def test_eager_matches_the_rounding_oracle_with_chunks_prefix_hits_and_preemption(checkpoint):
    shared = prompts_of(1, seed=0, max_len=1)[0] * 40  # two full blocks, then each prompt's own tokens
    prompts = [shared + tail for tail in prompts_of(6, seed=1, max_len=30)]
    # 10 blocks for 4 sequences of up to 94 tokens: preemption; 40-token steps: chunked prompts
    llm = LLM(checkpoint, enforce_eager=True, **dict(ENGINE, max_num_batched_tokens=40, num_kvcache_blocks=10))
    got = greedy(llm, prompts, 24)
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.block_manager.cache_hit_tokens > 0
    assert got == fp8_oracle(checkpoint, prompts, 24, engine_scales(llm))


def test_graph_mode_equals_eager(checkpoint):
    prompts = prompts_of(6, seed=2, max_len=60)
    eager = greedy(LLM(checkpoint, enforce_eager=True, **ENGINE), prompts, 16)
    graph = LLM(checkpoint, **ENGINE)
    assert graph.engine.runner.mode == "graph"
    assert greedy(graph, prompts, 16) == eager


@pytest.mark.parametrize("choice", ["tensor", "head"])
def test_calibrated_scales_match_the_oracle_with_those_scales(tmp_path, choice):
    path = build_checkpoint(tmp_path, "qwen3", std=0.3)
    llm = LLM(path, enforce_eager=True, kv_cache_scales=choice, **ENGINE)
    scales = engine_scales(llm)
    k0 = scales[0][0]
    assert (k0 != 1).all() and (k0 > 0).all()
    assert (k0 == k0[0]).all() if choice == "tensor" else len(set(k0.tolist())) > 1
    prompts = prompts_of(4, seed=3, max_len=40)
    assert greedy(llm, prompts, 12) == fp8_oracle(path, prompts, 12, scales)


def test_the_rounding_changes_tokens_so_the_oracle_is_not_the_plain_model(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3", std=0.3)
    prompts = prompts_of(6, seed=1, max_len=60)
    ones = [(torch.ones(2), torch.ones(2))] * 2
    assert fp8_oracle(path, prompts, 24, ones) != hf_greedy(path, prompts, 24)


def test_checkpoint_scales_are_used(tmp_path):
    path = build_checkpoint(tmp_path, "llama")
    weights = load_file(f"{path}/model.safetensors")
    weights["model.layers.0.self_attn.k_scale"] = torch.tensor(0.05)
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor(0.01)
    weights["model.layers.1.self_attn.kv_scale"] = torch.tensor([0.02])  # the older name: one for both
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    llm = LLM(path, enforce_eager=True, **ENGINE)
    assert llm.engine.describe()["kv_scales"] == "checkpoint"
    scales = engine_scales(llm)
    got = [s.tolist() for pair in scales for s in pair]
    assert got == [[pytest.approx(x)] * 2 for x in (0.05, 0.01, 0.02, 0.02)]  # scalars for both heads
    prompts = prompts_of(3, seed=4, max_len=30)
    assert greedy(llm, prompts, 8) == fp8_oracle(path, prompts, 8, scales)
    one = LLM(path, enforce_eager=True, kv_cache_scales="one", **ENGINE)  # the checkpoint's are not forced
    assert all((s == 1).all() for pair in engine_scales(one) for s in pair)


def test_scales_for_some_layers_only_are_refused(tmp_path):
    path = build_checkpoint(tmp_path, "llama")
    weights = load_file(f"{path}/model.safetensors")
    weights["model.layers.0.self_attn.k_scale"] = torch.tensor(0.05)
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor(0.05)
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="none for layer 1's K"):
        LLM(path, enforce_eager=True, **ENGINE)


def test_the_cache_holds_more_tokens_in_the_same_memory(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3")
    llms = [LLM(path, enforce_eager=True, max_model_len=128, kv_cache_dtype=d) for d in ("auto", "fp8_e4m3")]
    plain, fp8 = (llm.engine.describe() for llm in llms)
    assert fp8["kv_cache_dtype"] == "float8_e4m3fn" and plain["kv_cache_dtype"] == "float32"
    assert fp8["kv_bytes_per_token"] * 4 == plain["kv_bytes_per_token"]  # float32 on CPU: a quarter
    assert fp8["num_kv_blocks"] == 4 * plain["num_kv_blocks"]


def test_bad_values_are_named(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of .* got 'fp16'"):
        LLM(path, kv_cache_dtype="fp16")
    with pytest.raises(ValueError, match="kv_cache_scales='head' needs kv_cache_dtype='fp8'"):
        LLM(path, kv_cache_scales="head")
    with pytest.raises(ValueError, match="kv_cache_scales must be one of .* got 'max'"):
        LLM(path, kv_cache_dtype="fp8", kv_cache_scales="max")
