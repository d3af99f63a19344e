"""The OpenAI request bodies (pydantic), their checks, and turning a request into ``SamplingParams``.

Errors a client causes are raised as ``APIError`` (``errors.py``) and answered as ``{"error": {"message",
"type", "param", "code"}}`` with the status it carries (``app.py``).  The models declare every field of OpenAI's
two request bodies and the vLLM extras nanovllm takes (``top_k``, ``min_p``, ``min_tokens``, ``stop_token_ids``,
``ignore_eos``, ``repetition_penalty``, ``skip_special_tokens``, ``include_stop_str_in_output``,
``chat_template_kwargs``, ``structured_outputs``, ``guided_*``); any other field is a 400 naming it (extras are
forbidden; ``app.py`` words the error with ``fields.unknown_field``).  Fields whose feature nanovllm lacks
(``fields.NEUTRAL``) are accepted at their neutral value and rejected with a 400 naming them otherwise, never
silently ignored.  Every text a request carries (dict keys included) must be valid Unicode: ``check_text``.
A request naming a model that is neither the served one nor one of its LoRA adapters is a 404 (``check_model``,
which gives the adapter's ``LoRARequest``); a prompt leaving no room under ``max_model_len``, or
an explicit ``max_tokens`` past it, a 400 (``limits.max_tokens_for``: without one, the default is capped to the
room left).
"""
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from nanovllm.entrypoints.errors import APIError, bad_request
from nanovllm.entrypoints.fields import non_neutral
from nanovllm.prompts import TEMPLATE_ARGUMENTS
from nanovllm.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions ``logprobs``
def check_model(model: str | None, served: str, adapters: dict | None = None):
    """None for the base model (``served``, or no model named); the ``LoRARequest`` of an adapter's name
    (``adapters``: by name); a 404 naming any other model."""
    if model is None or model == served:
        return None
    if adapters and model in adapters:
        return adapters[model]
    raise APIError(404, f"The model `{model}` does not exist; this server serves `{served}`"
                   + (f" and the LoRA adapters {sorted(adapters)}." if adapters else "."), "model", "model_not_found")


