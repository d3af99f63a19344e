"""``qwen3_coder``: Qwen3-Coder's and Qwen3.5's XML calls, one or more of
``<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>``.

A call is ``<tool_call>``, whitespace and ``<function=NAME>``; anything else after ``<tool_call>`` stays content.
A parameter's value runs to ``</parameter>`` (or, when the model leaves it out, the next ``<parameter=`` or
``</function>``), one newline on each side dropped; other text inside the function is ignored.  The call ends at
``</function>`` (then an optional ``</tool_call>``), or ``</tool_call>``, or the end of the reply.  Values are
converted by the tool's parameter schema: a ``string`` (or a parameter without a type, or unknown) stays a string;
other types are parsed as JSON (``True``/``False`` too, for booleans), falling back to the string.  The arguments
are the JSON object of the parameters in order (a repeated one: the first), written as ``json.dumps`` writes it.
Streamed, a call's name is given once ``<function=NAME>`` is complete, its arguments as each parameter closes.
"""
import json
import re

from nanovllm.entrypoints.parsers.tool_base import ToolParser, join_content, register_tool

START = "<tool_call>"
_FUNCTION = re.compile(r"<tool_call>\s*<function=([^>\n]+)>")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>")
_VALUE_END = re.compile(r"</parameter>|<parameter=|</function>")
_CALL_END = re.compile(r"</function>(?:\s*</tool_call>)?|</tool_call>")


@register_tool
class Qwen3CoderToolParser(ToolParser):
    name = "qwen3_coder"
    starts = (START,)

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self.schemas = {}  # function name -> parameter name -> schema
        for tool in self.tools:
            function = tool.get("function") or {}
            properties = (function.get("parameters") or {}).get("properties")
            self.schemas[function.get("name")] = properties if isinstance(properties, dict) else {}

    def parse(self, text: str, final: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
        pieces, calls, pos, search = [], [], 0, 0
        while (i := text.find(START, search)) >= 0:
            match = _FUNCTION.match(text, i)
            if match is None:
                search = i + len(START)
                continue
            name = match.group(1).strip()
            arguments, end = self._arguments(text, match.end(), name, final)
            pieces.append(text[pos:i])
            calls.append((name, arguments))
            if end is None:  # still open: it runs to the end
                pos = len(text)
                break
            pos = search = end
        if not calls:
            return text, []
        pieces.append(text[pos:])
        return join_content(pieces), calls

    def _arguments(self, text: str, pos: int, name: str, final: bool) -> tuple[str, int | None]:
        """(the arguments JSON text, where the call's markup ends); a call still open when not ``final`` gives
        the arguments of its closed parameters without the closing brace, and None."""
        members, seen = [], set()
        while (match := _PARAMETER.match(text, pos)) is not None:
            end = _VALUE_END.search(text, match.end())
            if end is None and not final:
                return "{" + ", ".join(members), None
            value = text[match.end():end.start() if end is not None else len(text)]
            value = value[1:] if value.startswith("\n") else value
            value = value[:-1] if value.endswith("\n") else value
            key = match.group(1).strip()
            if key not in seen:
                seen.add(key)
                members.append(json.dumps(key, ensure_ascii=False) + ": " +
                               json.dumps(self._convert(name, key, value), ensure_ascii=False))
            if end is None:
                pos = len(text)
                break
            pos = end.end() if end.group() == "</parameter>" else end.start()
        end = _CALL_END.search(text, pos)
        if end is None:  # open: closed by the end of a whole reply
            return "{" + ", ".join(members) + ("}" if final else ""), None
        return "{" + ", ".join(members) + "}", end.end()

    def _convert(self, function: str, key: str, value: str):
        schema = self.schemas.get(function, {}).get(key)
        kind = schema.get("type") if isinstance(schema, dict) else None
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), None)
        if kind not in ("integer", "number", "boolean", "object", "array", "null"):
            return value
        if kind == "boolean" and value.strip() in ("True", "False"):
            return value.strip() == "True"
        try:
            return json.loads(value)
        except ValueError:
            return value
