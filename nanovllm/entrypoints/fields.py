"""Which request fields nanovllm takes, and what it does with those it cannot honour.

Contract: every field of OpenAI's completions and chat-completions request bodies (and of vLLM's extras that
nanovllm takes) is declared on the request models of ``protocol.py``; a field they do not declare is a 400 naming
it (``unknown_field``, the models forbid extras).  A declared field whose feature nanovllm lacks is listed in
``NEUTRAL`` with the values that mean "off": those are accepted (clients send defaults), any other value is a 400
naming the field, its value and why (``non_neutral``), never silently ignored.
"""
from typing import Any

# field: (values that mean "off", what is missing)
NEUTRAL: dict[str, tuple[tuple, str]] = {
    "suffix": ((None, ""), "no insertion (fill-in-the-middle) mode"),
    "audio": ((None,), "no audio output"),
    "modalities": ((None, ["text"]), "text is the only output modality"),
    "prediction": ((None,), "no predicted outputs"),
    "web_search_options": ((None,), "no web search"),
    "functions": ((None, []), "the deprecated functions API is not served: send tools"),
    "function_call": ((None, "none"), "the deprecated functions API is not served: send tool_choice"),
    "store": ((None, False), "nothing is stored"),
    "metadata": ((None, {}), "nothing is stored to tag"),
    "service_tier": ((None, "auto", "default"), "one service tier only"),
    "reasoning_effort": ((None,), "no control of reasoning effort (chat_template_kwargs reach the template)"),
    "verbosity": ((None,), "no control of verbosity"),
    "prompt_cache_retention": ((None,), "the prefix cache keeps blocks while memory allows, with no setting"),
    "include_obfuscation": ((None, False), "streams carry no obfuscation padding"),
    "continuous_usage_stats": ((None, False), "usage comes in the last chunk only"),
}


def non_neutral(model, prefix: str = "") -> tuple[str, str] | None:
    """(message, param) of the first field of ``model`` (a request or its ``stream_options``, whose fields are
    named ``prefix`` + name) listed in ``NEUTRAL`` whose value is not one of its neutral ones, else None."""
    for name in type(model).model_fields:
        if name not in NEUTRAL:
            continue
        value, (allowed, why) = getattr(model, name), NEUTRAL[name]
        if not any(_same(value, a) for a in allowed):
            return (f"{prefix}{name}={value!r} is not supported by nanovllm ({why}); only "
                    f"{' or '.join(repr(a) for a in allowed)} is accepted", prefix + name)
    return None


def _same(value: Any, neutral: Any) -> bool:
    """Equal and of the same kind (``True`` is not ``1`` here, ``0`` is ``0.0``)."""
    if isinstance(value, bool) != isinstance(neutral, bool):
        return False
    return value == neutral


def unknown_field(loc: list[str], value: Any) -> tuple[str, str]:
    """(message, param) of a field the request models do not declare, at ``loc`` (its path in the body)."""
    param = ".".join(loc)
    return (f"unknown field {param!r} (got {value!r}): nanovllm does not take it, and refuses it rather than "
            f"ignoring it; docs/SERVER.md lists the fields it takes", param)
