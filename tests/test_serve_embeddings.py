"""``POST /v1/embeddings`` through the server's front (FastAPI's TestClient) and an ``EngineCore`` in a thread over the
engine process's pipes: every input shape gives ``LLM.embed``'s vectors in order, as floats or base64, with usage;
``dimensions`` follows vLLM's Matryoshka rule; bad requests are 400s naming the field; completions still run.  Then
the ``nanovllm.serve`` command with ``--pooler-config``, through the ``openai`` client (which asks for base64)."""
import base64

import numpy as np
import pytest

pytest.importorskip("fastapi")

from nanovllm import LLM, PoolingParams  # noqa: E402
from nanovllm.pooling_params import PoolerConfig  # noqa: E402
from serve_helpers import build_text_checkpoint, running_server, threaded_server  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is in France.", "Hello world"]
IDS = [[5, 6, 7, 8], list(range(20, 90))]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_text_checkpoint(tmp_path_factory.mktemp("embed_serve"))[0]


@pytest.fixture(scope="module")
def server(path):
    """(client, the LLM's own embeddings of TEXTS and IDS by token ids, those ids, the MEAN embedding of IDS[1],
    the ``Serving``); the engine runs in a thread."""
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=128,
              max_num_batched_tokens=32)
    expected = {tuple(o.prompt_token_ids): o.outputs.embedding for o in llm.embed(TEXTS + IDS, use_tqdm=False)}
    mean = llm.embed(IDS[1], PoolingParams(pooling_type="MEAN"), use_tqdm=False)[0].outputs.embedding
    tokens = [llm.tokenizer.encode(t) for t in TEXTS] + IDS
    try:
        with threaded_server(llm, max_waiting_seqs=16, pooler=llm.config.pooler) as (client, serving):
            yield client, expected, tokens, mean, serving
    finally:
        llm.close()


def _vectors(body: dict) -> list:
    assert body["object"] == "list" and body["model"] == "tiny" and body["id"].startswith("embd-")
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "embedding" for d in body["data"])
    return [d["embedding"] for d in body["data"]]


@pytest.mark.parametrize("given,rows", [
    (TEXTS[0], [0]), (TEXTS, [0, 1, 2]), (IDS[0], [3]), (IDS, [3, 4]),
])
def test_every_input_shape_gives_llm_embed_vectors_in_order(server, given, rows):
    client, expected, tokens = server[:3]
    r = client.post("/v1/embeddings", json={"model": "tiny", "input": given, "user": "someone"})
    assert r.status_code == 200, r.text
    body = r.json()
    for got, row in zip(_vectors(body), rows, strict=True):
        np.testing.assert_allclose(got, expected[tuple(tokens[row])], atol=1e-6, rtol=0)
    used = sum(len(tokens[row]) for row in rows)
    assert body["usage"] == {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0,
                             "prompt_tokens_details": None}


def test_base64_is_the_float32_bytes_and_truncation_keeps_the_last_tokens(server):
    client, expected, tokens = server[:3]
    r = client.post("/v1/embeddings", json={"input": IDS, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    for got, row in zip(_vectors(r.json()), [3, 4]):
        vector = np.frombuffer(base64.b64decode(got), dtype="<f4")
        np.testing.assert_allclose(vector, expected[tuple(tokens[row])], atol=1e-6, rtol=0)
    r = client.post("/v1/embeddings", json={"input": list(range(100, 120)) + IDS[0], "truncate_prompt_tokens": 4})
    np.testing.assert_allclose(_vectors(r.json())[0], expected[tuple(IDS[0])], atol=1e-6, rtol=0)
    assert r.json()["usage"]["prompt_tokens"] == 4


def test_completions_and_embeddings_share_the_engine(server):
    client = server[0]
    r = client.post("/v1/completions", json={"prompt": IDS[0], "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert client.post("/v1/embeddings", json={"input": "hi"}).status_code == 200


@pytest.mark.parametrize("body,status,param,message", [
    ({"input": "hi", "dimensions": 8}, 400, "dimensions", "does not support matryoshka representation"),
    ({"input": "hi", "dimensions": 0}, 400, "dimensions", "positive int"),
    ({"input": "hi", "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format", "float"),
    ({"input": []}, 400, "input", "must not be empty"),
    ({"input": [[]]}, 400, "input", "is empty"),
    ({"input": [1] * 200}, 400, "input", "more than max_model_len=128"),
    ({"input": [10 ** 6]}, 400, "input", "outside the vocabulary"),
    ({"input": "hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens", "positive int or -1"),
    ({}, 400, "input", "Field required"),
    ({"input": "hi", "model": "other"}, 404, "model", "does not exist"),
])
def test_bad_requests_name_the_field(server, body, status, param, message):
    r = server[0].post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_a_server_pools_as_its_pooler_says(server):
    """The front submits requests pooled as its pooler says (the engine's, from its ready message); a type nanovllm
    does not pool is a 400 naming it."""
    client, expected, _, mean, serving = server
    default = serving.pooler
    try:
        serving.pooler = PoolerConfig("MEAN", True)
        r = client.post("/v1/embeddings", json={"input": IDS[1]})
        np.testing.assert_allclose(_vectors(r.json())[0], mean, atol=1e-6, rtol=0)
        serving.pooler = PoolerConfig("CLS", True, "from the checkpoint's 1_Pooling/config.json")
        r = client.post("/v1/embeddings", json={"input": IDS[1]})
        assert r.status_code == 400 and "pooling type 'CLS'" in r.json()["error"]["message"]
    finally:
        serving.pooler = default
    r = client.post("/v1/embeddings", json={"input": IDS[1]})
    np.testing.assert_allclose(_vectors(r.json())[0], expected[tuple(IDS[1])], atol=1e-6, rtol=0)


def test_the_serve_command_pools_as_its_pooler_config_says(server, path, tmp_path):
    openai = pytest.importorskip("openai")
    mean = server[3]
    with running_server(path, tmp_path, "--served-model-name", "tiny", enforce_eager=True, kvcache_block_size=16,
                        num_kvcache_blocks=64, max_model_len=128, max_num_batched_tokens=32,
                        pooler_config='{"pooling_type": "MEAN"}') as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.embeddings.create(model="tiny", input=[IDS[1], IDS[0]])
    assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens == len(IDS[0]) + len(IDS[1])
    np.testing.assert_allclose(out.data[0].embedding, mean, atol=1e-6, rtol=0)
