"""``POST /v1/chat/completions``: messages through the checkpoint's chat template, streamed or not.

``max_completion_tokens`` (or the older ``max_tokens``) defaults to the room left under ``max_model_len``.
``logprobs=true`` with ``top_logprobs=k`` (k <= 20) gives per token its text, bytes, logprob and the k most likely
tokens'.  A stream first sends each choice's ``{"role": "assistant", "content": ""}`` delta, then content deltas
(one chunk per choice per engine step that produced text, steps a busy front took together counting as one),
the finish reason, the usage chunk if ``stream_options.include_usage``, and ``data: [DONE]``.  Image parts
(``{"type": "image_url", "image_url": {"url": "data:image/...;base64,..." or a local path}}``) are taken by
vision-language models and refused, with a 400, by the others.  ``tools`` and ``tool_choice`` (``tool_calls.py``)
give a message with ``tool_calls`` ("auto": read by ``--tool-call-parser``), finishing on "tool_calls"; streamed
as OpenAI streams them, each call's id and name, then argument fragments (``ToolStream``).  ``response_format`` and
vLLM's ``structured_outputs`` constrain the output (``structured.py``).  ``chat_template_kwargs`` (over
``--default-chat-template-kwargs``) are template variables.  A reasoning parser (``--reasoning-parser``) takes the
reasoning out of ``content`` into ``reasoning`` and ``reasoning_content`` (null without; streamed as ``delta.*``;
special tokens kept when its tags are some, as gpt_oss's are); tool calls are read from the rest.
"""
import time

from starlette.responses import JSONResponse, Response

from nanovllm.entrypoints.protocol import APIError, ChatRequest, bad_request, check_model
from nanovllm.entrypoints.serving import Serving, request_id
from nanovllm.entrypoints.sse import DONE, EventStreamResponse, sse, unless_disconnected
from nanovllm.entrypoints.tool_calls import ToolPlan, ToolStream, chat_tools
from nanovllm.multimodal import chat_prompt


async def create_chat_completion(serving: Serving, req: ChatRequest, request) -> Response:
    handles, prompt_len, plan = await start_chat(serving, req)
    reply = _Reply(serving, req, request_id("chatcmpl"), prompt_len, plan)
    if req.stream:
        return EventStreamResponse(reply.stream(handles), on_close=lambda: serving.abort(handles))
    body = await unless_disconnected(request, reply.collect(handles))
    return JSONResponse(body) if body is not None else Response(status_code=499)


async def start_chat(serving: Serving, req: ChatRequest) -> tuple[list, int, ToolPlan | None]:
    """Check ``req``, render its messages through the chat template and submit it: (the engine handles, the
    prompt's token count, the tool plan or None).  Shared with Anthropic's ``/v1/messages`` (``messages.py``)."""
    req.check_unsupported()
    check_model(req.model, serving.model_name)
    plan, constraint = chat_tools(req, serving.tool_parser)
    if serving.reasoning_parser is not None and serving.reasoning_parser.keeps_special_tokens:
        req.skip_special_tokens = False  # the reasoning parser's tags are special tokens (gpt_oss's harmony channels)
    try:
        messages, images = chat_prompt([m.template_dict(i) for i, m in enumerate(req.messages)])
    except (ValueError, KeyError, TypeError) as e:
        raise bad_request(f"an image part is malformed: {e}", "messages") from None
    try:
        ids = await serving.batch_tokenizer.call(serving.prompts.apply_chat_template, messages,
                                               plan.render if plan is not None else None,
                                               {**serving.chat_template_kwargs, **(req.chat_template_kwargs or {})})
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages (jinja raise_exception)
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
    image_inputs = None
    if images:  # placeholders in the text, the images beside it (nanovllm/multimodal.py)
        try:
            ids, image_inputs = serving.prompts.encode_request({"prompt_token_ids": ids,
                                                            "multi_modal_data": {"image": images}})
        except (ValueError, TypeError) as e:
            raise bad_request(str(e).replace("prompt 0", "the conversation"), "messages") from None
    params = req.prompt_params(len(ids), serving.max_model_len, serving.defaults, constraint,
                               serving.prompts.vocab_size)
    return serving.submit([(ids, params, image_inputs)], req.n), len(ids), plan

