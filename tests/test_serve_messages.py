"""Anthropic's ``POST /v1/messages`` through the server's front (FastAPI's TestClient over an ``EngineCore`` in a
thread) on the tiny chain checkpoint: the text, streamed or not, is ``/v1/chat/completions``' answer to the same
greedy request, with Anthropic's shape, events, stop reasons (end_turn, stop_sequence naming the string,
max_tokens) and usage; unknown fields, a missing ``max_tokens``, ``tools`` and non-text blocks are 400s naming
them in Anthropic's error shape; the API key may come as ``x-api-key`` there."""
import json

import pytest

pytest.importorskip("fastapi")

from nanovllm import LLM  # noqa: E402
from serve_helpers import CHAIN_TEXT, build_text_checkpoint, threaded_server  # noqa: E402

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path, _ = build_text_checkpoint(tmp_path_factory.mktemp("messages"))
    with LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256) as llm:
        with threaded_server(llm) as (client, serving):
            client.serving = serving
            yield client


def chat(client, messages, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def message(client, **body) -> dict:
    r = client.post("/v1/messages", json={"model": "tiny", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def events(client, **body) -> list[tuple[str, dict]]:
    """(event name, data) of every event of a streamed message, checking each data's type is its name."""
    out, name = [], None
    with client.stream("POST", "/v1/messages", json={"model": "tiny", "temperature": 0, "stream": True,
                                                     **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                out.append((name, data))
    return out


def test_the_reply_is_the_chat_answer_in_anthropics_shape(client):
    want = chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                max_tokens=32)
    got = message(client, max_tokens=32, system=[{"type": "text", "text": "Be brief."}],
                  messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert want["choices"][0]["message"]["content"] == CHAIN_TEXT
    assert got["id"].startswith("msg_") and got["type"] == "message" and got["role"] == "assistant"
    assert got["model"] == "tiny" and got["content"] == [{"type": "text", "text": CHAIN_TEXT}]
    assert got["stop_reason"] == "end_turn" and got["stop_sequence"] is None
    assert got["usage"] == {"input_tokens": want["usage"]["prompt_tokens"],
                            "output_tokens": want["usage"]["completion_tokens"]}


def test_a_stream_sends_anthropics_events_with_the_chat_text(client):
    got = events(client, max_tokens=32, messages=USER)
    names = [n for n, _ in got]
    assert names[:2] == ["message_start", "content_block_start"] and names[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"} and len(names) > 6  # several text pieces
    start = got[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert got[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    deltas = [d["delta"] for n, d in got if n == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"text_delta"} and "".join(d["text"] for d in deltas) == CHAIN_TEXT
    final = got[-2][1]
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == chat(client, USER, max_tokens=32)["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_and_max_tokens_are_the_stop_reasons(client, stream):
    def run(**body):
        if not stream:
            out = message(client, messages=USER, **body)
            return out["content"][0]["text"], out["stop_reason"], out["stop_sequence"], out["usage"]["output_tokens"]
        got = events(client, messages=USER, **body)
        text = "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta")
        final = got[-2][1]
        return text, final["delta"]["stop_reason"], final["delta"]["stop_sequence"], final["usage"]["output_tokens"]

    assert run(max_tokens=32, stop_sequences=["zzz", "fine"]) == (
        CHAIN_TEXT[:CHAIN_TEXT.index("fine")], "stop_sequence", "fine",
        chat(client, USER, max_tokens=32, stop=["zzz", "fine"])["usage"]["completion_tokens"])
    text, reason, sequence, tokens = run(max_tokens=2)
    assert (reason, sequence, tokens) == ("max_tokens", None, 2)
    assert text == chat(client, USER, max_tokens=2)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body,names", [
    ({"max_tokens": 8, "messages": USER, "thinking": {"type": "enabled"}}, ["unknown field", "thinking"]),
    ({"messages": USER}, ["max_tokens", "Field required"]),
    ({"max_tokens": 8, "messages": USER, "tools": [{"name": "f", "input_schema": {}}]}, ["tools"]),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     ["messages[0].content[0]", "'image'"]),
    ({"max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, ["messages.0.role"]),
    ({"max_tokens": 8, "messages": []}, ["messages must not be empty"]),
])
def test_bad_requests_are_400s_naming_the_field_in_anthropics_shape(client, body, names):
    r = client.post("/v1/messages", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert all(n in error["error"]["message"] for n in names), error


def test_another_model_is_anthropics_not_found(client):
    r = client.post("/v1/messages", json={"model": "other", "max_tokens": 8, "messages": USER})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.post("/v1/chat/completions", json={"model": "other", "messages": USER})  # OpenAI's shape stays
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_the_api_key_may_come_as_x_api_key(client):
    from fastapi.testclient import TestClient

    from nanovllm.entrypoints.app import build_app
    keyed = TestClient(build_app(client.serving, api_key="k"))  # no lifespan: only requests refused before the engine
    body = {"model": "tiny", "messages": USER}  # no max_tokens: a 400 once past the key
    r = keyed.post("/v1/messages", json=body, headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert keyed.post("/v1/messages", json=body, headers={"x-api-key": "k"}).status_code == 400
    assert keyed.post("/v1/messages", json=body, headers={"Authorization": "Bearer k"}).status_code == 400
    assert keyed.post("/v1/chat/completions", json=body, headers={"x-api-key": "k"}).status_code == 401
