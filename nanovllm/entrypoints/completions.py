"""``POST /v1/completions``: OpenAI's legacy completions, streamed or not.

The prompt is a string, a list of strings, a list of token ids or a list of those; each prompt has ``n`` choices,
numbered ``prompt index * n + choice``.  ``max_tokens`` defaults to 16 (OpenAI's default), capped to the room left
under ``max_model_len``.  ``echo`` puts the prompt's text before the completion's.  ``logprobs=k`` (k <= 5) gives
per token its text, logprob, the k most likely tokens' and its offset in the choice's text; with ``echo``, the
prompt's tokens come first (the engine's prompt logprobs; the first token's logprob and top entries are null), as
lm-eval-harness's loglikelihood requests expect.  With ``stream``, the prompt comes in a choice's first chunk.  A
stream sends one
chunk per choice per engine step that produced text (or logprobs, or the finish; the steps a busy front took
together count as one: ``choices.queued``), then, with
``stream_options.include_usage``, a chunk with empty choices and the usage, then ``data: [DONE]``.
``structured_outputs``, the ``guided_*`` fields or ``response_format`` constrain every choice (``structured.py``).
"""
import asyncio
import time

from starlette.responses import JSONResponse, Response

from nanovllm.completion import logprob_dict
from nanovllm.entrypoints.limits import max_tokens_for
from nanovllm.entrypoints.protocol import APIError, CompletionRequest
from nanovllm.entrypoints.serving import Serving, request_id
from nanovllm.entrypoints.sse import DONE, EventStreamResponse, sse, unless_disconnected
from nanovllm.entrypoints.structured import request_constraint

DEFAULT_MAX_TOKENS = 16


async def create_completion(serving: Serving, req: CompletionRequest, request) -> Response:
    req.check_unsupported()
    lora = serving.lora_for(req.model)
    constraint = request_constraint(req)
    prompts, echoes = [], []
    texts = list(req.prompts())
    encoded = await asyncio.gather(*(serving.encode(prompt, i) for i, prompt in enumerate(texts)))
    for prompt, ids in zip(texts, encoded):
        max_tokens = max_tokens_for(serving.max_model_len, len(ids), req.max_tokens, DEFAULT_MAX_TOKENS)
        prompt_logprobs = req.logprobs if req.echo else None
        prompts.append((ids, req.sampling_params(max_tokens, serving.defaults, req.logprobs, prompt_logprobs,
                                                 constraint, serving.prompts.vocab_size)))
        if req.echo:
            echoes.append(prompt if isinstance(prompt, str) else serving.tokenizer.decode(ids))
    handles = serving.submit(prompts, req.n, lora)
    reply = _Reply(serving, req, request_id("cmpl"), [ids for ids, _ in prompts], echoes)
    if req.stream:
        return EventStreamResponse(reply.stream(handles), on_close=lambda: serving.abort(handles))
    body = await unless_disconnected(request, reply.collect(handles))
    return JSONResponse(body) if body is not None else Response(status_code=499)


class _Reply:
    def __init__(self, serving: Serving, req: CompletionRequest, rid: str, prompt_ids: list[list[int]], echoes):
        self.serving, self.req, self.id = serving, req, rid
        self.created = int(time.time())
        self.prompt_ids, self.echoes = prompt_ids, echoes
        self.prompt_lens = [len(ids) for ids in prompt_ids]
        n = req.n
        self.total = len(prompt_ids) * n
        self.completion_tokens = 0
        self.offsets = [len(echoes[i // n]) if echoes else 0 for i in range(self.total)]  # logprobs text_offset

    def _choice(self, prompt: int, update, echoed: bool) -> dict:
        index = prompt * self.req.n + update.index
        text = (self.echoes[prompt] if echoed else "") + update.text
        self.completion_tokens += len(update.token_ids)
        logprobs = self._logprobs(index, prompt, update) if self.req.logprobs is not None else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": update.finish_reason}

    def _logprobs(self, index: int, prompt: int, update) -> dict:
        """The legacy ``logprobs`` object of ``update``'s tokens, after its prompt's tokens when it carries the
        prompt logprobs (``echo``): those are offset from the start of the echoed text, the completion's from its
        end."""
        token_text = self.serving.token_text
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def add(token: int, chosen, top: dict | None, offset: int) -> int:
            text = token_text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(chosen)
            out["top_logprobs"].append(None if top is None else {token_text(t): v for t, v in top.items()})
            out["text_offset"].append(offset)
            return offset + len(text)

        offset = 0
        for position, entry in enumerate(update.prompt_logprobs or ()):
            if entry is None:  # the first prompt token: nothing before it to predict it from
                offset = add(self.prompt_ids[prompt][position], None, None, offset)
            else:
                offset = add(entry[0], entry[1], logprob_dict(*entry), offset)
        for token, entry in zip(update.token_ids, update.logprobs):
            self.offsets[index] = add(token, entry[0], logprob_dict(token, *entry), self.offsets[index])
        return out

    def _usage(self) -> dict:
        prompt = sum(self.prompt_lens)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def _body(self, choices: list, usage) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.req.model or self.serving.model_name, "choices": choices, "usage": usage}

    async def collect(self, handles) -> dict:
        choices = [None] * self.total
        async for prompt, update in self.serving.updates(handles):
            part = self._choice(prompt, update, echoed=False)
            whole = choices[part["index"]]
            if whole is None:
                text = self.echoes[prompt] if self.echoes else ""
                whole = choices[part["index"]] = {"index": part["index"], "text": text, "logprobs": None,
                                                  "finish_reason": None}
            whole["text"] += part["text"]
            whole["finish_reason"] = part["finish_reason"]
            if part["logprobs"] is not None:
                if whole["logprobs"] is None:
                    whole["logprobs"] = part["logprobs"]
                else:
                    for key, values in part["logprobs"].items():
                        whole["logprobs"][key] += values
        return self._body(choices, self._usage())

    async def stream(self, handles):
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        echoed = set()
        try:
            async for prompt, update in self.serving.updates(handles):
                first = (prompt, update.index) not in echoed and bool(self.echoes)
                echoed.add((prompt, update.index))
                choice = self._choice(prompt, update, echoed=first)
                if not (choice["text"] or choice["logprobs"] or choice["finish_reason"]):
                    continue  # tokens whose text is held back (an incomplete character, a possible stop string)
                chunk = self._body([choice], None)
                if not include_usage:
                    del chunk["usage"]
                yield sse(chunk)
            if include_usage:
                yield sse(self._body([], self._usage()))
        except APIError as e:
            yield sse(e.body())
        yield DONE
