"""``POST /v1/embeddings``, as OpenAI and vLLM answer it.

* ``input``: a string, a list of strings, a list of token ids or a list of those; strings are tokenized with
  special tokens unless ``add_special_tokens`` is false; ``truncate_prompt_tokens=k`` keeps each input's last k
  tokens (-1: ``max_model_len``).  An empty input, or one over ``max_model_len``, is a 400 naming ``input``.
* ``encoding_format``: ``float`` (lists of numbers) or ``base64`` (each vector's little-endian float32 bytes).
* ``dimensions``: the first d values, then normalised; a 400 unless the checkpoint's config.json declares
  ``is_matryoshka`` or ``matryoshka_dimensions`` (vLLM's rule, ``PoolingParams.resolve``).  ``user`` is accepted.
* Pooling is the engine's (``Serving.pooler``: ``--pooler-config``, else the checkpoint's sentence-transformers
  modules, else LAST + normalize); a checkpoint declaring a type nanovllm does not pool is a 400 naming it.
Answers ``{"id": "embd-...", "object": "list", "created", "model", "data": [{"index", "object": "embedding",
"embedding"}], "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0, "prompt_tokens_details": null}}``.
Each input is one engine request, batched with whatever else runs; an unknown field is a 400 naming it.
"""
import asyncio
import base64
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, Response

from nanovllm.entrypoints.protocol import APIError, bad_request, check_text
from nanovllm.entrypoints.serving import request_id
from nanovllm.entrypoints.sse import unless_disconnected
from nanovllm.pooling_params import PoolingParams


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True

    def inputs(self) -> list:
        if isinstance(self.input, str) or (self.input and isinstance(self.input[0], int)):
            return [self.input]
        return list(self.input)


async def create_embedding(serving, req: EmbeddingRequest, request) -> Response:
    serving.check_model(req.model)
    inputs = req.inputs()
    if not inputs:
        raise bad_request("input must not be empty", "input")
    check_text(inputs, "input")
    try:
        serving.pooler.check()
    except ValueError as e:
        raise bad_request(str(e)) from None
    try:
        params = PoolingParams(dimensions=req.dimensions).resolve(serving.pooler, serving.prompts.hf_config,
                                                                  serving.model_name)
    except ValueError as e:
        raise bad_request(str(e), "dimensions") from None
    keep = req.truncate_prompt_tokens
    if keep is not None and not (keep >= 1 or keep == -1):
        raise bad_request(f"truncate_prompt_tokens must be a positive int or -1, got {keep}", "truncate_prompt_tokens")
    ids = await asyncio.gather(*(_encode(serving, req, text, i) for i, text in enumerate(inputs)))
    handles = serving.submit([(prompt, params) for prompt in ids], 1)
    body = await unless_disconnected(request, _collect(serving, req, handles, ids))
    return JSONResponse(body) if body is not None else Response(status_code=499)


async def _encode(serving, req: EmbeddingRequest, prompt, index: int) -> list[int]:
    """One input's checked token ids, truncated as the request asks."""
    if isinstance(prompt, str):
        tokenizer = serving.tokenizer
        prompt = await (serving.batch_tokenizer.encode(prompt) if req.add_special_tokens else
                        serving.batch_tokenizer.call(lambda: tokenizer.encode(prompt, add_special_tokens=False)))
    keep = req.truncate_prompt_tokens
    if keep is not None:
        prompt = prompt[-(serving.max_model_len if keep == -1 else keep):]
    try:
        return serving.prompts.encode_prompt(prompt, index)
    except (TypeError, ValueError) as e:
        raise bad_request(f"input: {e}", "input") from None


async def pooled(serving, handles, ids: list[list[int]]) -> list:
    """Each submitted pooling request's vector, in order, with the metrics of each; a request left early (the client
    gone, the engine failed) aborts what still runs.  Shared by the score and rerank routes."""
    vectors = []
    try:
        for index, handle in enumerate(handles):
            choice, out = await handle.queue.get()
            if choice is None:  # the engine failed (``EngineLoop``)
                raise APIError(500, f"the engine failed: {out!r}")
            serving.metrics.prompt(len(ids[index]))
            serving.metrics.finished(out.finish_reason, time.perf_counter() - handle.arrival)
            vectors.append(out.embedding)
    finally:
        serving.abort(handles)  # those that finished are left as they are
    return vectors


async def _collect(serving, req: EmbeddingRequest, handles, ids: list[list[int]]) -> dict:
    """The response body once every input's embedding came."""
    data = []
    for index, vector in enumerate(await pooled(serving, handles, ids)):
        vector = np.asarray(vector, dtype="<f4")
        embedding = (base64.b64encode(vector.tobytes()).decode() if req.encoding_format == "base64"
                     else vector.tolist())
        data.append({"index": index, "object": "embedding", "embedding": embedding})
    tokens = sum(len(x) for x in ids)
    return {"id": request_id("embd"), "object": "list", "created": int(time.time()), "model": serving.model_name,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                    "prompt_tokens_details": None}}
