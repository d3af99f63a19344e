"""The OpenAI-compatible server, started in a subprocess on a tiny checkpoint and driven by the official ``openai``
client (and ``httpx`` where the raw response matters): outputs equal offline ``LLM``'s, streams equal non-streamed
replies, stop strings, ``n``, logprobs, 32 concurrent streams, dropped streams, the bounded queue, errors, the API
key and the metrics (the prefix cache's counters too); serve_bench.py's workloads: tests/test_serve_bench.py."""
import asyncio
import json
import random

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from nanovllm import LLM, SamplingParams  # noqa: E402
from serve_helpers import (CHAIN_TEXT, build_text_checkpoint, metrics, post, running_server,  # noqa: E402
                           stream_text, wait_for_metrics)

KEY = "test-key"
MAX_WAITING = 32
# room for 32 sequences of max_model_len, so the 32 long streams of the queue test keep running for 2,000 steps
ENGINE = dict(enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=4200, max_model_len=2048,
              max_num_seqs=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_text_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    with running_server(model[0], tmp_path_factory.mktemp("log"), "--served-model-name", "tiny", "--api-key", KEY,
                        "--max-waiting-seqs", str(MAX_WAITING), **ENGINE) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(model):
    return LLM(model[0], **ENGINE)


@pytest.mark.parametrize("prompt", ["The quick brown fox", [5, 6, 7, 8, 9]])
def test_greedy_completion_and_logprobs_equal_offline_and_the_stream_equals_the_reply(client, offline, prompt):
    want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=12, logprobs=3), use_tqdm=False)[0]
    got = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=12, logprobs=3)
    choice = got.choices[0]
    assert choice.text == want["text"] and choice.finish_reason == want["finish_reason"]
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert got.usage.prompt_tokens == len(offline.encode_prompt(prompt))
    assert choice.logprobs.token_logprobs == pytest.approx([next(iter(e.values())) for e in want["logprobs"]],
                                                            abs=1e-4)
    for top, entry in zip(choice.logprobs.top_logprobs, want["logprobs"]):  # keyed by token text
        assert top == pytest.approx({offline.tokenizer.decode([t]): v for t, v in entry.items()}, abs=1e-4)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=12, logprobs=3,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.text for k in chunks for c in k.choices) == choice.text
    assert [c.finish_reason for k in chunks for c in k.choices if c.finish_reason] == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    streamed = [x for k in chunks for c in k.choices for x in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(choice.logprobs.token_logprobs, abs=1e-6)


def test_a_list_of_prompts_with_n_and_echo(client, offline):
    prompts = ["Hello world", "The quick"]
    got = client.completions.create(model="tiny", prompt=prompts, n=2, echo=True, max_tokens=3, temperature=0)
    assert sorted(c.index for c in got.choices) == [0, 1, 2, 3]
    for c in got.choices:  # choice index = prompt index * n + choice
        want = offline.generate([prompts[c.index // 2]], SamplingParams(temperature=0, max_tokens=3),
                                use_tqdm=False)[0]["text"]
        assert c.text == prompts[c.index // 2] + want
    assert got.usage.prompt_tokens == sum(len(offline.encode_prompt(p)) for p in prompts)
    streamed = {}
    for chunk in client.completions.create(model="tiny", prompt=prompts, n=2, echo=True, max_tokens=3,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in got.choices}


def test_chat_streams_multibyte_characters_whole(client, offline):
    messages = [{"role": "user", "content": "Say something."}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, logprobs=True,
                                           top_logprobs=2)
    assert reply.choices[0].message.content == CHAIN_TEXT and reply.choices[0].finish_reason == "stop"
    tokens = len(offline.tokenizer.encode(CHAIN_TEXT)) + 1  # and EOS
    assert reply.usage.prompt_tokens == len(offline.apply_chat_template(messages))
    assert reply.usage.completion_tokens == tokens == len(reply.choices[0].logprobs.content)
    joined = b"".join(bytes(t.bytes) for t in reply.choices[0].logprobs.content[:-1])
    assert joined.decode() == CHAIN_TEXT  # the bytes of the tokens of a split character join into it
    pieces, last = stream_text(client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(pieces) == CHAIN_TEXT and last["usage"].completion_tokens == tokens
    assert not any("\ufffd" in p for p in pieces)  # no piece ends inside a character (pieces may join steps)


def test_stop_strings_and_stop_token_ids(client, model, offline):
    start = [model[1][0]]  # the chain's first token: the model answers CHAIN_TEXT
    got = client.completions.create(model="tiny", prompt=start, temperature=0, max_tokens=40, stop=["☃𝄞", "zzz"])
    assert got.choices[0].text == "Zoë: " and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(offline.tokenizer.encode("Zoë: ☃𝄞"))
    pieces, last = stream_text(client.completions.create(model="tiny", prompt=start, temperature=0, max_tokens=40,
                                                         stop="☃𝄞", stream=True))
    assert "".join(pieces) == "Zoë: " and last["finish_reason"] == "stop"
    colon = offline.tokenizer.convert_tokens_to_ids(":")
    got = client.completions.create(model="tiny", prompt=start, temperature=0, max_tokens=40,
                                    extra_body={"stop_token_ids": [colon]})
    assert got.choices[0].text == "Zoë" and got.choices[0].finish_reason == "stop"
    got = client.completions.create(model="tiny", prompt=start, temperature=0, max_tokens=2, stop="Paris")
    assert got.choices[0].text == "Zo" and got.choices[0].finish_reason == "length"


def test_n_choices_are_seeded_draws_equal_to_offline(client, offline):
    got = client.completions.create(model="tiny", prompt=[5, 6, 7], n=2, temperature=1.0, seed=3, max_tokens=8,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in got.choices) == [0, 1] and got.usage.completion_tokens == 16
    for choice in got.choices:
        params = SamplingParams(temperature=1.0, seed=3 + choice.index, max_tokens=8, ignore_eos=True)
        assert choice.text == offline.generate([[5, 6, 7]], params, use_tqdm=False)[0]["text"]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                          temperature=0)
    assert [c.message.content for c in chat.choices] == [CHAIN_TEXT, CHAIN_TEXT]


@pytest.mark.slow
def test_32_concurrent_streams_all_finish(server):
    async def one(aclient, i):
        stream = await aclient.completions.create(model="tiny", prompt=f"Hello {i}", max_tokens=16, temperature=0.8,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        text, reason, usage = "", None, None
        async for chunk in stream:
            for c in chunk.choices:
                text, reason = text + c.text, c.finish_reason or reason
            usage = chunk.usage or usage
        return text, reason, usage.completion_tokens

    async def run():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))

    results = asyncio.run(run())
    assert [(reason, tokens) for _, reason, tokens in results] == [("length", 16)] * 32
    assert all(text for text, _, _ in results)


def test_dropped_streams_free_their_kv_and_a_full_queue_answers_503(server, client):
    before = metrics(server).get('nanovllm:request_success_total{abort}', 0.0)
    long = dict(model="tiny", prompt=[5, 6], max_tokens=2000, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
    running = client.completions.create(n=32, **long)  # fills every batch slot (max_num_seqs=32)
    next(iter(running))  # a first token: all 32 are running
    waiting = client.completions.create(n=20, **long)  # no slot: waits
    assert metrics(server)["nanovllm:num_requests_waiting"] == 20
    with pytest.raises(openai.APIStatusError) as refused:  # 20 more would pass --max-waiting-seqs=32
        client.completions.create(n=20, **long)
    assert refused.value.status_code == 503 and "max-waiting-seqs" in refused.value.message
    with pytest.raises(httpx.TimeoutException):  # a non-streamed request whose client gives up while it waits
        httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5,
                   json={"model": "tiny", "prompt": [5, 6], "max_tokens": 2000, "ignore_eos": True})
    assert wait_for_metrics(server, num_requests_waiting=20)["nanovllm:num_requests_waiting"] == 20
    running.close()
    waiting.close()
    m = wait_for_metrics(server, num_requests_running=0, num_requests_waiting=0, kv_cache_usage_perc=0)
    assert (m["nanovllm:num_requests_running"], m["nanovllm:num_requests_waiting"]) == (0, 0)
    assert m["nanovllm:kv_cache_usage_perc"] == 0
    assert m['nanovllm:request_success_total{abort}'] - before == 53  # aborted, not finished on length


BAD = [  # (path, body, status, param, words in the message)
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", "-1"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "hot"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, 400, "logprobs", "6"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "0"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", "-5"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty", "[-2, 2], got 2.5"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", "got 0"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"five": 1}}, 400, "logit_bias", "'five'"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999": 1}}, 400, "logit_bias", "99999"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p", "1.5"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens", "-1"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "(a"}, 400, "guided_regex", "guided_regex cannot be"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}, 400, "guided_regex",
     "guided_regex and guided_choice"),
    ("/v1/completions", r'{"prompt": "hi", "guided_choice": ["\udcff"]}', 400, "guided_choice", "lone surrogate"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", ""),
    ("/v1/completions", {"prompt": [5] * 2100}, 400, "prompt", "2100"),
    ("/v1/completions", {"prompt": [5] * 2048}, 400, "prompt", "2048"),
    ("/v1/completions", {"prompt": [5] * 10, "max_tokens": 2040}, 400, "max_tokens", "2050"),
    ("/v1/completions", {"prompt": [5, 9999]}, 400, "prompt", "9999"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", ""),
    ("/v1/completions", r'{"prompt": "caf\udcff"}', 400, "prompt", "lone surrogate"),  # raw: JSON's escape
    ("/v1/completions", r'{"prompt": "hi", "stop": ["\ud800"]}', 400, "stop", "lone surrogate"),
    ("/v1/completions", {"temperature": 0}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("/v1/completions", '{"prompt": "hi",', 400, None, "JSON"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ""),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\udcff"}]}', 400, "messages",
     "lone surrogate"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
     r'"function": {"name": "f", "description": "\udcff"}}]}', 400, "tools", "lone surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, 400, "response_format",
     "response_format.json_schema cannot be compiled"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}, 400, "tool_choice", "'g'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -2.5}, 400,
     "frequency_penalty", "-2.5"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", "image_url"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21,
                              "logprobs": True}, 400, "top_logprobs", "21"),
    ("/v1/nowhere", {}, 404, None, ""),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD)
def test_bad_requests_get_openai_errors_naming_the_field(server, path, body, status, param, words):
    r = post(server, path, body, KEY)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"]


def test_the_server_stays_up_after_errors_and_the_client_sees_them(server, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi")
    assert httpx.get(server + "/health").status_code == 200
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].finish_reason


def test_api_key(server):
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server + "/health").status_code == 200  # health, version and metrics are open
    assert httpx.get(server + "/metrics").status_code == 200


