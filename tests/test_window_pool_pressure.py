"""A window pool that may run out (``KVCacheSpec.pressured``), end to end on the tiny Gemma 3 of
``test_window_pool_engine.py`` (window 12 over blocks of 16): a budget of 120 full blocks' bytes is too small for the
never-run-out pool of 8 sequences, so the pool gets 3/32 of the full blocks (10 for 98 full ones, where 8 decoding
sequences may need 16: a sequence of max_model_len, 512 tokens, needs 32 full and 3 window ones), and 12 prompts of 40-120 tokens run through it with preemptions for window blocks, giving
transformers' greedy tokens in eager and graph mode and under n-gram speculation, the pool's bug check never
firing and its held blocks never more than it has."""
import random

import pytest

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.engine import kv_cache

W, BS = 12, 16
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
BUDGET = 120 * 2 * 2 * 32 * BS * 4  # 120 full blocks: one full layer of 2 KV heads of 32, K and V, float32


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3")


@pytest.fixture(scope="module")
def prompts_and_want(gemma):
    rng = random.Random(7)
    prompts = [[rng.randint(3, 300) for _ in range(rng.randint(40, 120))] for _ in range(12)]
    return prompts, hf_greedy(gemma, prompts, 40)


def _run(path: str, prompts, monkeypatch, **options) -> tuple[list[list[int]], LLM]:
    """Generate on a pressured pool, checking the pool after every step; returns the tokens and the engine."""
    monkeypatch.setattr(kv_cache, "DEFAULT_KV_BYTES", BUDGET)  # the CPU's budget
    options = dict(dict(device="cpu", kvcache_block_size=BS, max_num_seqs=8, max_model_len=512,
                        max_num_batched_tokens=64, enforce_eager=True), **options)
    llm = LLM(path, **options)
    spec, runner = llm.engine.runner.kv_spec, llm.engine.runner
    assert spec.window == W and spec.pressured and (spec.window_need, spec.full_need) == (3, 32)
    assert runner.num_blocks == 98 and spec.num_window_blocks(98) == 10 + 1  # vs 28 + 16 kept never to run out
    scheduler = llm.engine.scheduler
    window, schedule = scheduler.block_manager.window, scheduler.schedule

    def checked(*args, **kwargs):
        batch = schedule(*args, **kwargs)
        assert window.num_held_blocks <= window.num_blocks - 1 and window.num_free_blocks >= 0
        return batch

    scheduler.schedule = checked
    try:
        tokens = [o["token_ids"] for o in llm.generate(prompts, GREEDY)]
    except BaseException:
        llm.close()
        raise
    assert window.num_held_blocks == 0 and window.peak_held == window.num_blocks - 1  # all used, all back
    return tokens, llm


@pytest.mark.parametrize("eager", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["eager", "graph"])
def test_many_sequences_through_a_pool_that_runs_out_match_transformers(gemma, prompts_and_want, monkeypatch, eager):
    prompts, want = prompts_and_want
    options = {} if eager else dict(enforce_eager=False, graph_batch_sizes=[1, 2, 4, 8])
    tokens, llm = _run(gemma, prompts, monkeypatch, **options)
    try:
        assert llm.engine.runner.mode == ("eager" if eager else "graph")
        assert tokens == want
        assert llm.engine.scheduler.window_preemptions > 0
    finally:
        llm.close()


def test_ngram_speculation_through_a_pool_that_runs_out_matches_transformers(gemma, monkeypatch):
    rng = random.Random(8)
    prompts = []
    for _ in range(10):  # repeats: n-gram proposals
        base = [rng.randint(3, 300) for _ in range(8)]
        prompts.append([rng.randint(3, 300) for _ in range(rng.randint(10, 60))] + base * rng.randint(3, 6))
    want = hf_greedy(gemma, prompts, 40)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    tokens, llm = _run(gemma, prompts, monkeypatch, speculative_config=spec)
    try:
        assert tokens == want
        assert llm.engine.stats["spec_accepted_tokens"] > 0 and llm.engine.scheduler.window_preemptions > 0
    finally:
        llm.close()
