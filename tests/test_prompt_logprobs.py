"""``SamplingParams(prompt_logprobs=k)``: per prompt token, transformers' float32 log_softmax of it and of the top k
(within 1e-4), position 0 None, one entry per prompt token; for a plain prompt, for a prompt chunked over several
prefill steps and for a prompt whose prefix is in the prefix cache (which it does not take, yet it publishes its own
blocks), in eager and graph mode; a batch mixing it with plain requests leaves theirs as they are alone; a preempted
request reports them once; a vision-language prompt and two tensor-parallel ranks too; a bad value is refused by
name."""
import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams

# max_num_batched_tokens 32: a 70-token prompt takes three prefill steps
ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=128,
              max_num_batched_tokens=32)
LONG = [(7 * i + 3) % 380 + 3 for i in range(70)]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("prompt_logprobs"), "qwen3")


@pytest.fixture(scope="module")
def hf(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["eager", "graph"])
def llm(request, path, tmp_path_factory):
    if request.param == "eager":
        yield LLM(path, enforce_eager=True, **ENGINE)
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOVLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield LLM(path, graph_batch_sizes=[1, 2, 4], **ENGINE)


def check_prompt_logprobs(hf, prompt: list[int], got: list, k: int) -> None:
    """``got`` (an output's ``prompt_logprobs``) is transformers' over ``prompt``: the prompt token's logprob first,
    then the top ``k`` tokens', within 1e-4."""
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    assert len(got) == len(prompt) and got[0] is None
    for p in range(1, len(prompt)):
        entry, row, token = got[p], want[p - 1], prompt[p]
        assert next(iter(entry)) == token and entry[token] == pytest.approx(row[token].item(), abs=1e-4)
        top = row.topk(k)
        assert set(entry) == {token, *top.indices.tolist()}
        assert [entry[t] for t in top.indices.tolist()] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_plain_and_chunked_prompts_equal_transformers(llm, hf):
    plain = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    outs = llm.generate([plain, LONG], [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=5),
                                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)],
                        use_tqdm=False)
    check_prompt_logprobs(hf, plain, outs[0]["prompt_logprobs"], 5)
    check_prompt_logprobs(hf, LONG, outs[1]["prompt_logprobs"], 0)
    assert all(len(e) == 1 for e in outs[1]["prompt_logprobs"][1:])  # k = 0: the prompt token's own only
    assert len(outs[0]["token_ids"]) == 3 and len(outs[1]["token_ids"]) == 1


def test_a_shared_prefix_is_computed_again_and_published(llm, hf):
    bm = llm.engine.block_manager
    plain = SamplingParams(temperature=0, max_tokens=2)
    llm.generate([LONG[:50] + [1, 2]], plain, use_tqdm=False)  # its first three blocks go into the prefix cache
    hits = bm.cache_hit_tokens
    prompt = LONG[:48] + [21, 22, 23, 24, 25]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2), use_tqdm=False)[0]
    assert bm.cache_hit_tokens == hits  # no hit: the 48 cached tokens were computed again
    check_prompt_logprobs(hf, prompt, out["prompt_logprobs"], 2)
    assert out["token_ids"] == llm.generate([prompt], plain, use_tqdm=False)[0]["token_ids"]
    assert bm.cache_hit_tokens == hits + 48  # the plain request took the hit
    later = prompt[:-1] + [30]  # after a reset, only the prompt-logprobs request can have published its blocks
    reset = llm.engine.reset_prefix_cache
    reset()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    hits = bm.cache_hit_tokens
    llm.generate([later], plain, use_tqdm=False)
    assert bm.cache_hit_tokens == hits + 48


def test_a_mixed_batch_leaves_the_plain_requests_as_alone(llm, hf):
    prompts = [[40, 41, 42, 43], LONG[:40], [50, 51, 52, 53, 54, 55]]
    plain = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0.8, seed=7, max_tokens=4, ignore_eos=True)]
    alone = llm.generate([prompts[0], prompts[2]], plain, use_tqdm=False)
    asked = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    mixed = llm.generate(prompts, [plain[0], asked, plain[1]], use_tqdm=False)
    for a, m in zip(alone, (mixed[0], mixed[2])):
        assert m["token_ids"] == a["token_ids"] and m["prompt_logprobs"] is None
    assert [list(e) for e in mixed[0]["logprobs"]] == [list(e) for e in alone[0]["logprobs"]]
    for a, m in zip(alone[0]["logprobs"], mixed[0]["logprobs"]):
        assert list(m.values()) == pytest.approx(list(a.values()), abs=1e-5)
    check_prompt_logprobs(hf, prompts[1], mixed[1]["prompt_logprobs"], 3)


@pytest.mark.parametrize("value, error, words", [(21, ValueError, "prompt_logprobs must be in [0, 20], got 21"),
                                                 (-1, ValueError, "got -1"),
                                                 ("3", TypeError, "prompt_logprobs must be an int or None, got str"),
                                                 (True, TypeError, "got bool True")])
def test_a_bad_prompt_logprobs_is_refused_by_value(value, error, words):
    with pytest.raises(error) as e:
        SamplingParams(prompt_logprobs=value)
    assert words in str(e.value)


def test_a_preempted_request_reports_its_prompt_logprobs_once(path, hf):
    llm = LLM(path, enforce_eager=True, max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=10,
              max_model_len=128)
    prompts = [[60 + 3 * i + j for j in range(20)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.stats["preemptions"] > 0  # readmitted, each recomputed its prompt without reporting it again
    for prompt, out in zip(prompts, outs):
        check_prompt_logprobs(hf, prompt, out["prompt_logprobs"], 1)
        assert len(out["token_ids"]) == 40
    llm.close()


def test_a_vision_language_prompt_with_an_image_agrees_with_its_sampled_logprobs(tmp_path):
    """Qwen3-VL, prefill chunked inside the image (its tokens 4..7, chunks of 6): the prompt's greedy next token,
    appended to it, gets as its prompt logprob entry what the sampled row reported for it (another code path)."""
    from vl_checkpoints import build_vl_checkpoint, picture
    path = build_vl_checkpoint(tmp_path, "qwen3_vl")
    llm = LLM(path, enforce_eager=True, dtype="float32", max_model_len=512, max_num_batched_tokens=6)
    image = {"image": picture(64, 64, 3)}
    ids, _ = llm.encode_request({"prompt": "Look at <|vision_start|><|image_pad|><|vision_end|> and tell me",
                                 "multi_modal_data": image})
    sampled = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": image}],
                           SamplingParams(temperature=0, max_tokens=1, logprobs=2), use_tqdm=False)[0]
    longer = ids + sampled["token_ids"]
    out = llm.generate([{"prompt_token_ids": longer, "multi_modal_data": image}],
                       SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    got = out["prompt_logprobs"]
    assert len(got) == len(longer) and got[0] is None
    assert all(next(iter(got[p])) == longer[p] for p in range(1, len(longer)))
    want = sampled["logprobs"][0]
    assert list(got[-1]) == list(want) and list(got[-1].values()) == pytest.approx(list(want.values()), abs=1e-4)
    llm.close()


def test_two_tensor_parallel_ranks_report_transformers_prompt_logprobs(path, hf):
    """Every rank runs the prompt-logprob rows (the LM head gathers its vocabulary shards over the group)."""
    with LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE) as llm:
        outs = llm.generate([LONG, LONG[:9]], [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=4),
                                               SamplingParams(temperature=0, max_tokens=2)], use_tqdm=False)
    check_prompt_logprobs(hf, LONG, outs[0]["prompt_logprobs"], 4)
    assert outs[1]["prompt_logprobs"] is None
