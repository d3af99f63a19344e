"""Greedy float32 output is token-identical to transformers, whatever the cache and scheduler do."""
import random

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def mixed_prompts(n=6, seed=0, max_len=40):
    rng = random.Random(seed)
    return [[rng.randint(3, 383) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def test_greedy_matches_transformers_on_mixed_length_batch(tiny_model):
    arch, path = tiny_model
    prompts = mixed_prompts()
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64)
    out = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in out] == hf_greedy(path, prompts, 10)


def test_llama3_rope_scaling_and_tied_embeddings_match_transformers(tmp_path):
    path = build_checkpoint(tmp_path, "llama3")
    prompts = mixed_prompts(4, seed=1, max_len=90)
    out = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64).generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in out] == hf_greedy(path, prompts, 10)


def test_prefix_cache_hit_gives_same_tokens_as_miss(tiny_model):
    arch, path = tiny_model
    shared = mixed_prompts(1, seed=2, max_len=1)[0] + [7] * 47  # 48 tokens: three full blocks of 16
    prompts = [shared + [11, 12, 13], shared + [21], shared]  # the last one is entirely a cached prefix
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    hits_before = llm.engine.block_manager.cache_hit_tokens
    again = llm.generate(prompts, GREEDY, use_tqdm=False)  # now every full block hits the cache
    assert [o["token_ids"] for o in first] == [o["token_ids"] for o in again] == hf_greedy(path, prompts, 10)
    # the others wait a step for the first's blocks (``shared_prefix.py``): none reads a block not yet computed
    assert hits_before == 48 + 32
    assert llm.engine.block_manager.cache_hit_tokens - hits_before == 48 + 48 + 32  # a whole-prompt hit leaves its last


def test_identical_prompts_in_one_step_match_transformers(tiny_model):
    arch, path = tiny_model
    prompt = [5] * 37
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64)
    out = llm.generate([prompt, prompt, prompt], GREEDY, use_tqdm=False)
    assert all(o["token_ids"] == hf_greedy(path, [prompt], 10)[0] for o in out)


def test_preemption_with_tiny_kv_cache_loses_nothing_and_matches(tiny_model):
    arch, path = tiny_model
    prompts = mixed_prompts(8, seed=3, max_len=30)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=64)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.cache_hit_tokens > 0  # re-admitted sequences hit their own freed blocks
    assert [o["token_ids"] for o in out] == hf_greedy(path, prompts, 24)


def test_chunked_prefill_matches_transformers(tiny_model):
    arch, path = tiny_model
    prompts = mixed_prompts(3, seed=4, max_len=100)
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_num_batched_tokens=24)
    out = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in out] == hf_greedy(path, prompts, 10)


def test_generation_stops_on_eos_stop_ids_max_tokens_and_max_model_len(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3")
    prompt = mixed_prompts(1, seed=5, max_len=20)[0]
    ref = hf_greedy(path, [prompt], 12)[0]
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=len(prompt) + 5)
    stop = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ref[3]])
    got = llm.generate([prompt], stop, use_tqdm=False)[0]["token_ids"]
    assert got == ref[:ref.index(ref[3]) + 1]
    capped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert capped[0]["token_ids"] == ref[:5]  # max_model_len reached first
    short = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert short[0]["token_ids"] == ref[:2]


def test_eos_from_generation_config_stops(tmp_path):
    import json
    path = build_checkpoint(tmp_path, "qwen2")
    prompt = mixed_prompts(1, seed=6, max_len=20)[0]
    ref = hf_greedy(path, [prompt], 8)[0]
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": [999, ref[2]]}, f)
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64)
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]["token_ids"]
    assert got == ref[:ref.index(ref[2]) + 1]


def test_stop_tokens_and_slot_reuse_while_the_next_step_is_already_launched(tiny_model):
    """The engine launches step n+1 before it reads step n's tokens: a sequence that stops on a token at step n
    is already in step n+1, whose row must be ignored; finished sequences' token slots go to new ones."""
    arch, path = tiny_model
    prompts = mixed_prompts(7, seed=4, max_len=25)
    full = hf_greedy(path, prompts, 12)
    # stop each sequence on the token it greedily produces at a different step (none for the last)
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ids[i + 1]]) for i, ids in enumerate(full[:-1])]
    params.append(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    expected = [ids[:ids.index(p.stop_token_ids[0]) + 1] if p.stop_token_ids else ids for ids, p in zip(full, params)]
    llm = LLM(path, enforce_eager=True, max_num_seqs=3, kvcache_block_size=16, num_kvcache_blocks=64)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in out] == expected
    assert any(len(e) < 12 for e in expected)
    assert sorted(llm.engine.scheduler.free_slots) == list(range(3))  # every slot came back
