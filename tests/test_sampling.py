"""Sampling: seeded requests are reproducible and independent of their batch; filters restrict candidates."""
import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams
from nanovllm.kernels.sampling import gumbel_noise, uniform_from_bits
from nanovllm.layers.sampler import sample


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("s"), "qwen3", std=0.02)
    return LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=128)


def test_seeded_request_is_independent_of_batch_companions(llm):
    target = [10, 20, 30, 40]
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=1234)
    alone = llm.generate([target], params, use_tqdm=False)[0]["token_ids"]
    others = [[5, 6, 7], [8] * 30, [9, 9]]
    companions = [SamplingParams(temperature=0.7, max_tokens=8, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    crowd = llm.generate(others + [target], companions + [params], use_tqdm=False)[-1]["token_ids"]
    assert alone == crowd
    assert len(set(alone)) > 1  # temperature 1 on a flat model really samples


def test_different_seeds_draw_different_tokens(llm):
    outs = [llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=s),
                         use_tqdm=False)[0]["token_ids"] for s in (1, 2)]
    assert outs[0] != outs[1]


def test_unseeded_requests_are_reproducible_from_engine_seed(tmp_path):
    path = build_checkpoint(tmp_path, "llama", std=0.02)
    params = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)
    a = LLM(path, enforce_eager=True, num_kvcache_blocks=32, kvcache_block_size=16, seed=7).generate([[4, 5, 6]], params, use_tqdm=False)
    b = LLM(path, enforce_eager=True, num_kvcache_blocks=32, kvcache_block_size=16, seed=7).generate([[4, 5, 6]], params, use_tqdm=False)
    assert a == b


def test_gumbel_noise_is_a_pure_function_and_roughly_standard():
    seeds, pos = torch.tensor([3, 3, 4]), torch.tensor([10, 10, 10])
    g = gumbel_noise(seeds, pos, 50000)
    assert torch.equal(g[0], g[1]) and not torch.equal(g[0], g[2])
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.02 and abs(g.std().item() - 1.2825) < 0.03


def test_uniforms_from_extreme_bits_stay_inside_the_open_interval():
    u = uniform_from_bits(torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 513, 2**32 - 1]))  # 32-bit hash values
    assert (u > 0).all() and (u < 1).all()
    assert u[0] == 2**-24 and u[-1] == 1 - 2**-24 and u[-2] < u[-1]  # 23 bits used, k + 0.5 exact
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_sampler_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    n = logits.shape[0]
    tokens = sample(logits, torch.ones(n), torch.full((n,), -1), torch.ones(n), torch.zeros(n, dtype=torch.long),
                    torch.arange(n))
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.03)


def test_top_k_and_top_p_restrict_candidates():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    n = logits.shape[0]
    ones, seeds, pos = torch.ones(n), torch.zeros(n, dtype=torch.long), torch.arange(n)
    top2 = sample(logits, ones, torch.full((n,), 2), ones, seeds, pos, filtered=True)
    assert set(top2.tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # 0.636, 0.234, ...: top_p=0.7 keeps exactly the first two
    nucleus = sample(logits, ones, torch.full((n,), -1), torch.full((n,), 0.7), seeds, pos, filtered=True)
    assert set(nucleus.tolist()) == {0, 1} and p[0] < 0.7 < p[0] + p[1]


def test_greedy_ignores_filters_and_seed(llm):
    prompt = [3, 1, 4, 1, 5]
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    fancy = llm.generate([prompt], SamplingParams(temperature=0, top_k=3, top_p=0.5, seed=9, max_tokens=8,
                                                  ignore_eos=True), use_tqdm=False)
    assert plain == fancy
