"""Tool-call parsers (``nanovllm/entrypoints/parsers/tool_*.py``) on recorded model outputs: each reply parsed whole,
and streamed in pieces of every size, the content and ``delta.tool_calls`` sent adding up (as the ``openai`` client
accumulates them) to the whole reply's; then through the server (``--tool-call-parser``) on a tiny checkpoint that
answers such a reply, with the ``openai`` client: auto calls streamed or not, alike; "none" leaving the markup in
the content; forced calls under every parser; an unknown parser refused at start-up."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("xgrammar")

from nanovllm.entrypoints.parsers import TOOL_PARSERS, tool_parser  # noqa: E402
from nanovllm.entrypoints.protocol import ChatRequest  # noqa: E402
from nanovllm.entrypoints.chat_reply import ToolStream, tool_reply  # noqa: E402
from nanovllm.entrypoints.tool_calls import ToolPlan  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"}, "days": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "timezone": {"type": "string", "pattern": "^[A-Za-z/]{1,20}$"}}, "required": ["timezone"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"}, "limit": {"type": "integer"}, "exact": {"type": "boolean"},
    "threshold": {"type": ["number", "null"]}, "filters": {"type": "object"}, "tags": {"type": "array"},
    "zip": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME, SEARCH]
PARIS, ROME = ("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Rome", "days": 1})

# what the models write (recorded replies, as the detokenizer gives their text)
HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
HERMES_ROME = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>'
HERMES_BAD = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}\n</tool_call>'


def coder(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


CODER, CODER_ROME = coder("get_weather", city="Paris", days="3"), coder("get_weather", city="Rome", days="1")
CODER_TYPES = coder("search", query="42", limit="10", exact="True", threshold="0.5", filters='{"lang": "en"}',
                    tags='["a", "b"]', zip="02139")
CODER_TYPES_ARGS = {"query": "42", "limit": 10, "exact": True, "threshold": 0.5, "filters": {"lang": "en"},
                    "tags": ["a", "b"], "zip": "02139"}
LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'
LLAMA_ROME = '{"name": "get_weather", "parameters": {"city": "Rome", "days": 1}}'
MISTRAL_ITEM = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
MISTRAL_ROME = '{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}'

CASES = [  # (parser, reply, content, calls)
    ("hermes", HERMES, None, [PARIS]),
    ("hermes", HERMES + "\n" + HERMES_ROME, None, [PARIS, ROME]),
    ("hermes", "I'll check the weather in Paris.\n\n" + HERMES, "I'll check the weather in Paris.", [PARIS]),
    ("hermes", HERMES_BAD, HERMES_BAD, []),  # a brace short: stays content
    ("hermes", "The weather is sunny.", "The weather is sunny.", []),
    ("qwen3_coder", CODER, None, [PARIS]),
    ("qwen3_coder", CODER + "\n" + CODER_ROME, None, [PARIS, ROME]),
    ("qwen3_coder", "I'll check the weather in Paris for you.\n" + CODER, "I'll check the weather in Paris for you.",
     [PARIS]),
    ("qwen3_coder", CODER_TYPES, None, [("search", CODER_TYPES_ARGS)]),
    ("qwen3_coder", coder("search", limit="ten", exact="maybe"), None, [("search", {"limit": "ten",
                                                                                 "exact": "maybe"})]),
    ("qwen3_coder", "<tool_call>\n<function=get_time>\n<parameter=timezone>\nEurope/Rome\n</function>\n</tool_call>",
     None, [("get_time", {"timezone": "Europe/Rome"})]),  # no </parameter>: the value ends at </function>
    ("qwen3_coder", HERMES, HERMES, []),  # JSON, not the XML: stays content
    ("qwen3_coder", "Paris is sunny.", "Paris is sunny.", []),
    ("llama3_json", LLAMA, None, [PARIS]),
    ("llama3_json", "<|python_tag|>" + LLAMA, None, [PARIS]),
    ("llama3_json", LLAMA + "; " + LLAMA_ROME, None, [PARIS, ROME]),
    ("llama3_json", "Let me check. " + LLAMA, "Let me check. " + LLAMA, []),  # calls open the reply, or none
    ("llama3_json", LLAMA[:-1], LLAMA[:-1], []),  # cut short: stays content
    ("llama3_json", '{"city": "Paris"}', '{"city": "Paris"}', []),  # no name: not a call
    ("mistral", "[TOOL_CALLS][" + MISTRAL_ITEM + "]", None, [PARIS]),
    ("mistral", "[TOOL_CALLS] [" + MISTRAL_ITEM + ", " + MISTRAL_ROME + "]", None, [PARIS, ROME]),
    ("mistral", "Let me check the weather.[TOOL_CALLS][" + MISTRAL_ITEM + "]", "Let me check the weather.", [PARIS]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]get_weather[ARGS]'
                '{"city": "Rome", "days": 1}', None, [PARIS, ROME]),
    ("mistral", "[TOOL_CALLS][" + MISTRAL_ITEM[:-1] + "]", "[TOOL_CALLS][" + MISTRAL_ITEM[:-1] + "]", []),
    ("mistral", "It is sunny in Paris.", "It is sunny in Paris.", []),
]


def plan(parser: str, choice="auto", **body) -> ToolPlan:
    req = ChatRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice=choice, **body)
    return ToolPlan.of(req, tool_parser(parser))


@pytest.mark.parametrize("parser,reply,content,calls", CASES)
def test_a_recorded_reply_parses_into_content_and_calls(parser, reply, content, calls):
    got_content, got_calls = tool_parser(parser)(TOOLS).parse(reply)
    assert got_content == content
    assert [(name, json.loads(arguments)) for name, arguments in got_calls] == calls
    for _, arguments in got_calls:  # written as json.dumps writes them, whatever the model's spacing
        assert arguments == json.dumps(json.loads(arguments), ensure_ascii=False)


def streamed(tool_plan: ToolPlan, pieces) -> tuple[str | None, list[dict], str | None, list[list[dict]]]:
    """(content, calls as the openai client accumulates them, finish reason, the tool deltas of each push)."""
    stream = ToolStream(tool_plan)
    pushed = [stream.push(p) for p in pieces]
    rest, last, reason = stream.finish("stop")
    content = "".join(c for c, _ in pushed) + rest
    calls = {}
    for delta in [d for _, ds in pushed for d in ds] + last:
        call = calls.setdefault(delta["index"], {"id": None, "name": None, "arguments": ""})
        if "id" in delta:
            assert call["id"] is None and delta["function"]["arguments"] == ""  # id and name first, once
            call["id"], call["name"] = delta["id"], delta["function"]["name"]
        call["arguments"] += delta["function"]["arguments"]
    return content or None, [calls[i] for i in range(len(calls))], reason, [ds for _, ds in pushed]


@pytest.mark.parametrize("parser,reply,content,calls", CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_a_streamed_reply_adds_up_to_the_whole_reply_whatever_the_pieces(parser, reply, content, calls, size):
    tool_plan = plan(parser)
    want_content, want_calls, want_reason = tool_reply(tool_plan, reply, "stop")
    got_content, got_calls, reason, _ = streamed(tool_plan, [reply[i:i + size] for i in range(0, len(reply), size)])
    assert (got_content, reason) == (want_content, want_reason) and got_content == content
    assert [(c["name"], c["arguments"]) for c in got_calls] == [(c["function"]["name"], c["function"]["arguments"])
                                                                 for c in want_calls]
    assert all(c["id"].startswith("call_") for c in got_calls) and len({c["id"] for c in got_calls}) == len(calls)


def test_calls_stream_as_they_are_read_not_at_the_end():
    two = HERMES + "\n" + HERMES_ROME
    *_, deltas = streamed(plan("hermes"), [two[:len(HERMES)], two[len(HERMES):]])
    assert [d["function"].get("name") for d in deltas[0]] == ["get_weather", None]  # the first call, whole
    assert json.loads(deltas[0][1]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    cut = CODER.index("</parameter>") + len("</parameter>")  # qwen3_coder: arguments as each parameter closes
    *_, deltas = streamed(plan("qwen3_coder"), [CODER[:cut], CODER[cut:]])
    assert deltas[0][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas[0][1]["function"]["arguments"] == '{"city": "Paris"'
    assert [d["function"]["arguments"] for d in deltas[1]] == [', "days": 3}']


@pytest.mark.parametrize("parser,reply", [(p, r) for p, r, _, calls in CASES if calls])
def test_tool_choice_none_leaves_the_markup_in_the_content(parser, reply):
    assert tool_reply(plan(parser, "none"), reply, "stop") == (reply, [], "stop")
    content, calls, reason, _ = streamed(plan(parser, "none"), [reply[:5], reply[5:]])
    assert (content, calls, reason) == (reply, [], "stop")


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
def test_forced_calls_read_the_constrained_json_whatever_the_parser(parser):
    required = '[{"name": "get_time", "parameters": {"timezone": "UTC"}}, {"name": "get_weather", "parameters": ' \
               '{"city": "Rome", "days": 1}}]'
    named = '{"city": "Paris", "days": 3}'
    for choice, text, want in [("required", required, [("get_time", {"timezone": "UTC"}), ROME]),
                               ({"type": "function", "function": {"name": "get_weather"}}, named, [PARIS])]:
        tool_plan = plan(parser, choice)
        assert tool_plan.constraint() is not None
        content, calls, reason = tool_reply(tool_plan, text, "stop")
        assert (content, reason) == (None, "tool_calls")
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want
        got_content, got_calls, _, early = streamed(tool_plan, [text[:9], text[9:]])
        assert got_content is None and not any(early)  # given once the choice has finished
        assert [(c["name"], c["arguments"]) for c in got_calls] == [tuple(c["function"].values()) for c in calls]


def test_parallel_tool_calls_false_keeps_the_first_call_with_every_parser():
    for parser, reply, _, calls in CASES:
        if len(calls) == 2:
            _, got, _ = tool_reply(plan(parser, parallel_tool_calls=False), reply, "stop")
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls[:1]


def test_tool_parsers_are_registered_by_name_and_an_unknown_name_is_an_error_naming_the_known_ones():
    assert set(TOOL_PARSERS) == {"hermes", "qwen3_coder", "llama3_json", "mistral"}
    assert all(tool_parser(name).name == name for name in TOOL_PARSERS)
    with pytest.raises(ValueError) as e:
        tool_parser("hermes2")
    assert "'hermes2'" in str(e.value) and all(name in str(e.value) for name in TOOL_PARSERS)


def test_the_server_refuses_an_unknown_tool_call_parser_at_start_up(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nanovllm.serve", str(tmp_path), "--tool-call-parser", "xml"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--tool-call-parser" in out.stderr and "'xml'" in out.stderr and "qwen3_coder" in out.stderr


# --- end to end: per parser, a tiny checkpoint answering a recorded reply in pieces (each a token of its own) ---

openai = pytest.importorskip("openai")
TIME_CALL = ("get_time", {"timezone": "Europe/Paris"})
SERVED = {  # parser: (the reply's pieces, content, reasoning); each reply calls get_weather (Paris, 3), then get_time
    "hermes": (["I'll check both.", "\n\n<tool_call>\n", '{"name": "get_weather", "arguments": ',
                '{"city": "Paris", "days": 3}', "}\n</tool_call>\n", "<tool_call>\n",
                '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}', "\n</tool_call>"],
               "I'll check both.", None),
    "qwen3_coder": (["<think>\n", "The user wants the weather and the time.", "\n</think>\n\n", "Checking.\n",
                     "<tool_call>\n<function=get_weather>\n", "<parameter=city>\n", "Paris", "\n</parameter>\n",
                     "<parameter=days>\n3", "\n</parameter>\n</function>\n</tool_call>\n",
                     "<tool_call>\n<function=get_time>\n<parameter=timezone>\n", "Europe/", "Paris\n",
                     "</parameter>\n</function>\n</tool_call>"],
                    "Checking.", "The user wants the weather and the time."),
    "llama3_json": (["<|python_tag|>", '{"name": "get_weather", "parameters": ', '{"city": "Paris", "days": 3}}',
                     "; ", '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}'], None, None),
    "mistral": (["Checking both.", "[TOOL_CALLS]", '[{"name": "get_weather", "arguments": {"city": "Paris", ',
                 '"days": 3}}', ", ", '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]'],
                "Checking both.", None),
}


@pytest.fixture(scope="module", params=sorted(SERVED))
def served(request, tmp_path_factory):
    """(parser name, openai client) of a server whose model answers ``SERVED[parser]`` (qwen3_coder's behind the
    qwen3 reasoning parser)."""
    from serve_helpers import build_reply_checkpoint, running_server
    name = request.param
    model_dir = build_reply_checkpoint(tmp_path_factory.mktemp(name), SERVED[name][0])
    flags = ["--tool-call-parser", name] + (["--reasoning-parser", "qwen3"] if name == "qwen3_coder" else [])
    with running_server(model_dir, tmp_path_factory.mktemp("log"), "--served-model-name", "tiny", *flags,
                        enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=512,
                        max_num_seqs=4) as base:
        yield name, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def reply_and_stream(client, **body):
    """(the non-streamed choice, the streamed one as the openai client accumulates it, the streamed tool deltas)"""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    ask = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=64, **body)
    reply = client.chat.completions.create(**ask)
    state, deltas = ChatCompletionStreamState(), []
    for chunk in client.chat.completions.create(stream=True, **ask):
        state.handle_chunk(chunk)
        deltas += [d for c in chunk.choices for d in c.delta.tool_calls or ()]
    return reply.choices[0], state.get_final_completion().choices[0], deltas


def calls_of(choice) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]


def test_auto_calls_streamed_add_up_to_exactly_the_non_streamed_ones(served):
    name, client = served
    _, content, reasoning = SERVED[name]
    reply, streamed_choice, deltas = reply_and_stream(client, tools=TOOLS)
    calls = calls_of(reply)
    assert [(n, json.loads(a)) for n, a in calls] == [PARIS, TIME_CALL]
    assert calls_of(streamed_choice) == calls  # the arguments strings, exactly
    assert reply.finish_reason == streamed_choice.finish_reason == "tool_calls"
    assert reply.message.content == streamed_choice.message.content == content
    assert getattr(reply.message, "reasoning", None) == reasoning
    assert [(d.index, d.id is not None, d.function.name) for d in deltas if d.id] == [
        (0, True, "get_weather"), (1, True, "get_time")]  # each call opens with its id and name
    assert all(c.id.startswith("call_") for c in streamed_choice.message.tool_calls)
    if name == "qwen3_coder":  # arguments in fragments: the brace once the name is read, then each parameter
        assert [d.function.arguments for d in deltas if d.index == 0 and not d.id] == ['{', '"city": "Paris"',
                                                                                       ', "days": 3}']


def test_tool_choice_none_leaves_the_models_markup_in_the_content(served):
    name, client = served
    pieces, _, reasoning = SERVED[name]
    text = "".join(pieces)
    if reasoning is not None:
        text = text[text.index("</think>") + len("</think>"):].lstrip()
    reply, streamed_choice, deltas = reply_and_stream(client, tools=TOOLS, tool_choice="none")
    assert reply.message.content == streamed_choice.message.content == text
    assert not reply.message.tool_calls and not deltas and reply.finish_reason == "stop"


def test_a_named_function_is_a_valid_call_under_every_parser_streamed_or_not(served):
    jsonschema = pytest.importorskip("jsonschema")
    _, client = served
    reply, streamed_choice, _ = reply_and_stream(client, tools=[WEATHER, TIME],
                                                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert reply.finish_reason == streamed_choice.finish_reason == "tool_calls"
    calls = calls_of(reply)
    assert len(calls) == 1 and calls == calls_of(streamed_choice) and calls[0][0] == "get_weather"
    jsonschema.validate(json.loads(calls[0][1]), WEATHER["function"]["parameters"])
