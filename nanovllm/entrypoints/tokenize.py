"""``POST /tokenize`` and ``POST /detokenize``, as vLLM's server answers them.

* ``/tokenize``: ``{"prompt": str}`` (special tokens added unless ``add_special_tokens`` is false), or
  ``{"messages": [...]}`` through the chat template, ready for the assistant's reply (``add_generation_prompt``
  false is refused), ``chat_template_kwargs`` over the server's defaults as chat requests take them; answers ``{"count",
  "max_model_len", "tokens", "token_strs"}`` (``token_strs`` only with ``return_token_strs``).
* ``/detokenize``: ``{"tokens": [int]}`` answers ``{"prompt": str}``; a token outside the vocabulary is a 400
  naming it.
Exactly one of ``prompt`` and ``messages``; an unknown field is a 400 naming it (the models forbid extras).
"""
from typing import Any

from pydantic import BaseModel, ConfigDict

from nanovllm.entrypoints.protocol import bad_request, check_text


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


async def tokenize(serving, req: TokenizeRequest) -> dict:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of 'prompt' and 'messages'", "prompt")
    if not req.add_generation_prompt:
        raise bad_request("add_generation_prompt=false is not supported: chats are rendered for the reply",
                          "add_generation_prompt")
    param = "prompt" if req.messages is None else "messages"
    check_text(req.prompt if req.prompt is not None else req.messages, param)
    tokenizer = serving.tokenizer
    if req.prompt is not None:
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = await serving.batch_tokenizer.call(lambda: tokenizer.encode(req.prompt, add_special_tokens=add))
    else:
        kwargs = dict(getattr(serving, "chat_template_kwargs", None) or {}, **(req.chat_template_kwargs or {}))
        try:
            ids = await serving.batch_tokenizer.call(
                lambda: serving.prompts.apply_chat_template(req.messages, chat_template_kwargs=kwargs or None))
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids, "token_strs": strs}


async def detokenize(serving, req: DetokenizeRequest) -> dict:
    vocab = len(serving.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"tokens {bad[:8]} are outside the vocabulary (0 to {vocab - 1})", "tokens")
    return {"prompt": await serving.batch_tokenizer.call(lambda: serving.tokenizer.decode(req.tokens))}
