"""The reply side of ``/v1/chat/completions`` (``chat.py`` checks and submits the request): ``ChatReply`` gives a
chat answer's body (``collect``) or its SSE stream (``stream``: content deltas, one chunk per choice per engine step
that produced text, steps a busy front took together counting as one).  A reasoning parser takes the think block
out of ``content`` into ``reasoning`` and ``reasoning_content`` (null without; streamed as ``delta.*``; its tags kept
where they are special tokens, as gpt_oss's are); the tool plan's calls (``tool_calls.ToolPlan``, taken as data)
are read from the rest, and with tools a stream's content is null until some is sent, as in OpenAI's streams.

``tool_reply(plan, text, finish_reason)``: (content, OpenAI tool calls, finish reason) of a choice's whole text;
"auto" replies are read by the plan's parser, forced ones (named, required) as the constrained JSON; text that
holds no call is the content.  A reply with calls finishes on "tool_calls".  ``ToolStream`` streams a choice as
OpenAI streams it: content while no call may have started, each call (its id and name, then argument fragments) as
the parser reads it, the rest at the end, adding up to ``tool_reply``'s.
"""
import json
import time
import uuid

from nanovllm.entrypoints.protocol import APIError, ChatRequest
from nanovllm.entrypoints.serving import Serving
from nanovllm.entrypoints.sse import DONE, sse
from nanovllm.entrypoints.tool_calls import ToolPlan


def openai_tool_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def auto_calls(plan: ToolPlan, text: str, final: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
    """The parser's (content, [(name, arguments)]) of an "auto" reply (``final=False``: still streaming), only the
    first call without ``parallel_tool_calls``."""
    content, calls = plan.parser.parse(text, final)
    return content, calls if plan.parallel else calls[:1]


def tool_reply(plan: ToolPlan, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
    """(content, OpenAI tool calls, finish reason) of a choice's whole text.  Text that holds no call, such as a
    forced call cut short by ``max_tokens``, is the content, with the finish reason as it was."""
    calls: list[tuple[str, str]] = []
    content: str | None = text
    if plan.mode == "auto":
        content, calls = auto_calls(plan, text)
    elif plan.mode in ("named", "required"):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if plan.mode == "named" and isinstance(value, dict):
            content, calls = None, [(plan.name, text)]
        elif plan.mode == "required" and isinstance(value, list) and value and all(
                isinstance(v, dict) and isinstance(v.get("name"), str) for v in value):
            content = None
            calls = [(v["name"], json.dumps(v.get("parameters", {}), ensure_ascii=False)) for v in value]
    if not calls:
        return content or None, [], finish_reason
    return content, [openai_tool_call(name, arguments) for name, arguments in calls], "tool_calls"


class ToolStream:
    """One streamed choice under a ``ToolPlan``: ``push`` each text delta, ``finish`` once it has ended; each gives
    the content to send and the ``delta.tool_calls`` entries (a call's index, id, type and name with empty
    arguments first, then its argument fragments), so that what is sent adds up to ``tool_reply`` of the whole
    text as the ``openai`` client accumulates it.  Forced calls (named, required) are given at the end."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent = plan, "", 0
        self.calls: list[list[str]] = []  # per call sent: its id, name and the arguments sent

    def push(self, text: str) -> tuple[str, list[dict]]:
        self.text += text
        if self.plan.mode == "none":  # nothing parsed: all content, as it comes
            self.sent += len(text)
            return text, []
        if self.plan.mode != "auto":  # a forced call's text is the call: nothing is content until it fails to parse
            return "", []
        safe = self.text[:self.plan.parser.content_end(self.text)]
        delta, self.sent = safe[self.sent:], max(self.sent, len(safe))
        return delta, self._deltas(auto_calls(self.plan, self.text, final=False)[1])

    def finish(self, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        """(the rest of the content, the rest of the calls' deltas, the finish reason)."""
        content, calls, reason = tool_reply(self.plan, self.text, finish_reason)
        content = content or ""
        assert content.startswith(self.text[:self.sent]), (content, self.text[:self.sent])
        deltas = self._deltas([(c["function"]["name"], c["function"]["arguments"]) for c in calls])
        return content[self.sent:], deltas, reason

    def _deltas(self, calls: list[tuple[str, str]]) -> list[dict]:
        out = []
        for index, (name, arguments) in enumerate(calls):
            if index == len(self.calls):
                self.calls.append([f"call_{uuid.uuid4().hex[:24]}", name, ""])
                out.append({"index": index, "id": self.calls[index][0], "type": "function",
                            "function": {"name": name, "arguments": ""}})
            _, sent_name, sent = self.calls[index]
            assert name == sent_name and arguments.startswith(sent), (name, arguments, sent_name, sent)
            if len(arguments) > len(sent):
                out.append({"index": index, "function": {"arguments": arguments[len(sent):]}})
                self.calls[index][2] = arguments
        assert len(calls) >= len(self.calls), (calls, self.calls)
        return out


class ChatReply:
    """One chat answer's body (``collect``) or its SSE stream (``stream``) from the engine handles of ``start_chat``."""

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
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.req.model or self.serving.model_name, "choices": choices, "usage": usage}

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
                message["content"], calls, choice["finish_reason"] = tool_reply(self.plan, message["content"],
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
