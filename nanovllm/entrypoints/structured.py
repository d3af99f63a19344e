"""A request's structured-output constraint: its fields turned into one ``StructuredOutputsParams``, checked.

The spellings, on ``/v1/completions`` and ``/v1/chat/completions`` alike:
* OpenAI's ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``, or ``{"type":
  "json_schema", "json_schema": {"name", "schema", "strict"}}`` (the schema is always enforced);
* vLLM's ``structured_outputs``: ``{"json" | "json_object" | "regex" | "choice" | "grammar": ...}``;
* vLLM's older ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``;
* a chat ``tool_choice`` that forces a call (``tool_calls.py`` makes its schema).
A request carries at most one of them: two are a 400 naming both.  The constraint is parsed by xgrammar here, in
the API process (``engine.grammar.check``), so a bad schema, regex or grammar is a 400 naming the request's field
and xgrammar's reason before anything is queued.
"""
from nanovllm.engine.grammar import check
from nanovllm.entrypoints.protocol import bad_request
from nanovllm.sampling_params import StructuredOutputsParams

KINDS = ("json", "json_object", "regex", "choice", "grammar")  # StructuredOutputsParams' fields
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _response_format(value: dict) -> tuple[str, dict] | None:
    """(field, StructuredOutputsParams kwargs) of an OpenAI ``response_format``, or None for text."""
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad_request("response_format.json_schema must be an object with a JSON schema under \"schema\" "
                              f"(an object), got {spec!r}", "response_format")
        return "response_format.json_schema", {"json": spec["schema"]}
    raise bad_request(f"response_format.type must be one of text, json_object, json_schema; got {kind!r}",
                      "response_format")


def _structured_outputs(value: dict) -> tuple[str, dict] | None:
    unknown = [k for k, v in value.items() if k not in KINDS and v not in (None, False)]
    if unknown:
        raise bad_request(f"structured_outputs.{unknown[0]} is not supported by nanovllm (only one of "
                          f"{', '.join(KINDS)})", "structured_outputs")
    given = {k: value[k] for k in KINDS if value.get(k) not in (None, False)}
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"structured_outputs holds {' and '.join(given)}: give only one constraint",
                          "structured_outputs")
    kind = next(iter(given))
    return f"structured_outputs.{kind}", given


def request_constraint(req, forced_tool: StructuredOutputsParams | None = None) -> StructuredOutputsParams | None:
    """The one constraint of ``req`` (a completions or chat request), checked by xgrammar, or None.
    ``forced_tool``: the constraint of a chat ``tool_choice`` that forces a call."""
    found: list[tuple[str, dict | StructuredOutputsParams]] = []
    if req.response_format is not None and (one := _response_format(req.response_format)) is not None:
        found.append(one)
    if req.structured_outputs is not None and (one := _structured_outputs(req.structured_outputs)) is not None:
        found.append(one)
    for name, kind in GUIDED.items():
        if getattr(req, name) is not None:
            found.append((name, {kind: getattr(req, name)}))
    if forced_tool is not None:
        found.append(("tool_choice", forced_tool))
    if not found:
        return None
    if len(found) > 1:
        names = [name for name, _ in found]
        raise bad_request(f"{' and '.join(names)} each constrain the output: give only one", names[0].split(".")[0])
    field, spec = found[0]
    param = field.split(".")[0]
    if not isinstance(spec, StructuredOutputsParams):
        try:
            spec = StructuredOutputsParams(**spec)
        except (TypeError, ValueError) as e:
            raise bad_request(_rename(str(e), field), param) from None
    try:
        check(spec)
    except ValueError as e:
        raise bad_request(_rename(str(e), field), param) from None
    return spec


def _rename(message: str, field: str) -> str:
    """``message`` about ``structured_outputs.<kind>`` (or ``structured_outputs``) said of the request's
    ``field``."""
    for kind in KINDS:
        prefix = f"structured_outputs.{kind}"
        if message.startswith(prefix):
            return field + message[len(prefix):]
    return message if field.startswith("structured_outputs") else f"{field}: {message}"