def check_text(value, param: str) -> None:
    """A 400 naming ``param`` if ``value`` holds a string that is not valid Unicode text: a lone surrogate, which
    JSON's ``\\u`` escapes can carry and no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"{param} holds {value[e.start]!r} at character {e.start}, a lone surrogate: not valid "
                              f"Unicode text", param) from None
    elif isinstance(value, BaseModel):
        check_text(value.model_dump(), param)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, param)
            check_text(item, param)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_text(item, param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted only at the value that means "off" (fields.NEUTRAL)
    continuous_usage_stats: bool | None = None


class _Request(BaseModel):
    """What completions and chat share: the sampling fields."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # the output's constraint, in any one of its spellings (``structured.py``)
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logit_bias: dict[str, float] | None = None  # token ids as JSON keys: strings
    min_tokens: int | None = None
    min_p: float | None = None

    def check_unsupported(self) -> None:
        for name in type(self).model_fields:
            check_text(getattr(self, name), name)
        for model, prefix in ((self, ""), (self.stream_options, "stream_options.")):
            refused = non_neutral(model, prefix) if model is not None else None
            if refused is not None:
                raise bad_request(*refused)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        if self.n < 1:
            raise bad_request(f"n must be >= 1, got {self.n}", "n")

    def sampling_params(self, max_tokens: int, defaults: dict, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        structured_outputs: StructuredOutputsParams | None = None,
                        vocab_size: int | None = None) -> SamplingParams:
        """The request's ``SamplingParams``; a field it leaves out takes the checkpoint's generation_config.json
        value (``defaults``), then OpenAI's default.  Bad values raise a 400 naming the field.
        ``structured_outputs``: the request's checked constraint (``structured.request_constraint``);
        ``vocab_size``: the model's, which ``logit_bias`` token ids must fall inside."""
        def pick(name, default):
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, default)

        top_k = pick("top_k", -1)
        try:
            params = self._sampling_params(pick, top_k, max_tokens, logprobs, prompt_logprobs, structured_outputs)
            if vocab_size is not None:
                params.check_vocab(vocab_size)
            return params
        except (TypeError, ValueError) as e:
            name = re.match(r"\w*", str(e)).group()
            raise bad_request(str(e), name if name in type(self).model_fields else None) from None

    def _logit_bias(self) -> dict[int, float] | None:
        """``logit_bias`` with its keys (JSON strings) as token ids; a key that is not one is a 400."""
        if self.logit_bias is None:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids (integers), got {key!r}", "logit_bias") from None
        return bias

    def _sampling_params(self, pick, top_k, max_tokens, logprobs, prompt_logprobs, structured_outputs):
        """``SamplingParams`` of the request's fields (``pick``: a field or its default); raises what it raises."""
        return SamplingParams(
            temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=-1 if top_k == 0 else top_k, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids or (), seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else (self.stop or []), logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, presence_penalty=pick("presence_penalty", 0.0),
            frequency_penalty=pick("frequency_penalty", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0), structured_outputs=structured_outputs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, min_p=pick("min_p", 0.0),
            min_tokens=self.min_tokens or 0, logit_bias=self._logit_bias())


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of={self.best_of} is not supported by nanovllm (only best_of = n)", "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise bad_request(f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {self.logprobs}", "logprobs")

    def prompts(self) -> list:
        """The prompts: a str, or a list of token ids, each."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise bad_request("prompt must not be an empty list", "prompt")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's reply: the call it answers

    def template_dict(self, index: int) -> dict:
        """The message for the chat template: ``{"role", "content"}``, the content a string or the list of parts
        (text, and ``image_url`` or ``image`` for vision-language models, which ``nanovllm.multimodal.chat_prompt``
        resolves; other parts are rejected), and as transformers' tools API expects, an assistant's ``tool_calls``
        (each call's JSON ``arguments`` text parsed into an object), a tool's ``tool_call_id`` and any ``name``."""
        content = self.content
        if isinstance(content, list):
            for part in content:
                kind = part.get("type")
                if not (kind == "text" and isinstance(part.get("text"), str)) and kind not in ("image_url", "image"):
                    raise bad_request(f"messages[{index}]: content part of type {kind!r} is not supported (text, "
                                      f"image_url)", "messages")
        out = {"role": self.role, "content": content if isinstance(content, list) else content or ""}
        if self.tool_calls is not None:
            out["tool_calls"] = [_template_tool_call(call, f"messages[{index}].tool_calls[{i}]")
                                 for i, call in enumerate(self.tool_calls)]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if isinstance((self.model_extra or {}).get("name"), str):
            out["name"] = self.model_extra["name"]
        return out


def _template_tool_call(call: dict, where: str) -> dict:
    """An OpenAI tool call of the history as chat templates read it: ``arguments`` a JSON object, not its text."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"{where}.function.name must be a string, got {call!r}", "messages")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as e:
            raise bad_request(f"{where}.function.arguments is not valid JSON: {e}", "messages") from None
    return {**call, "type": "function", "function": {**function, "arguments": arguments}}


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template
    # taken, with no effect on the output: identifiers for the caller's own bookkeeping
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache needs no key
    # accepted only at the value that means "off" (fields.NEUTRAL)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    prompt_cache_retention: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")
        clash = sorted(TEMPLATE_ARGUMENTS.intersection(self.chat_template_kwargs or ()))
        if clash:
            raise bad_request(f"chat_template_kwargs may not set {clash}: the server sets "
                              f"{sorted(TEMPLATE_ARGUMENTS)} itself", "chat_template_kwargs")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                  "top_logprobs")

    def chat_params(self, defaults: dict, vocab_size: int | None) -> SamplingParams:
        """The checked request's (``check_unsupported``; its model: ``check_model``) ``SamplingParams``,
        ``max_tokens`` the one asked for or, without one, a stand-in (``min_tokens``, at least 1) until the prompt's
        length sets the room left (``limits.fit_params``, which checks ``min_tokens`` against it)."""
        requested = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        stand_in = max(self.min_tokens or 0, 1)
        return self.sampling_params(requested if requested is not None else stand_in, defaults,
                                    (self.top_logprobs or 0) if self.logprobs else None, vocab_size=vocab_size)