class _Reply:
    def __init__(self, serving: Serving, req: ChatRequest, rid: str, prompt_len: int, plan: ToolPlan | None):
        self.serving, self.req, self.id, self.prompt_len, self.plan = serving, req, rid, prompt_len, plan
        self.created = int(time.time())
        self.completion_tokens = 0

    def _logprobs(self, update) -> dict | None:
        if not self.req.logprobs:
            return None
        serving = self.serving

        def entry(token, logprob):
            return {"token": serving.token_text(token), "logprob": logprob, "bytes": serving.token_bytes(token)}

        return {"content": [dict(entry(t, chosen), top_logprobs=[entry(i, v) for i, v in zip(top_ids, top)])
                            for t, (chosen, top_ids, top) in zip(update.token_ids, update.logprobs)]}

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_len, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_len + self.completion_tokens}

    def _body(self, obj: str, choices: list, usage) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.serving.model_name,
                "choices": choices, "usage": usage}

    async def collect(self, handles) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(self.req.n)]
        async for _, update in self.serving.updates(handles):
            self.completion_tokens += len(update.token_ids)
            choice = choices[update.index]
            choice["message"]["content"] += update.text
            choice["finish_reason"] = update.finish_reason
            logprobs = self._logprobs(update)
            if logprobs is not None:
                if choice["logprobs"] is None:
                    choice["logprobs"] = {"content": []}
                choice["logprobs"]["content"] += logprobs["content"]
        parser = self.serving.reasoning_parser
        if parser is not None:
            for choice in choices:
                message = choice["message"]
                reasoning, message["content"] = parser().split(message["content"])
                message["reasoning"] = message["reasoning_content"] = reasoning
        if self.plan is not None:
            for choice in choices:
                message = choice["message"]
                message["content"], calls, choice["finish_reason"] = self.plan.reply(message["content"],
                                                                                     choice["finish_reason"])
                if calls:
                    message["tool_calls"] = calls
        if parser is not None:
            for choice in choices:  # a reply that is all reasoning has no content
                if not choice["message"]["content"] and choice["message"]["reasoning"] is not None:
                    choice["message"]["content"] = None
        return self._body("chat.completion", choices, self._usage())

    def _chunk(self, choices: list, usage=None) -> str:
        body = self._body("chat.completion.chunk", choices, usage)
        if not (self.req.stream_options and self.req.stream_options.include_usage):
            del body["usage"]
        return sse(body)

    def _piece(self, index: int, delta: dict, logprobs=None, finish_reason=None) -> str:
        return self._chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    @staticmethod
    def _delta(text: str, reasoning: str) -> dict:
        delta = {"reasoning": reasoning, "reasoning_content": reasoning} if reasoning else {}
        if text:
            delta["content"] = text
        return delta

    async def stream(self, handles):
        tools = [ToolStream(self.plan) for _ in range(self.req.n)] if self.plan is not None else None
        parser = self.serving.reasoning_parser
        thinking = [parser() for _ in range(self.req.n)] if parser is not None else None
        try:  # with tools, the content is null until some is sent, as in OpenAI's streams
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": None if tools else ""},
                                "logprobs": None, "finish_reason": None} for i in range(self.req.n)])
            async for _, update in self.serving.updates(handles):
                self.completion_tokens += len(update.token_ids)
                logprobs = self._logprobs(update)
                text, reason, reasoning = update.text, update.finish_reason, ""
                if thinking is not None:  # the think block out of the text (held back while a tag may be cut)
                    reasoning, text = thinking[update.index].push(text)
                    if reason is not None:
                        more, rest = thinking[update.index].finish()
                        reasoning, text = reasoning + more, text + rest
                calls = []
                if tools is not None:  # content while no call may have started; calls as the parser reads them
                    text, calls = tools[update.index].push(text)
                    if reason is not None:
                        rest, more, reason = tools[update.index].finish(reason)
                        text, calls = text + rest, calls + more
                ends_here = None if calls else reason  # a choice with calls ends on a chunk of its own
                if text or reasoning or ends_here or (logprobs and logprobs["content"]):
                    yield self._piece(update.index, self._delta(text, reasoning), logprobs, ends_here)
                for call in calls:
                    yield self._piece(update.index, {"tool_calls": [call]})
                if calls and reason is not None:
                    yield self._piece(update.index, {}, None, reason)
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield self._chunk([], self._usage())
        except APIError as e:
            yield sse(e.body())
        yield DONE
