"""``/v1/completions`` with ``echo``, in process (FastAPI's TestClient over an ``EngineCore`` in a thread, as in
``test_serve_loop.py``): the prompt's text comes before the completion's, streamed or not, and with ``logprobs`` the
prompt's tokens come first in the legacy ``logprobs`` object, with the numbers of offline ``prompt_logprobs``: what
lm-eval-harness's ``local-completions`` backend sends for loglikelihood tasks."""
import contextlib
import json

import pytest

pytest.importorskip("fastapi")


from nanovllm import LLM, SamplingParams  # noqa: E402
from serve_helpers import build_text_checkpoint, threaded_server  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path, _ = build_text_checkpoint(tmp_path_factory.mktemp("echo"))
    with LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256) as llm:
        yield llm


@contextlib.contextmanager
def served(llm):
    """A client of the server's front on ``llm``'s engine (``serve_helpers.threaded_server``)."""
    with threaded_server(llm) as (client, _):
        yield client


def completion(client, **body) -> dict:
    r = client.post("/v1/completions", json={"model": "tiny", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def streamed_choices(client, **body) -> list[dict]:
    """The choices of every chunk of a streamed completion, in order."""
    choices = []
    with client.stream("POST", "/v1/completions", json={"model": "tiny", "temperature": 0, "stream": True,
                                                        **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices += json.loads(line[len("data: "):])["choices"]
    return choices


def test_echo_without_logprobs_puts_the_prompt_before_the_completion(llm):
    want = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]["text"]
    with served(llm) as client:
        got = completion(client, prompt=PROMPT, max_tokens=5, echo=True)
        chunks = streamed_choices(client, prompt=PROMPT, max_tokens=5, echo=True)
    assert got["choices"][0]["text"] == PROMPT + want and got["choices"][0]["logprobs"] is None
    assert chunks[0]["text"].startswith(PROMPT) and "".join(c["text"] for c in chunks) == PROMPT + want


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_with_logprobs_gives_the_offline_prompt_logprobs_then_the_completions(llm, as_ids):
    ids = llm.encode_prompt(PROMPT)
    offline = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=1, prompt_logprobs=1),
                           use_tqdm=False)[0]
    text = llm.tokenizer.decode
    body = dict(prompt=ids if as_ids else PROMPT, max_tokens=1, echo=True, logprobs=1)
    with served(llm) as client:
        got = completion(client, **body)
        chunks = streamed_choices(client, **body)
    choice = got["choices"][0]
    lp = choice["logprobs"]
    entries = offline["prompt_logprobs"] + offline["logprobs"]
    tokens = ids + offline["token_ids"]
    assert lp["tokens"] == [text([t]) for t in tokens]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([e[t] for e, t in zip(entries[1:], tokens[1:])], abs=1e-6)
    for top, entry in zip(lp["top_logprobs"][1:], entries[1:]):
        assert top == pytest.approx({text([t]): v for t, v in entry.items()}, abs=1e-6)
        assert 1 <= len(top) <= 2
    texts = [text([t]) for t in ids]
    assert lp["text_offset"][:len(ids)] == [sum(map(len, texts[:i])) for i in range(len(ids))]
    assert choice["text"] == PROMPT + offline["text"]
    # streamed: the prompt and its logprobs in the first chunk, and the same numbers in all
    assert chunks[0]["text"].startswith(PROMPT) and chunks[0]["logprobs"]["tokens"][:len(ids)] == texts
    assert [x for c in chunks for x in c["logprobs"]["token_logprobs"]] == lp["token_logprobs"]
