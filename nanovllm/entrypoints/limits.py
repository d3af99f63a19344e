"""A completion's length under ``max_model_len``: ``max_tokens_for`` gives a prompt's ``max_tokens`` (the one
requested, else the default capped to the room left) and ``fit_params`` sets it in a request's ``SamplingParams``
made before the prompt's length was known.  A prompt leaving no room, or a ``max_tokens`` (the request's ``field``)
past the room left, is a 400 naming it (``errors.bad_request``).
"""
import dataclasses
import re

from nanovllm.entrypoints.errors import bad_request
from nanovllm.sampling_params import SamplingParams


def max_tokens_for(max_model_len: int, num_prompt_tokens: int, requested: int | None, default: int | None,
                   field: str = "max_tokens") -> int:
    room = max_model_len - num_prompt_tokens
    if room <= 0:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
                          f"{num_prompt_tokens}: no room is left for a completion.", "prompt")
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                          f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} in "
                          f"the completion). Please reduce the prompt or {field}.", field)
    return requested


def fit_params(params: SamplingParams, max_model_len: int, num_prompt_tokens: int, requested: int | None, field: str,
               **changes) -> SamplingParams:
    """``params`` (``max_tokens`` a stand-in) with ``max_tokens_for``'s ``max_tokens`` (no default: the room left)
    and ``changes``; a value they make invalid (``min_tokens`` past the room left) is a 400 naming it."""
    max_tokens = max_tokens_for(max_model_len, num_prompt_tokens, requested, None, field)
    try:
        return dataclasses.replace(params, max_tokens=max_tokens, **changes)
    except (TypeError, ValueError) as e:
        raise bad_request(str(e), re.match(r"\w*", str(e)).group()) from None
