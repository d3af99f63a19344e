"""Gemma 3's sliding layers keep only a window's KV (``engine/window_blocks.py``), end to end on a tiny model whose
window is 12 tokens over blocks of 16: long contexts give transformers' greedy tokens in eager and graph mode while a
sequence holds at most its window's blocks and its step's; prefix hits (a whole prompt, half of one, a shared system
prompt) give a cold run's tokens and count their tokens; preemption by a tiny cache and n-gram speculative decoding
(verify steps over the window pool) still match."""
import random

import pytest

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.engine.window_blocks import NULL

W, BS = 12, 16
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3")


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(3, 300) for _ in range(n)] for n in lengths]


def _llm(path: str, **options) -> LLM:
    options = dict(dict(device="cpu", kvcache_block_size=BS, max_num_seqs=4, max_model_len=256,
                        max_num_batched_tokens=64, enforce_eager=True), **options)
    return LLM(path, **options)


def _watch_held_blocks(llm: LLM) -> list[int]:
    """Check every step the scheduler makes: each sequence holds no window block wholly before its step's window,
    and at most ceil((W - 1) / bs) + 1 blocks besides its new tokens'; returns the most held at once, as it goes."""
    scheduler, peak = llm.engine.scheduler, [0]
    window = scheduler.block_manager.window
    schedule = scheduler.schedule

    def checked(*args, **kwargs):
        batch = schedule(*args, **kwargs)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            first = window.first_needed(seq.num_computed_tokens)
            assert all(b == NULL for b in seq.window_table[:first])
            assert window.held_by(seq) <= -(-(W - 1) // BS) + 1 + -(-n // BS) + 1
        peak[0] = max(peak[0], window.num_held_blocks)
        return batch

    scheduler.schedule = checked
    return peak


@pytest.fixture(scope="module")
def long_contexts(gemma):
    """(prompts, transformers' tokens): prompt and completion many windows long, prefilled in chunks of 64."""
    prompts = _prompts(0, (70, 45, 9))
    return prompts, hf_greedy(gemma, prompts, 40)


@pytest.mark.parametrize("eager", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["eager", "graph"])
def test_long_contexts_match_transformers_holding_only_their_windows(gemma, long_contexts, eager):
    prompts, want = long_contexts
    llm = _llm(gemma, enforce_eager=eager, **({} if eager else dict(graph_batch_sizes=[1, 2, 4])))
    try:
        runner = llm.engine.runner
        assert runner.kv_spec.window == W and runner.kv_spec.num_window_blocks(runner.num_blocks) > 1
        assert runner.mode == ("eager" if eager else "graph")
        peak = _watch_held_blocks(llm)
        assert [o["token_ids"] for o in llm.generate(prompts, GREEDY)] == want
        assert 0 < peak[0] <= 3 * (-(-(W - 1) // BS) + 2) + 64 // BS  # vs 17 blocks a full pool holds at the end
        assert llm.engine.block_manager.window.num_held_blocks == 0  # every block back
    finally:
        llm.close()


def test_prefix_hits_give_cold_tokens_and_count_their_tokens(gemma):
    system = _prompts(1, (40,))[0]
    first, other = _prompts(2, (66, 30))
    half = first[:35] + other  # shares two blocks (32 tokens) of ``first``
    shared = [system + tail for tail in _prompts(3, (20, 33))]
    cold = hf_greedy(gemma, [first, half, *shared], 40)
    llm = _llm(gemma)
    try:
        bm = llm.engine.block_manager
        _watch_held_blocks(llm)
        assert llm.generate([first], GREEDY)[0]["token_ids"] == cold[0] and bm.cache_hit_tokens == 0
        assert llm.generate([first], GREEDY)[0]["token_ids"] == cold[0]  # the whole prompt: 4 blocks
        assert bm.cache_hit_tokens == 64
        assert llm.generate([half], GREEDY)[0]["token_ids"] == cold[1]
        assert bm.cache_hit_tokens == 64 + 32
        assert llm.generate([shared[0]], GREEDY)[0]["token_ids"] == cold[2]
        assert llm.generate([shared[1]], GREEDY)[0]["token_ids"] == cold[3]
        assert bm.cache_hit_tokens == 64 + 32 + 32  # the system prompt's two blocks, for the second
    finally:
        llm.close()


def test_preemption_with_a_tiny_cache_matches_transformers(gemma):
    prompts = _prompts(4, (60, 52, 47, 33))  # four of up to 100 tokens in 16 full blocks: some are preempted
    want = hf_greedy(gemma, prompts, 40)
    llm = _llm(gemma, num_kvcache_blocks=16)
    try:
        _watch_held_blocks(llm)
        assert [o["token_ids"] for o in llm.generate(prompts, GREEDY)] == want
        assert llm.engine.scheduler.num_preemptions > 0
    finally:
        llm.close()


def test_ngram_speculation_verifies_over_the_window_pool(gemma):
    rng = random.Random(5)
    base = [rng.randint(3, 300) for _ in range(8)]
    prompts = [base * 6, [rng.randint(3, 300) for _ in range(30)] + base * 3]  # repeats: n-gram proposals
    want = hf_greedy(gemma, prompts, 40)
    llm = _llm(gemma, speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    try:
        _watch_held_blocks(llm)
        assert [o["token_ids"] for o in llm.generate(prompts, GREEDY)] == want
        assert llm.engine.stats["spec_accepted_tokens"] > 0
    finally:
        llm.close()
