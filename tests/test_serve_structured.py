"""Structured outputs and penalties in the server.  Without a server: every spelling of a constraint gives its
``StructuredOutputsParams``; bad schemas, regexes, grammars, two constraints at once and lone surrogates are 400s
naming the field; penalties reach ``SamplingParams``.  Through the server on the tiny checkpoint, with the
``openai`` client: outputs validate, match or are one of the choices, a mixed batch gives each request what it
gives alone, and penalties reach the engine as offline."""
import asyncio
import json
import re

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("xgrammar")

from nanovllm.entrypoints.protocol import APIError, ChatRequest, CompletionRequest  # noqa: E402
from nanovllm.entrypoints.structured import request_constraint  # noqa: E402
from nanovllm.sampling_params import StructuredOutputsParams  # noqa: E402

# a pattern, not maxLength: xgrammar 0.2.8 lets a string with maxLength hold raw control characters (bad JSON)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
MESSAGES = [{"role": "user", "content": "hi"}]


def request(endpoint: str, **body):
    return ChatRequest(messages=MESSAGES, **body) if endpoint == "chat" else CompletionRequest(prompt="hi", **body)


SPELLINGS = [  # (body, the constraint it means)
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA,
                                                                 "strict": True}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputsParams(json=SCHEMA)),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputsParams(json_object=True)),
    ({"structured_outputs": {"regex": "[a-z]+@[a-z]+\\.com"}}, StructuredOutputsParams(regex="[a-z]+@[a-z]+\\.com")),
    ({"structured_outputs": {"choice": ["yes", "no"], "json": None}}, StructuredOutputsParams(choice=["yes", "no"])),
    ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, StructuredOutputsParams(grammar='root ::= "a" | "b"')),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": "\\d{3}"}, StructuredOutputsParams(regex="\\d{3}")),
    ({"guided_choice": ["red", "blue"]}, StructuredOutputsParams(choice=["red", "blue"])),
    ({"guided_grammar": 'root ::= "x"+'}, StructuredOutputsParams(grammar='root ::= "x"+')),
]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("body,want", SPELLINGS)
def test_every_spelling_gives_its_constraint_and_it_reaches_sampling_params(endpoint, body, want):
    req = request(endpoint, **body)
    got = request_constraint(req)
    assert got == want
    assert req.sampling_params(8, {}, None, structured_outputs=got).structured_outputs == want


BAD = [  # (body, param, words in the message)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "bogus"}}}}}},
     "response_format", "response_format.json_schema cannot be compiled: Unsupported type \"bogus\""),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "'yaml'"),
    ({"guided_json": {"type": "bogus"}}, "guided_json", "guided_json cannot be compiled"),
    ({"guided_json": "{not json"}, "guided_json", "guided_json is not valid JSON"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs",
     "structured_outputs.regex cannot be compiled: Regex parsing error"),
    ({"guided_regex": "[z-a]"}, "guided_regex", "guided_regex cannot be compiled"),
    ({"structured_outputs": {"grammar": "root ::= foo"}}, "structured_outputs",
     "structured_outputs.grammar cannot be compiled: EBNF parser error at line 1, column 10: Rule \"foo\""),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "guided_grammar cannot be compiled"),
    ({"guided_choice": []}, "guided_choice", "guided_choice must be a non-empty list"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag is not supported"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "regex and choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "guided_regex and guided_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format",
     "response_format and structured_outputs.regex"),
]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("body,param,words", BAD)
def test_bad_constraints_are_400s_naming_the_field_and_the_reason(endpoint, body, param, words):
    with pytest.raises(APIError) as e:
        request_constraint(request(endpoint, **body))
    assert e.value.status == 400 and e.value.param == param and words in e.value.message, e.value.message


def test_a_forced_tool_call_and_another_constraint_are_a_400_naming_both():
    req = ChatRequest(messages=MESSAGES, guided_regex="a")
    with pytest.raises(APIError) as e:
        request_constraint(req, StructuredOutputsParams(json={"type": "object"}))
    assert e.value.param == "guided_regex" and "guided_regex and tool_choice" in e.value.message


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_penalties_reach_sampling_params_and_bad_ones_are_400s_naming_them(endpoint):
    p = request(endpoint, presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2).sampling_params(
        8, {}, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    p = request(endpoint).sampling_params(8, {}, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.structured_outputs) == (0, 0, 1, None)
    for field, value in (("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0)):
        req = request(endpoint, **{field: value})
        req.check_unsupported()
        with pytest.raises(APIError) as e:
            req.sampling_params(8, {}, None)
        assert e.value.status == 400 and e.value.param == field and str(value) in e.value.message
    for field, value in (("logit_bias", {"5": 1.0}), ("min_tokens", 3), ("min_p", 0.1)):  # honoured too
        request(endpoint, **{field: value}).check_unsupported()


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
SURROGATE = "caf\udcff"
LONE = [  # (endpoint, body, param): a lone surrogate anywhere a request carries text
    ("completions", {"prompt": SURROGATE}, "prompt"),
    ("completions", {"prompt": ["ok", SURROGATE]}, "prompt"),
    ("completions", {"prompt": "hi", "stop": [SURROGATE]}, "stop"),
    ("completions", {"prompt": "hi", "guided_regex": SURROGATE}, "guided_regex"),
    ("completions", {"prompt": "hi", "guided_choice": ["a", SURROGATE]}, "guided_choice"),
    ("completions", {"prompt": "hi", "structured_outputs": {"json": {"properties": {SURROGATE: {}}}}},
     "structured_outputs"),
    ("chat", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}, "messages"),
    ("chat", {"messages": [{"role": "tool", "tool_call_id": SURROGATE, "content": "x"}]}, "messages"),
    ("chat", {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": SURROGATE}}]}]}, "messages"),
    ("chat", {"messages": MESSAGES, "stop": SURROGATE}, "stop"),
    ("chat", {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f",
                                                                                 "description": SURROGATE}}]}, "tools"),
    ("chat", {"messages": MESSAGES, "tools": [TOOL], "tool_choice": {"type": "function", "function": {
        "name": SURROGATE}}}, "tool_choice"),
    ("chat", {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {SURROGATE: {"type": "string"}}}}}},
     "response_format"),
]