def test_models_version_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert "version" in httpx.get(server + "/version").json()
    client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    m = metrics(server)  # parsed by prometheus_client's parser
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"nanovllm:{name}" in m
    assert m["nanovllm:prompt_tokens_total"] > 0 and m["nanovllm:generation_tokens_total"] >= 3
    assert m["nanovllm:time_to_first_token_seconds_count"] >= 1
    assert m["nanovllm:inter_token_latency_seconds_count"] >= 2


def test_the_prefix_cache_counters_grow_by_the_shared_full_blocks(server, client):
    """As vLLM's: queries count every prompt token admitted, hits those served from the cache.  Two prompts share 40
    tokens, two full blocks of 16 and 8 more: the second is served the two blocks."""
    rng = random.Random(7)
    shared = [rng.randint(0, 383) for _ in range(40)]
    prompts = [shared + [rng.randint(0, 383) for _ in range(n)] for n in (5, 9)]
    before = metrics(server)
    for prompt in prompts:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    after = metrics(server)
    grew = {k: after[f"nanovllm:prefix_cache_{k}_total"] - before[f"nanovllm:prefix_cache_{k}_total"]
            for k in ("queries", "hits")}
    assert grew == {"queries": 45 + 49, "hits": 32}


def test_every_engine_option_is_a_server_flag(capsys):
    from nanovllm.cli import flag_name
    from nanovllm.config import engine_fields
    from nanovllm.entrypoints.cli import main, make_parser
    text = make_parser().format_help()
    assert all(flag_name(f.name) in text for f in engine_fields() if f.name != "model")
    with pytest.raises(SystemExit, match="nanovllm serve MODEL"):
        main(["--help"])
    assert json.loads(json.dumps(make_parser().parse_args(["m", "--port", "1"]).port)) == 1


def test_the_server_leaves_every_engine_default_to_llm():
    """No engine option has a second default in the server: a flag not given is not passed (pipeline_depth is 3,
    EngineConfig's, offline and online)."""
    from nanovllm.cli import engine_kwargs
    from nanovllm.entrypoints.cli import make_parser
    assert engine_kwargs(make_parser().parse_args(["m"])) == {}
    assert engine_kwargs(make_parser().parse_args(["m", "--pipeline-depth", "2"])) == {"pipeline_depth": 2}
