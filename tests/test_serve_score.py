"""``/v1/score`` (``/score``) and ``/v1/rerank`` (``/rerank``, ``/v2/rerank``) through the server's front (FastAPI's
TestClient) and an ``EngineCore`` in a thread: the reranker's scores are ``LLM.score``'s, in pair order, with
usage; rerank sorts by score, keeps each document's index and honours ``top_n``; with a pooler naming no classifier
tokens the score is the cosine of embeddings; bad and unknown fields are 400s naming them."""

import pytest

pytest.importorskip("fastapi")

from nanovllm import LLM  # noqa: E402
from nanovllm.pooling_params import PoolerConfig  # noqa: E402
from serve_helpers import threaded_server  # noqa: E402
from test_score import build_yes_no_checkpoint  # noqa: E402

QUERY = "Where is Paris?"
DOCS = ["Hello world", "Paris is in France.", "The quick brown fox jumps over the lazy dog.", "no yes no"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(client, LLM.score's reranker scores of QUERY against DOCS, its cosine scores of DOCS[0] against DOCS, the
    token count of each reranker prompt, the ``Serving``); the engine runs in a thread."""
    path = build_yes_no_checkpoint(tmp_path_factory.mktemp("score_serve"))
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=512,
              max_num_batched_tokens=256, pooler_config={"classifier_from_token": ["no", "yes"]})
    outs = llm.score(QUERY, DOCS, use_tqdm=False)
    rerank = [o.outputs.score for o in outs]
    lengths = [len(o.prompt_token_ids) for o in outs]
    cosine_llm = LLM(path, enforce_eager=True, num_kvcache_blocks=16, max_model_len=512)
    cosines = [o.outputs.score for o in cosine_llm.score(DOCS[0], DOCS, use_tqdm=False)]
    cosine_llm.close()
    try:
        with threaded_server(llm, max_waiting_seqs=16, pooler=llm.config.pooler) as (client, serving):
            yield client, rerank, cosines, lengths, serving
    finally:
        llm.close()


def close(a, b) -> bool:
    return abs(a - b) < 1e-6


@pytest.mark.parametrize("route", ["/v1/score", "/score"])
def test_score_gives_llm_scores_in_pair_order(server, route):
    client, rerank, _, lengths, _ = server
    r = client.post(route, json={"model": "tiny", "text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == "tiny"
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and {d["object"] for d in body["data"]} == {"score"}
    assert all(close(d["score"], s) for d, s in zip(body["data"], rerank, strict=True))
    assert body["usage"] == {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths), "completion_tokens": 0,
                             "prompt_tokens_details": None}
    r = client.post(route, json={"queries": [QUERY, QUERY], "documents": DOCS[2:]})  # N:N, vLLM's newer names
    assert r.status_code == 200, r.text
    assert all(close(d["score"], s) for d, s in zip(r.json()["data"], rerank[2:], strict=True))


@pytest.mark.parametrize("route", ["/v1/rerank", "/rerank", "/v2/rerank"])
@pytest.mark.parametrize("top_n", [None, 0, 2, 9])
def test_rerank_sorts_by_score_with_indices_and_top_n(server, route, top_n):
    client, rerank, _, lengths, _ = server
    body = {"model": "tiny", "query": QUERY, "documents": DOCS} | ({} if top_n is None else {"top_n": top_n})
    r = client.post(route, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"].startswith("rerank-") and out["model"] == "tiny" and out["usage"] == {"total_tokens": sum(lengths)}
    order = sorted(range(4), key=lambda i: -rerank[i])[:top_n or None]
    assert order != list(range(len(order))) or top_n == 2  # the sort is seen
    assert [x["index"] for x in out["results"]] == order
    for x in out["results"]:
        assert x["document"] == {"text": DOCS[x["index"]]} and close(x["relevance_score"], rerank[x["index"]])


def test_without_classifier_tokens_the_score_is_the_cosine(server, monkeypatch):
    client, _, cosines, _, serving = server
    monkeypatch.setattr(serving, "pooler", PoolerConfig())
    r = client.post("/v1/score", json={"text_1": DOCS[0], "text_2": DOCS})
    assert r.status_code == 200, r.text
    assert all(close(d["score"], s) for d, s in zip(r.json()["data"], cosines, strict=True))
    assert close(cosines[0], 1.0)
    r = client.post("/v1/rerank", json={"query": DOCS[0], "documents": DOCS, "top_n": 1})
    assert [x["index"] for x in r.json()["results"]] == [0]
    r = client.post("/v1/score", json={"text_1": "a", "text_2": "b", "instruction": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "instruction"


@pytest.mark.parametrize("route,body,param,message", [
    ("/v1/score", {"text_1": "a", "text_2": "b", "top_n": 1}, "top_n", "unknown field 'top_n'"),
    ("/v1/score", {"text_1": "a"}, "text_2", "text_2 is required"),
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c"]}, "text_2", "same length"),
    ("/v1/score", {"text_1": "a", "text_2": []}, "text_2", "non-empty list"),
    ("/v1/score", {"text_1": "a", "text_2": "b", "queries": "c"}, "queries", "not both"),
    ("/v1/score", {"text_1": 3, "text_2": "b"}, "text_1", "text_1"),
    ("/v1/rerank", {"query": "a", "documents": ["b"], "return_documents": False}, "return_documents", "unknown"),
    ("/v1/rerank", {"query": "a", "documents": []}, "documents", "must not be empty"),
    ("/v1/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n", "top_n must be 0"),
    ("/v1/rerank", {"documents": ["b"]}, "query", "query"),
    ("/v1/rerank", {"query": "a", "documents": ["b"], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "-1"),
])
def test_bad_requests_are_400s_naming_the_field(server, route, body, param, message):
    client = server[0]
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert client.post(route.replace("v1/", ""), json=body).status_code == 400


def test_another_model_is_a_404(server):
    r = server[0].post("/v1/rerank", json={"model": "other", "query": "a", "documents": ["b"]})
    assert r.status_code == 404
