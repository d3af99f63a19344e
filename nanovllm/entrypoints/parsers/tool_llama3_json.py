"""``llama3_json``: Llama 3.1-3.3's JSON tool calls: the reply is ``{"name": ..., "parameters": {...}}`` (or
``"arguments"``), optionally after ``<|python_tag|>``, several separated by ``;``.

The calls open the reply (after whitespace); a reply that does not open with one is all content.  Each call is a
JSON object with a non-empty string ``name`` and object arguments (re-serialized as ``json.dumps`` writes them);
from the first that does not parse, the rest stays content.  ``<|python_tag|>`` is a special token, so this parser
keeps special tokens in the text.  Streamed, each call is given whole once its closing brace arrives.
"""
import json

from nanovllm.entrypoints.parsers.tool_base import ToolParser, join_content, json_call, register_tool, skip_space

PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()


@register_tool
class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    skip_special_tokens = False

    def parse(self, text: str, final: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
        start = pos = len(text) - len(text.lstrip())
        if text.startswith(PYTHON_TAG, pos):
            pos += len(PYTHON_TAG)
        calls, end = [], start
        while True:
            pos = skip_space(text, pos)
            if calls:
                if not text.startswith(";", pos):
                    break
                pos = skip_space(text, pos + 1)
            try:
                obj, after = _DECODER.raw_decode(text, pos)
            except ValueError:
                break
            call = json_call(obj, ("parameters", "arguments"))
            if call is None:
                break
            calls.append(call)
            pos = end = after
        if not calls:
            return text, []
        return join_content([text[:start], text[end:]]), calls

    def content_end(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(body):
            return 0  # a call may open the reply
        return len(text)