@pytest.mark.parametrize("endpoint,body,param", LONE)
def test_a_lone_surrogate_in_any_text_of_a_request_is_a_400_naming_its_field(endpoint, body, param):
    req = ChatRequest(**body) if endpoint == "chat" else CompletionRequest(**body)
    with pytest.raises(APIError) as e:
        req.check_unsupported()
    assert e.value.status == 400 and e.value.param == param and "lone surrogate" in e.value.message


# --- end to end: the tiny checkpoint's server, driven by the openai client (random weights: the constraint alone
# makes its outputs well formed, so the schemas bound every string and number for the outputs to end) ---

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from serve_helpers import build_text_checkpoint
    return build_text_checkpoint(tmp_path_factory.mktemp("structured"))[0]


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    from serve_helpers import running_server
    with running_server(model_dir, tmp_path_factory.mktemp("log"), "--served-model-name", "tiny",
                        enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=512,
                        max_num_seqs=8) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_outputs_validate_streamed_or_not(client):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, temperature=0,
                                           max_tokens=64)
    text = reply.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    assert reply.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=fmt, temperature=0, max_tokens=64, stream=True)
        if c.choices]
    assert "".join(pieces) == text
    sampled = client.completions.create(model="tiny", prompt="hi", n=3, seed=1, temperature=1.0, max_tokens=64,
                                        extra_body={"guided_json": SCHEMA})
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)


def test_json_object_regex_choice_and_grammar_hold(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
                                           temperature=0, max_tokens=64)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    regex = "[a-z]{2,6}@[a-z]{2,6}\\.(com|org)"
    got = client.completions.create(model="tiny", prompt="mail: ", temperature=0.8, seed=3, n=2, max_tokens=32,
                                    extra_body={"structured_outputs": {"regex": regex}})
    assert all(re.fullmatch(regex, c.text) and c.finish_reason == "stop" for c in got.choices), got.choices
    choices = ["Paris", "London", "Rome"]
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=8,
                                           extra_body={"guided_choice": choices})
    assert reply.choices[0].message.content in choices
    grammar = 'root ::= "one" (", " ("two" | "three"))*'
    got = client.completions.create(model="tiny", prompt="count: ", temperature=0, max_tokens=24,
                                    extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch("one(, (two|three))*", got.choices[0].text), got.choices[0].text


def test_a_mixed_batch_gives_each_request_what_it_gives_alone(client):
    bodies = [dict(prompt="hi", extra_body={"guided_json": SCHEMA}), dict(prompt="The quick brown fox"),
              dict(prompt="mail: ", extra_body={"guided_regex": "[a-z]{2,8}"}),
              dict(prompt="Hello world", frequency_penalty=1.5, presence_penalty=0.5),
              dict(prompt="Paris is", extra_body={"repetition_penalty": 1.3, "guided_choice": ["yes", "no"]})]
    alone = [client.completions.create(model="tiny", temperature=0, max_tokens=24, **b).choices[0].text
             for b in bodies]

    async def together():
        async with openai.AsyncOpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            replies = await asyncio.gather(*(aclient.completions.create(model="tiny", temperature=0, max_tokens=24,
                                                                        **b) for b in bodies))
        return [r.choices[0].text for r in replies]

    assert asyncio.run(together()) == alone


def test_penalties_reach_the_engine_as_offline_llm_applies_them(model_dir, client):
    """The server's penalised completions equal ``LLM.generate``'s with the same ``SamplingParams`` (the engine's
    tests check the formula itself), and differ from the unpenalised ones on this prompt."""
    from nanovllm import LLM, SamplingParams
    body = dict(model="tiny", prompt=[22], temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    plain = client.completions.create(**body).choices[0].text
    got = client.completions.create(frequency_penalty=1.0, presence_penalty=0.5, **body).choices[0].text
    body["extra_body"]["repetition_penalty"] = 8.0
    repeated = client.completions.create(**body).choices[0].text
    with LLM(model_dir, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=512) as llm:
        def offline(**penalties):
            params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **penalties)
            return llm.generate([[22]], params, use_tqdm=False)[0]["text"]
        assert got == offline(frequency_penalty=1.0, presence_penalty=0.5) != plain
        assert repeated == offline(repetition_penalty=8.0) != plain
