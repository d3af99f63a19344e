"""``min_p``, ``min_tokens`` and ``logit_bias`` (vLLM's semantics): the min-p filter against a float64 reference
and inside the sampler; min_p 1 at temperature 1 is greedy; min_tokens holds back EOS, ``stop_token_ids`` and stop
strings until the completion is that long; a +100 bias forces a token, -100 bans it, an id outside the vocabulary
is a ValueError naming it; graph mode equals eager; and the server maps the fields (string keys of ``logit_bias``
too) to ``SamplingParams`` instead of refusing them, a bad key being a 400 naming ``logit_bias``.  On the tiny
text checkpoint (``serve_helpers``), which answers its chain after the chain's first token, then EOS.
"""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.detokenizer import TextStream
from nanovllm.kernels.sampling import apply_min_p, filtered_gumbel_argmax
from serve_helpers import CHAIN_TEXT, build_text_checkpoint

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_text_checkpoint(tmp_path_factory.mktemp("sampling_fields"))  # (path, chain)


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(checkpoint[0], enforce_eager=True, **ENGINE)
    yield engine
    engine.close()


def _kept_reference(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = (logits.double() / temperature.double()[:, None]).softmax(dim=-1)
    return probs >= min_p.double()[:, None] * probs.max(dim=-1, keepdim=True).values


def test_min_p_keeps_what_the_float64_reference_keeps():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0], [2.0, 1.0, 0.0, -1.0, 3.0], [0.5, 0.5, 0.4, -9.0, 0.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0]])
    temperature, min_p = torch.tensor([1.0, 1.0, 0.5, 2.0]), torch.tensor([0.3, 0.1, 0.9, 1.0])
    kept = apply_min_p(logits / temperature[:, None], min_p).isfinite()
    assert kept.tolist() == [[True, False, False, False, True], [True, True, False, False, True],
                             [True, True, False, False, False], [True] * 5]
    assert torch.equal(kept, _kept_reference(logits, temperature, min_p))
    torch.manual_seed(0)
    logits, temperature, min_p = torch.randn(64, 300) * 3, torch.rand(64) + 0.3, torch.rand(64)
    x = logits.double() / temperature.double()[:, None]
    ratio = (x - x.max(dim=-1, keepdim=True).values).exp()
    clear = (ratio - min_p.double()[:, None]).abs() > 1e-5  # away from float32's rounding at the threshold
    kept = apply_min_p(logits / temperature[:, None], min_p).isfinite()
    want = _kept_reference(logits, temperature, min_p)
    assert torch.equal(kept[clear], want[clear]) and kept.sum() < kept.numel()
    assert apply_min_p(logits, torch.zeros(64)).isfinite().all()  # 0 is off


def test_the_sampler_draws_only_what_min_p_keeps():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 2.5]]).repeat(400, 1)
    ones, seeds, pos = torch.ones(400), torch.arange(400), torch.zeros(400, dtype=torch.long)
    off = torch.full((400,), -1)
    drawn = filtered_gumbel_argmax(logits, ones, off, ones, seeds, pos, torch.full((400,), 0.5))
    assert set(drawn.tolist()) == {0, 4}  # e^-0.5 = 0.61 >= 0.5, the others below
    assert set(filtered_gumbel_argmax(logits, ones, off, ones, seeds, pos, torch.zeros(400)).tolist()) == set(range(5))


def test_min_p_1_at_temperature_1_is_greedy_and_leaves_its_batch_alone(llm):
    prompts = [[5, 6, 7], [40, 41], [100, 3, 9, 200]]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    mixed = [SamplingParams(temperature=1.0, min_p=1.0, seed=3, max_tokens=8, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
             SamplingParams(temperature=1.0, min_p=1.0, max_tokens=8, ignore_eos=True)]
    got = llm.generate(prompts, mixed, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in greedy]
    sampled = llm.generate(prompts, SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)
    assert [o["token_ids"] for o in sampled] != [o["token_ids"] for o in greedy]  # temperature 1 alone draws others


def test_min_tokens_holds_back_eos_then_lets_it_end_the_completion(llm, checkpoint):
    eos = checkpoint[1][-1]
    for n in (0, 1, 4):
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=16, min_tokens=n,
                                                       logit_bias={eos: 100.0}), use_tqdm=False)[0]
        assert out["token_ids"][-1] == eos and eos not in out["token_ids"][:-1], out
        assert len(out["token_ids"]) == n + 1 and out["finish_reason"] == "stop"  # n tokens, then EOS
    seven = SamplingParams(temperature=0, max_tokens=16, min_tokens=3, logit_bias={7: 100.0}, stop_token_ids=[7],
                           ignore_eos=True)
    out = llm.generate([[5, 6]], seven, use_tqdm=False)[0]
    assert out["token_ids"][-1] == 7 and 7 not in out["token_ids"][:-1] and len(out["token_ids"]) == 4
    assert out["finish_reason"] == "stop"


def test_min_tokens_holds_back_stop_strings(llm, checkpoint):
    chain = checkpoint[1]
    tok = llm.tokenizer
    k = next(i for i in range(1, len(chain)) if "fine" in tok.decode(chain[1:i + 1]))  # the token that ends it
    stopped = llm.generate([chain[:1]], SamplingParams(temperature=0, max_tokens=32, stop=["fine"], min_tokens=k),
                           use_tqdm=False)[0]
    assert stopped["text"] == CHAIN_TEXT[:CHAIN_TEXT.index("fine")] and stopped["finish_reason"] == "stop"
    held = llm.generate([chain[:1]], SamplingParams(temperature=0, max_tokens=32, stop=["fine"], min_tokens=k + 1),
                        use_tqdm=False)[0]
    assert held["text"] == CHAIN_TEXT and held["token_ids"] == chain[1:]


