"""Anthropic's Messages request body (``POST /v1/messages``), its error shape, and its mapping to a ``ChatRequest``.

``MessagesRequest`` declares the fields nanovllm takes: ``model``, ``messages`` (``user``/``assistant``, content a
string or a list of ``{"type": "text", "text"}`` blocks), ``system`` (the same), ``max_tokens`` (required),
``temperature``, ``top_p``, ``top_k``, ``stop_sequences``, ``stream`` and ``metadata`` (``user_id``, unused); any
other field is a 400 naming it.  ``tools`` and ``tool_choice`` are declared only to be refused by name (a 400), as
are content blocks other than text (images, ``tool_use``, ``tool_result``, documents).  ``to_chat`` builds the
``ChatRequest`` the chat path runs (the system text first, as a system message); a field left out takes the chat
path's default (the checkpoint's generation_config.json, then OpenAI's).  Errors are Anthropic's shape:
``{"type": "error", "error": {"type", "message"}}`` (``error_body``).
"""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from nanovllm.entrypoints.protocol import APIError, ChatMessage, ChatRequest, bad_request, check_text

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(e: APIError) -> dict:
    """An ``APIError`` in Anthropic's error shape (the field it names, if any, is in the message already)."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[AnthropicMessage]
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # refused (a 400 naming it) unless empty
    tool_choice: dict[str, Any] | None = None  # refused unless {"type": "none"} or {"type": "auto"} without tools

    def to_chat(self) -> ChatRequest:
        """The ``ChatRequest`` of this request (module docstring); a 400 naming what does not map."""
        check_text(self.model_dump(), "messages")
        if self.tools:
            raise bad_request("tools: tool use is not served on /v1/messages by nanovllm (send it to "
                              "/v1/chat/completions)", "tools")
        if self.tool_choice is not None and self.tool_choice.get("type") not in ("auto", "none"):
            raise bad_request(f"tool_choice={self.tool_choice!r} needs tools, which /v1/messages does not serve",
                              "tool_choice")
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")
        if self.max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        messages = [] if self.system is None else [ChatMessage(role="system", content=_text(self.system, "system"))]
        for i, m in enumerate(self.messages):
            messages.append(ChatMessage(role=m.role, content=_text(m.content, f"messages[{i}].content")))
        return ChatRequest(model=self.model, messages=messages, max_tokens=self.max_tokens,
                           temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                           stop=self.stop_sequences, stream=self.stream)


def _text(content, where: str) -> str | list[dict]:
    """A string as it is, text blocks as the chat path's text parts; a 400 naming any other block."""
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(content):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"{where}[{j}]: content block of type {block.get('type')!r} is not supported by "
                              f"nanovllm's /v1/messages (text blocks only)", f"{where}[{j}].type")
        unknown = sorted(set(block) - {"type", "text", "cache_control", "citations"})
        if unknown:
            raise bad_request(f"{where}[{j}]: unknown field(s) {unknown} in a text block", f"{where}[{j}]")
        parts.append({"type": "text", "text": block["text"]})
    return parts
