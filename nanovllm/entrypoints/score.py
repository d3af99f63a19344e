"""``POST /v1/score`` (``/score``) and ``POST /v1/rerank`` (``/rerank``, ``/v2/rerank``), as vLLM answers them.

* Score: ``text_1`` and ``text_2`` (or ``queries`` and ``documents``): a str and a str, a str and a list (1:N) or
  two lists of one length (zipped N:N), ``scoring.pairs``.  Answers ``{"id": "score-...", "object": "list",
  "created", "model", "data": [{"index", "object": "score", "score"}], "usage": {"prompt_tokens", "total_tokens",
  "completion_tokens": 0, "prompt_tokens_details": null}}``, one item per pair in pair order.
* Rerank: ``query`` against ``documents`` (a list of str); ``top_n`` 0 or omitted: all.  Answers ``{"id":
  "rerank-...", "model", "usage": {"total_tokens"}, "results": [{"index", "document": {"text"},
  "relevance_score"}]}``, highest score first (ties in input order), ``index`` the document's in the request.
* A score is ``nanovllm/scoring.py``'s: a ``*ForSequenceClassification`` checkpoint's head; with ``--pooler-config
  '{"classifier_from_token": ["no", "yes"]}'`` the yes/no reranker (``instruction``), else embeddings' cosine.  ``truncate_prompt_tokens=k`` keeps each prompt's last k tokens (-1: the limit).
Usage counts the tokens prefilled.  A bad or unknown field is a 400 naming it; each prompt is one engine request.
"""
import asyncio
import time

from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, Response

from nanovllm.entrypoints.embeddings import pooled
from nanovllm.entrypoints.protocol import bad_request, check_text
from nanovllm.entrypoints.serving import request_id
from nanovllm.entrypoints.sse import unless_disconnected
from nanovllm.pooling_params import PoolingParams
from nanovllm.scoring import RERANK_PARAMS, cosine, pairs


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    instruction: str | None = None
    truncate_prompt_tokens: int | None = None
    user: str | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = None
    instruction: str | None = None
    truncate_prompt_tokens: int | None = None
    user: str | None = None


async def create_score(serving, req: ScoreRequest, request) -> Response:
    serving.check_model(req.model)
    if (req.text_1 is not None or req.text_2 is not None) and (req.queries is not None or req.documents is not None):
        raise bad_request("give text_1 and text_2, or queries and documents, not both", "queries")
    names = ("queries", "documents") if req.queries is not None or req.documents is not None else ("text_1", "text_2")
    one, two = getattr(req, names[0]), getattr(req, names[1])
    for value, name in ((one, names[0]), (two, names[1])):
        if value is None:
            raise bad_request(f"{name} is required", name)
        check_text(value, name)
    try:
        todo = pairs(one, two, names)
    except ValueError as e:
        raise bad_request(str(e), names[1]) from None
    result = await unless_disconnected(request, score_pairs(serving, todo, req.instruction, req.truncate_prompt_tokens))
    if result is None:
        return Response(status_code=499)
    scores, tokens = result
    return JSONResponse({
        "id": request_id("score"), "object": "list", "created": int(time.time()), "model": serving.model_name,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                  "prompt_tokens_details": None}})


async def create_rerank(serving, req: RerankRequest, request) -> Response:
    serving.check_model(req.model)
    if not req.documents:
        raise bad_request("documents must not be empty", "documents")
    if req.top_n is not None and req.top_n < 0:
        raise bad_request(f"top_n must be 0 (all) or positive, got {req.top_n}", "top_n")
    check_text(req.query, "query")
    check_text(req.documents, "documents")
    todo = [(req.query, d) for d in req.documents]
    result = await unless_disconnected(request, score_pairs(serving, todo, req.instruction, req.truncate_prompt_tokens))
    if result is None:
        return Response(status_code=499)
    scores, tokens = result
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:req.top_n or None]
    return JSONResponse({
        "id": request_id("rerank"), "model": serving.model_name, "usage": {"total_tokens": tokens},
        "results": [{"index": i, "document": {"text": req.documents[i]}, "relevance_score": scores[i]}
                    for i in order]})


async def score_pairs(serving, todo: list[tuple[str, str]], instruction: str | None,
                      keep: int | None) -> tuple[list[float], int]:
    """(the score of every (query, document) pair, in order; the tokens prefilled): ``scoring.py``'s rules."""
    if keep is not None and not (keep >= 1 or keep == -1):
        raise bad_request(f"truncate_prompt_tokens must be a positive int or -1, got {keep}", "truncate_prompt_tokens")
    try:
        head = serving.score_head()
        params = RERANK_PARAMS if head is not None else PoolingParams().resolve(
            serving.pooler, serving.prompts.hf_config, serving.model_name)
    except ValueError as e:
        raise bad_request(str(e)) from None
    if head is not None:
        tokenizer = serving.tokenizer
        if instruction is not None and not head.takes_instruction:
            raise bad_request("instruction is for yes/no rerankers (--pooler-config classifier_from_token); a "
                              "sequence classifier scores the tokenizer's encoding of the pair", "instruction")
        try:
            encoded = await serving.batch_tokenizer.call(head.prompts, tokenizer, todo, instruction)
        except ValueError as e:
            raise bad_request(str(e), "instruction") from None
        ids = [_checked(serving, x, i, keep) for i, x in enumerate(encoded)]
    elif instruction is not None:
        raise bad_request("instruction is for yes/no rerankers (--pooler-config classifier_from_token); this "
                          "server scores by the cosine of embeddings", "instruction")
    else:
        texts = list(dict.fromkeys(t for pair in todo for t in pair))
        encoded = await asyncio.gather(*(serving.batch_tokenizer.encode(t) for t in texts))
        ids = [_checked(serving, x, i, keep) for i, x in enumerate(encoded)]
    vectors = await _pool(serving, ids, params)
    if head is not None:
        scores = [head.score(v) for v in vectors]
    else:
        by_text = dict(zip(texts, vectors))
        scores = [cosine(by_text[q], by_text[d]) for q, d in todo]
    return scores, sum(len(x) for x in ids)


def _checked(serving, ids: list[int], index: int, keep: int | None) -> list[int]:
    """One prompt's checked token ids, its last ``keep`` only where set."""
    if keep is not None:
        ids = ids[-(serving.max_model_len if keep == -1 else keep):]
    try:
        return serving.prompts.encode_prompt(ids, index)
    except (TypeError, ValueError) as e:
        raise bad_request(f"prompt {index}: {e}", "documents") from None


async def _pool(serving, ids: list[list[int]], params: PoolingParams) -> list:
    """Every prompt's pooled vector, in order (``embeddings.pooled``)."""
    return await pooled(serving, serving.submit([(prompt, params) for prompt in ids], 1), ids)
