"""The server takes OpenAI image parts for a vision-language model: a chat completion with a base64 image equals
offline ``LLM.chat`` on the same image, greedy; a malformed or unreadable image is a 400 and the server stays up."""
import base64
import contextlib
import io

import pytest

pytest.importorskip("fastapi")
from serve_helpers import post, running_server  # noqa: E402
from vl_checkpoints import build_vl_checkpoint, picture  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory):
    path = build_vl_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl"), "qwen2_5_vl")
    engine = dict(device="cpu", dtype="float32", enforce_eager=True, max_model_len=1024)
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(running_server(path, tmp_path_factory.mktemp("log"), **engine))
        yield base, path, engine


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_with_an_image_part_equals_offline_chat(vl_server):
    from nanovllm import LLM, SamplingParams
    base, path, engine = vl_server
    img = picture(100, 70, 7)
    parts = [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": "What is it?"}]
    r = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}], "max_tokens": 8,
                                            "temperature": 0, "logprobs": True}, None)
    assert r.status_code == 200, r.text
    body = r.json()
    served = [t["token"] for t in body["choices"][0]["logprobs"]["content"]]
    llm = LLM(path, **engine)
    offline = llm.chat([{"role": "user", "content": [{"type": "image", "image": img},
                                                     {"type": "text", "text": "What is it?"}]}],
                       SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert served == [llm.tokenizer.decode([t]) for t in offline["token_ids"]]
    assert body["usage"]["prompt_tokens"] == len(llm.encode_request(
        {"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": "<|vision_start|><|image_pad|>"
                                                       "<|vision_end|>What is it?"}]),
         "multi_modal_data": {"image": img}})[0])


@pytest.mark.parametrize("part,words", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}},
     "cannot be read"),
    ({"type": "image_url"}, "image_url"),
])
def test_bad_image_parts_are_400_and_the_server_goes_on(vl_server, part, words):
    base, _, _ = vl_server
    r = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}, None)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages" and words in r.json()["error"]["message"]
    ok = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, None)
    assert ok.status_code == 200