class _Chars:
    """A tokenizer whose token i is ``chr(97 + i)`` (no fast backend: ``TextStream`` re-decodes)."""
    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(97 + i) for i in ids)


def test_a_text_stream_looks_for_stop_strings_only_from_min_tokens_on():
    stream = TextStream(_Chars(), ("bc",), min_tokens=3)  # "bcabc": the first "bc" ends before token 3
    assert stream.push([1, 2, 0, 1, 2]) == "bca" and stream.stopped and stream.num_tokens == 5
    assert TextStream(_Chars(), ("bc",), min_tokens=3).push([1, 2]) == "b"  # held back as a possible stop
    assert TextStream(_Chars(), ("bc",), min_tokens=2).push([1, 2, 0, 1, 2]) == ""


def test_logit_bias_forces_and_bans_tokens_and_refuses_ids_outside_the_vocabulary(llm, checkpoint):
    chain = checkpoint[1]
    forced = llm.generate([[5, 6, 7], chain[:1]], [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                                  logit_bias={9: 100.0}),
                                                   SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)],
                          use_tqdm=False)
    assert forced[0]["token_ids"] == [9] * 6 and forced[1]["token_ids"] == chain[1:7]  # its neighbour unbiased
    banned = llm.generate([chain[:1]], SamplingParams(temperature=0, max_tokens=2, logit_bias={chain[1]: -100}),
                          use_tqdm=False)[0]
    assert banned["token_ids"][0] != chain[1]
    clamped = llm.generate([chain[:1]], SamplingParams(temperature=0, max_tokens=2, logit_bias={chain[1]: -1e6,
                                                                                              9: 1e6}),
                           use_tqdm=False)[0]
    assert clamped["token_ids"] == [9, 9]
    with pytest.raises(ValueError, match="logit_bias token id 384 "):
        llm.generate([[5]], SamplingParams(logit_bias={384: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="-2"):
        SamplingParams(logit_bias={-2: 1.0})
    with pytest.raises(ValueError, match="min_p must be in"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)
    assert llm.generate([[5]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                        use_tqdm=False)[0]["token_ids"]  # the engine still serves after the refusal


@pytest.mark.slow
def test_graph_mode_equals_eager(checkpoint, llm, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    graph = LLM(checkpoint[0], graph_batch_sizes=[1, 2, 4], **ENGINE)
    eos = checkpoint[1][-1]
    params = [SamplingParams(temperature=0, max_tokens=12, min_tokens=5, logit_bias={eos: 100.0}),
              SamplingParams(temperature=0.9, seed=1, min_p=0.2, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, logit_bias={9: 3.0, 11: -100}, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    prompts = [[5, 6, 7], [40, 41], [100, 3, 9], checkpoint[1][:1]]
    want = llm.generate(prompts, params, use_tqdm=False)
    try:
        assert [o["token_ids"] for o in graph.generate(prompts, params, use_tqdm=False)] == \
            [o["token_ids"] for o in want]
    finally:
        graph.close()


@pytest.fixture(scope="module")
def server(checkpoint):
    pytest.importorskip("fastapi")
    from serve_helpers import threaded_server
    engine = LLM(checkpoint[0], enforce_eager=True, **ENGINE)
    try:
        with threaded_server(engine) as (client, serving):
            yield client, serving
    finally:
        engine.close()


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_the_server_maps_the_fields_to_sampling_params(endpoint):
    from nanovllm.entrypoints.protocol import APIError, ChatRequest, CompletionRequest
    body = dict(min_p=0.25, min_tokens=2, logit_bias={"5": 200.0, "7": -3})
    req = ChatRequest(messages=[{"role": "user", "content": "hi"}], **body) if endpoint == "chat" \
        else CompletionRequest(prompt="hi", **body)
    req.check_unsupported()  # no longer refused
    p = req.sampling_params(8, {}, None, vocab_size=384)
    assert (p.min_p, p.min_tokens, p.logit_bias) == (0.25, 2, {5: 200.0, 7: -3.0})
    for bias in ({"x": 1.0}, {"384": 1.0}, {"-1": 1.0}):
        with pytest.raises(APIError) as e:
            type(req)(**{**req.model_dump(exclude_unset=True), "logit_bias": bias}).sampling_params(
                8, {}, None, vocab_size=384)
        assert e.value.status == 400 and e.value.param == "logit_bias", e.value.message


def test_the_server_honours_the_fields(server, checkpoint):
    client, _ = server
    chain, messages = checkpoint[1], [{"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 1.0, "seed": 5, "min_p": 1.0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == CHAIN_TEXT  # min_p 1: the greedy answer
    r = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 40,
                                                  "min_tokens": len(chain) + 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= len(chain) + 2  # EOS held back past the chain
    r = client.post("/v1/completions", json={"prompt": chain[:1], "temperature": 0, "max_tokens": 4,
                                             "ignore_eos": True, "logit_bias": {str(chain[3]): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == server[1].tokenizer.decode([chain[3]] * 4)
    for bias in ({"x": 1}, {"384": 1}):
        r = client.post("/v1/completions", json={"prompt": "hi", "logit_bias": bias})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
