"""``mistral``: Mistral's ``[TOOL_CALLS]`` followed by a JSON array of ``{"name", "arguments"}`` objects, or the
newer (tokenizer v11+) ``[TOOL_CALLS]NAME[ARGS]{...}`` per call (a ``[CALL_ID]ID`` before ``[ARGS]`` is skipped).

Text before and after the calls is the content.  In an array, calls are read one by one; from the first item that is
not a call (a non-empty string ``name``, object arguments, re-serialized as ``json.dumps`` writes them), the rest
stays content, as does a ``[TOOL_CALLS]`` followed by neither form.  ``[TOOL_CALLS]`` is a special token, so this
parser keeps special tokens in the text.  Streamed, each call is given whole once its closing brace arrives.
"""
import json
import re

from nanovllm.entrypoints.parsers.tool_base import ToolParser, join_content, json_call, register_tool, skip_space

START = "[TOOL_CALLS]"
_NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9_\-]+)?\[ARGS\]")
_DECODER = json.JSONDecoder()


@register_tool
class MistralToolParser(ToolParser):
    name = "mistral"
    starts = (START,)
    skip_special_tokens = False

    def parse(self, text: str, final: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
        pieces, calls, pos, search = [], [], 0, 0
        while (i := text.find(START, search)) >= 0:
            found, end = _after_tag(text, i + len(START))
            if found:
                pieces.append(text[pos:i])
                calls += found
                pos = end
            search = max(end, i + len(START))
        if not calls:
            return text, []
        pieces.append(text[pos:])
        return join_content(pieces), calls


def _after_tag(text: str, pos: int) -> tuple[list[tuple[str, str]], int]:
    """(the calls after a ``[TOOL_CALLS]`` ending at ``pos``, where the last of them ends)."""
    named = _NAMED.match(text, pos)
    if named is not None:
        try:
            arguments, end = _DECODER.raw_decode(text, named.end())
        except ValueError:
            return [], pos
        call = json_call({"name": named.group(1), "arguments": arguments})
        return ([call], end) if call is not None else ([], pos)
    pos = skip_space(text, pos)
    if not text.startswith("[", pos):
        return [], pos
    calls, item, end = [], pos + 1, pos
    while True:
        try:
            obj, after = _DECODER.raw_decode(text, skip_space(text, item))
        except ValueError:
            return calls, end
        call = json_call(obj)
        if call is None:
            return calls, end
        calls.append(call)
        end = after = skip_space(text, after)
        if text.startswith("]", after):
            return calls, after + 1
        if not text.startswith(",", after):
            return calls, end
        item = after + 1

