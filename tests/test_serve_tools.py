"""Tool calls: ``tools``/``tool_choice`` checks, the schemas that force a call, the hermes parser on worked examples, a
streamed choice adding up to the reply, the chat template rendering tools and history; and through the server on the
tiny checkpoint with the ``openai`` client, named and "required" calls with valid arguments, streamed or not."""
import json

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("xgrammar")

from nanovllm.entrypoints.protocol import APIError, ChatRequest  # noqa: E402
from nanovllm.entrypoints.parsers import tool_parser  # noqa: E402
from nanovllm.entrypoints.chat_reply import ToolStream, tool_reply  # noqa: E402
from nanovllm.entrypoints.tool_calls import ToolPlan  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
                                               "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters


def chat(**body) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hi"}], **body)


def plan(**body) -> ToolPlan | None:
    return ToolPlan.of(chat(**body))


def test_tool_choice_defaults_to_auto_with_tools_and_none_renders_no_tools():
    assert plan() is None and plan(tool_choice="none") is None
    auto = plan(tools=[WEATHER])
    assert auto.mode == "auto" and auto.render == [WEATHER] and auto.constraint() is None
    none = plan(tools=[WEATHER], tool_choice="none")
    assert none.mode == "none" and none.render is None
    assert tool_reply(none, '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', "stop")[1] == []


def test_a_named_function_is_constrained_to_its_parameters():
    named = plan(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.mode == "named" and named.constraint().json == WEATHER["function"]["parameters"]
    empty = plan(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert empty.constraint().json == {"type": "object", "properties": {}}
    content, calls, reason = tool_reply(named, '{"city": "Paris", "unit": "c"}', "stop")
    assert content is None and reason == "tool_calls" and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert tool_reply(named, '{"city": "Par', "length") == ('{"city": "Par', [], "length")  # cut short: no call


def test_required_is_an_array_of_calls_to_any_tool():
    required = plan(tools=[WEATHER, TIME], tool_choice="required")
    schema = required.constraint().json
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert [item["properties"]["name"] for item in schema["items"]["anyOf"]] == [{"const": "get_weather"},
                                                                               {"const": "get_time"}]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    text = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo", ' \
           '"unit": "f"}}]'
    content, calls, reason = tool_reply(required, text, "stop")
    assert content is None and reason == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {}), ("get_weather", {"city": "Oslo", "unit": "f"})]
    one = plan(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert one.constraint().json["maxItems"] == 1


@pytest.mark.parametrize("body,param,words", [
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "nope"),
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}), "tool_choice", "get_weather"),
    (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice", "sometimes"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools", "tools[0].function.name"),
    (dict(tools=[WEATHER, {"type": "retrieval"}]), "tools", "tools[1].type"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]), "tools", "parameters"),
])
def test_bad_tools_and_tool_choices_are_400s_naming_them(body, param, words):
    with pytest.raises(APIError) as e:
        plan(**body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_a_schema_xgrammar_rejects_in_a_forced_tool_is_a_400_naming_the_tool():
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "bogus"}}}}}
    with pytest.raises(APIError) as e:
        plan(tools=[WEATHER, bad], tool_choice="required").constraint()
    assert e.value.param == "tools" and "tools[1].function.parameters" in e.value.message
    assert "bogus" in e.value.message


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'


@pytest.mark.parametrize("text,content,calls", [
    (CALL, None, [("get_weather", {"city": "Paris", "unit": "c"})]),
    (CALL + "\n" + CALL.replace("Paris", "Rome"), None,
     [("get_weather", {"city": "Paris", "unit": "c"}), ("get_weather", {"city": "Rome", "unit": "c"})]),
    ("Let me look.\n" + CALL + "\nDone.", "Let me look.\nDone.", [("get_weather", {"city": "Paris", "unit": "c"})]),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),  # stays content
    ("<tool_call>{bad}</tool_call> " + CALL, "<tool_call>{bad}</tool_call>",
     [("get_weather", {"city": "Paris", "unit": "c"})]),
    ('<tool_call>\n{"name": "get_time", "arguments": {}}\n', None, [("get_time", {})]),  # no closing tag
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ("Just text, no call.", "Just text, no call.", []),
])
def test_the_hermes_parser(text, content, calls):
    got_content, got_calls = tool_parser("hermes")().parse(text)
    assert got_content == content
    assert [(name, json.loads(arguments)) for name, arguments in got_calls] == calls


def test_auto_replies_finish_on_tool_calls_only_when_a_call_parsed():
    auto = plan(tools=[WEATHER])
    assert tool_reply(auto, "Hello", "stop") == ("Hello", [], "stop")
    assert tool_reply(auto, "", "length") == (None, [], "length")
    content, calls, reason = tool_reply(auto, "Sure. " + CALL, "stop")
    assert (content, reason, [c["function"]["name"] for c in calls]) == ("Sure.", "tool_calls", ["get_weather"])


