"""``SamplingParams(n=k)`` offline, as the server's ``n``: k completions per prompt under ``"outputs"``, choice i
drawn with ``seed + i`` (so each equals a single request with that seed), all alike when greedy; ``n`` < 1 or not
an int is refused by name."""
import dataclasses

import pytest

from nanovllm import LLM, SamplingParams

ENGINE = dict(enforce_eager=True, max_num_seqs=8, kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=64)
PROMPTS = [[5, 9, 13, 2], [11, 3, 7]]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model[1], **ENGINE)


def test_n_choices_are_the_single_requests_with_consecutive_seeds(llm):
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=5, n=3)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert len(out["outputs"]) == 3 and out["token_ids"] == out["outputs"][0]["token_ids"]
        singles = [llm.generate([prompt], dataclasses.replace(params, n=1, seed=5 + i), use_tqdm=False)[0]
                   for i in range(3)]
        assert [o["token_ids"] for o in out["outputs"]] == [o["token_ids"] for o in singles]
    assert len({tuple(o["token_ids"]) for o in outs[0]["outputs"]}) > 1  # different seeds, different samples


def test_greedy_choices_are_alike_and_n_1_keeps_the_plain_output(llm):
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, n=2), use_tqdm=False)[0]
    assert out["outputs"][0]["token_ids"] == out["outputs"][1]["token_ids"]
    assert "outputs" not in llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)[0]


@pytest.mark.parametrize("n", [0, -1, 1.5, "2"])
def test_a_bad_n_is_refused_by_name(n):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        SamplingParams(n=n)
