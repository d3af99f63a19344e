"""``POST /v1/messages``: Anthropic's Messages API over the chat-completion path, streamed or not (as vLLM serves it).

The request (``protocol_messages.MessagesRequest``) becomes a ``ChatRequest`` and runs as the chat path runs it
(``chat.start_chat``: the chat template, the sampling fields, one choice), so its text is the chat answer's.
Answers ``{"id": "msg_...", "type": "message", "role": "assistant", "model", "content": [{"type": "text",
"text"}], "stop_reason", "stop_sequence", "usage": {"input_tokens", "output_tokens"}}``; ``stop_reason`` is
``end_turn`` (a stop token), ``stop_sequence`` (``stop_sequence`` then names the string) or ``max_tokens``.  With
``--reasoning-parser`` the think block comes first as a ``{"type": "thinking", "thinking", "signature": ""}`` block.
A stream sends Anthropic's events (``event: NAME`` and ``data: {...}``): ``message_start``, per block
``content_block_start``, ``content_block_delta`` (``text_delta``, ``thinking_delta``) and ``content_block_stop``,
then ``message_delta`` (stop reason, output tokens) and ``message_stop``; an error midway is an ``error`` event.
Errors are Anthropic's shape (``protocol_messages.error_body``, ``app.py``).
"""
import json
import uuid

from starlette.responses import JSONResponse, Response

from nanovllm.entrypoints.chat import start_chat
from nanovllm.entrypoints.protocol import APIError
from nanovllm.entrypoints.protocol_messages import MessagesRequest, error_body
from nanovllm.entrypoints.sse import EventStreamResponse, unless_disconnected

_DELTAS = {"text": "text_delta", "thinking": "thinking_delta"}
_EMPTY = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "", "signature": ""}}


async def create_message(serving, req: MessagesRequest, request) -> Response:
    chat = req.to_chat()
    handles, prompt_len, _ = await start_chat(serving, chat)
    reply = _Message(serving, f"msg_{uuid.uuid4().hex}", prompt_len)
    if req.stream:
        return EventStreamResponse(reply.stream(handles), on_close=lambda: serving.abort(handles))
    body = await unless_disconnected(request, reply.collect(handles))
    return JSONResponse(body) if body is not None else Response(status_code=499)


def event(name: str, payload: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Message:
    def __init__(self, serving, rid: str, prompt_len: int):
        self.serving, self.id, self.prompt_len = serving, rid, prompt_len
        self.output_tokens = 0
        self.stop_reason = self.stop_sequence = None

    def _count(self, update) -> None:
        self.output_tokens += len(update.token_ids)
        if update.finish_reason is not None:
            self.stop_sequence = update.stop_string
            self.stop_reason = ("max_tokens" if update.finish_reason == "length" else
                                "stop_sequence" if update.stop_string is not None else "end_turn")

    def _message(self, content: list) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.serving.model_name,
                "content": content, "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence,
                "usage": {"input_tokens": self.prompt_len, "output_tokens": self.output_tokens}}

    async def collect(self, handles) -> dict:
        text = ""
        async for _, update in self.serving.updates(handles):
            self._count(update)
            text += update.text
        content = []
        parser = self.serving.reasoning_parser
        if parser is not None:
            reasoning, text = parser().split(text)
            if reasoning is not None:
                content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        return self._message(content + [{"type": "text", "text": text or ""}])

    async def stream(self, handles):
        blocks = _Blocks()
        parser = self.serving.reasoning_parser
        thinking = parser() if parser is not None else None
        try:
            yield event("message_start", {"type": "message_start", "message": self._message([])})
            async for _, update in self.serving.updates(handles):
                self._count(update)
                text, reasoning = update.text, ""
                if thinking is not None:  # the think block out of the text (held back while a tag may be cut)
                    reasoning, text = thinking.push(text)
                    if update.finish_reason is not None:
                        more, rest = thinking.finish()
                        reasoning, text = reasoning + more, text + rest
                for kind, piece in (("thinking", reasoning), ("text", text)):
                    for chunk in blocks.add(kind, piece):
                        yield chunk
            for chunk in blocks.close():
                yield chunk
            yield event("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
                "usage": {"output_tokens": self.output_tokens}})
            yield event("message_stop", {"type": "message_stop"})
        except APIError as e:
            yield event("error", error_body(e))


class _Blocks:
    """The content blocks of a stream: a block opens when text of another kind comes, the one before it closing."""

    def __init__(self):
        self.index, self.kind, self.had_text = -1, None, False

    def add(self, kind: str, piece: str) -> list[str]:
        if not piece:
            return []
        out = self._switch(kind) if kind != self.kind else []
        self.had_text = self.had_text or kind == "text"
        return out + [event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                    "delta": {"type": _DELTAS[kind], kind: piece}})]

    def close(self) -> list[str]:
        """The last block's stop (an empty text block first where no text came)."""
        out = [] if self.had_text else self._switch("text")
        return out + [event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _switch(self, kind: str) -> list[str]:
        out = [] if self.kind is None else [event("content_block_stop", {"type": "content_block_stop",
                                                                         "index": self.index})]
        self.index, self.kind = self.index + 1, kind
        self.had_text = self.had_text or kind == "text"
        return out + [event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                    "content_block": dict(_EMPTY[kind])})]