@pytest.mark.parametrize("text", ["Let me look. \n" + CALL + "\nDone.", "  \n" + CALL, "Plain <tool text, then more.",
                                  "Ends with <tool_ca", "", CALL + CALL, "<tool_call>{bad}</tool_call> tail"])
@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_streamed_choice_adds_up_to_the_reply_whatever_the_pieces(text, choice):
    tool_plan = plan(tools=[WEATHER], tool_choice=choice)
    want_content, want_calls, want_reason = tool_reply(tool_plan, text, "stop")
    for size in (1, 3, 7):
        stream = ToolStream(tool_plan)
        pushed = [stream.push(text[i:i + size]) for i in range(0, len(text), size)]
        sent = "".join(content for content, _ in pushed)
        assert "<tool_call" not in sent.replace(want_content or "", "")  # no markup of a call goes out early
        rest, deltas, reason = stream.finish("stop")
        assert (sent + rest or None, reason) == (want_content, want_reason)
        deltas = [d for _, early in pushed for d in early] + deltas
        calls = {}
        for d in deltas:
            calls.setdefault(d["index"], {"name": "", "arguments": ""})
            calls[d["index"]]["name"] += d["function"].get("name", "")
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
        assert [calls[i] for i in range(len(calls))] == [c["function"] for c in want_calls]


def test_the_chat_template_renders_tools_and_tool_history(tmp_path):
    from nanovllm.prompts import Prompts
    from serve_helpers import build_tokenizer
    tok = build_tokenizer(tmp_path)
    tok.chat_template = (
        "{% for t in tools or [] %}TOOL {{ t.function.name }}; {% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{% if m.tool_call_id %} FOR {{ m.tool_call_id }}{% endif %}; {% endfor %}")
    tok.save_pretrained(tmp_path)
    prompts = Prompts(str(tmp_path), {}, 384, 4096)
    req = chat(tools=[WEATHER])
    req.messages += ChatRequest(messages=[
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]).messages
    messages = [m.template_dict(i) for i, m in enumerate(req.messages)]
    text = prompts.tokenizer.decode(prompts.apply_chat_template(messages, tools=req.tools))
    assert text == "TOOL get_weather; user: hi; assistant:  CALL get_weather Paris; tool: sunny FOR call_1; "
    assert "TOOL" not in prompts.tokenizer.decode(prompts.apply_chat_template(messages))


def test_a_history_call_whose_arguments_are_not_json_is_a_400():
    req = ChatRequest(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}])
    with pytest.raises(APIError) as e:
        req.messages[0].template_dict(0)
    assert e.value.param == "messages" and "messages[0].tool_calls[0].function.arguments" in e.value.message


# --- end to end: the tiny checkpoint's server (random weights: the grammar alone makes the calls well formed) ---

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from serve_helpers import build_text_checkpoint, running_server
    model_dir, _ = build_text_checkpoint(tmp_path_factory.mktemp("tools"))
    with running_server(model_dir, tmp_path_factory.mktemp("log"), "--served-model-name", "tiny",
                        enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=512,
                        max_num_seqs=4) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def reply_and_stream(client, **body):
    """(the non-streamed choice, the streamed one as the openai client accumulates it)"""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           temperature=0, max_tokens=64, **body)
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                temperature=0, max_tokens=64, stream=True, **body):
        state.handle_chunk(chunk)
    return reply.choices[0], state.get_final_completion().choices[0]


def calls_of(choice) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or ()]


@pytest.mark.parametrize("choice,parallel", [({"type": "function", "function": {"name": "get_weather"}}, None),
                                             ("required", None), ("required", False)])
def test_forced_calls_have_valid_arguments_streamed_or_not(client, choice, parallel):
    jsonschema = pytest.importorskip("jsonschema")
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    reply, streamed = reply_and_stream(client, tools=[WEATHER, TIME], tool_choice=choice, **extra)
    assert reply.finish_reason == streamed.finish_reason == "tool_calls"
    assert reply.message.content is None and streamed.message.content is None
    calls = calls_of(reply)
    assert calls and calls == calls_of(streamed)
    assert all(c.id.startswith("call_") and c.type == "function" for c in reply.message.tool_calls)
    if isinstance(choice, dict) or parallel is False:
        assert len(calls) == 1
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in (WEATHER, TIME)}
    for name, arguments in calls:
        jsonschema.validate(arguments, schemas[name])
    if isinstance(choice, dict):
        assert calls[0][0] == "get_weather"


def test_auto_without_markup_is_plain_content_streamed_or_not(client):
    from serve_helpers import CHAIN_TEXT
    reply, streamed = reply_and_stream(client, tools=[WEATHER])
    assert reply.message.content == streamed.message.content == CHAIN_TEXT
    assert reply.message.tool_calls is None and not streamed.message.tool_calls
    assert reply.finish_reason == streamed.finish_reason == "stop"


def test_a_conversation_with_tool_history_is_answered(client):
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], temperature=0,
                                           max_tokens=32)
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content
