"""Penalties (vLLM's semantics) change the logits inside the step: repetition penalty greedy outputs equal
transformers' ``generate(repetition_penalty=...)``; frequency and presence penalties pick, at every step, the token
the formula picks from the raw logprobs the step reports; a mixed batch gives each request what it gets alone; the
per-slot counts survive preemption and follow tokens that top-k re-draws; graph mode equals eager.
"""
from collections import Counter

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=128)
PROMPTS = [[5, 6, 7, 8, 5, 6], [9, 10], [11, 12, 13, 14, 15, 16], [30, 31, 32]]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("penalties"), "qwen3")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, enforce_eager=True, **ENGINE)


def _greedy(**penalties) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **penalties)


def test_repetition_penalty_is_token_identical_to_transformers(llm, path):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    got = llm.generate(PROMPTS, _greedy(repetition_penalty=1.8), use_tqdm=False)
    plain = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
    assert any(g["token_ids"] != p["token_ids"] for g, p in zip(got, plain))  # the penalty changes something
    for prompt, out in zip(PROMPTS, got):
        x = torch.tensor([prompt])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
                               min_new_tokens=0, eos_token_id=None, pad_token_id=0, repetition_penalty=1.8)
        assert out["token_ids"] == y[0, len(prompt):].tolist()


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 1.2), (0.7, 0.6)])
def test_frequency_and_presence_penalties_pick_the_token_the_formula_picks(llm, frequency, presence):
    params = _greedy(frequency_penalty=frequency, presence_penalty=presence, logprobs=20)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    plain = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
    assert any(o["token_ids"] != p["token_ids"] for o, p in zip(outs, plain))
    for out in outs:
        for i, (token, entry) in enumerate(zip(out["token_ids"], out["logprobs"])):
            counts = Counter(out["token_ids"][:i])  # the raw logprobs of the step, before the penalties

            def score(t):
                return entry[t] - frequency * counts[t] - presence * (counts[t] > 0)

            # penalties only lower a score, so no token outside the reported top 20 can beat the 20th's raw logprob
            assert all(score(token) >= score(t) - 1e-4 for t in entry), (i, token, entry)
            assert score(token) >= min(entry.values()) - 1e-4


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(llm):
    params = [_greedy(repetition_penalty=1.5), _greedy(), _greedy(frequency_penalty=1.0),
              SamplingParams(temperature=0.8, seed=3, top_k=5, presence_penalty=1.0, max_tokens=16, ignore_eos=True)]
    together = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, p, out in zip(PROMPTS, params, together):
        assert llm.generate([prompt], p, use_tqdm=False)[0]["token_ids"] == out["token_ids"]


def test_counts_follow_tokens_that_top_k_redraws(llm):
    params = SamplingParams(temperature=1.0, seed=7, top_k=3, frequency_penalty=0.5, max_tokens=12, ignore_eos=True)
    seq_tokens = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]["token_ids"]
    runner = llm.engine.runner
    slot = runner.logits_slots.owner.index(max(s for s in runner.logits_slots.owner if s is not None))
    want = torch.bincount(torch.tensor(seq_tokens), minlength=runner.vocab_size).to(torch.int32)
    assert torch.equal(runner.logits_state.counts[slot].cpu(), want)


def test_penalties_survive_preemption(path):
    tight = LLM(path, enforce_eager=True, **dict(ENGINE, num_kvcache_blocks=3, max_model_len=32))
    roomy = LLM(path, enforce_eager=True, **ENGINE)
    params = _greedy(repetition_penalty=1.4, frequency_penalty=0.5)
    got = tight.generate(PROMPTS[1:], params, use_tqdm=False)
    assert tight.engine.stats["preemptions"] > 0
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in roomy.generate(PROMPTS[1:], params,
                                                                                       use_tqdm=False)]


@pytest.mark.slow
def test_graph_mode_equals_eager_with_penalties(path, llm, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    graph = LLM(path, graph_batch_sizes=[1, 2, 4], **ENGINE)
    params = [_greedy(repetition_penalty=1.5, logprobs=2), _greedy(), _greedy(frequency_penalty=1.0),
              SamplingParams(temperature=0.8, seed=3, top_k=5, presence_penalty=1.0, max_tokens=16, ignore_eos=True)]
    want = llm.generate(PROMPTS, params, use_tqdm=False)
    got = graph.generate(PROMPTS, params, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
    assert "processed_logprobs" in graph.engine.describe()["variant_graph_sizes"]  # every batch asks logprobs
