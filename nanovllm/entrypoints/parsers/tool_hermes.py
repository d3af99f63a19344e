"""``hermes``: Hermes' and Qwen's (Qwen2.5, Qwen3) ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

One or more calls, each a JSON object with a non-empty string ``name`` and ``arguments`` (or ``parameters``): an
object, or JSON text, kept as it is.  A call whose ``</tool_call>`` never comes (the reply ends) counts if its JSON
parses.  A call that does not parse stays in the content.  Streamed, each call is given whole once its
``</tool_call>`` arrives (the arguments are re-serialized, so they cannot be given as they are written).
"""
import json
import re

from nanovllm.entrypoints.parsers.tool_base import ToolParser, join_content, json_call, register_tool

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_CLOSED_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@register_tool
class HermesToolParser(ToolParser):
    name = "hermes"
    starts = (START,)

    def parse(self, text: str, final: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
        pieces, calls, pos = [], [], 0
        for match in (_CALL if final else _CLOSED_CALL).finditer(text):
            try:
                call = json_call(json.loads(match.group(1)))
            except ValueError:
                call = None
            if call is not None:
                pieces.append(text[pos:match.start()])
                calls.append(call)
                pos = match.end()
        if not calls:
            return text, []
        pieces.append(text[pos:])
        return join_content(pieces), calls
