"""Tool calls in ``/v1/chat/completions``: ``tools`` and ``tool_choice`` checked, the constraint a forced call
needs, and a reply's text turned into OpenAI tool calls.

``ToolPlan.of(req)`` reads the request (None without tools and without ``tool_choice``); ``tool_choice`` is
"auto" by default when tools are given.  The chat template renders the tools (``render``) unless it is "none".
* "none": free text, nothing parsed.
* "auto": free text; the model's own markup is parsed by a parser of ``PARSERS``.  They are: "hermes", Qwen's and
  Hermes' ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (one or more).  Text outside the calls is
  the content (None if empty); markup that does not parse stays in the content.
* a named function: the output is constrained to its ``parameters`` schema; the reply is one call to it.
* "required": the output is constrained to a JSON array (at least one item; exactly one with
  ``parallel_tool_calls=false``) of ``{"name", "parameters"}``; each item is a call.
A reply with calls finishes on "tool_calls".  ``ToolStream`` streams a choice's content while holding back the
text from where a call may start, and gives the calls once the choice has finished.
"""
import dataclasses
import json
import re
import uuid

from nanovllm.engine.grammar import check
from nanovllm.entrypoints.protocol import bad_request
from nanovllm.sampling_params import StructuredOutputsParams

EMPTY_PARAMETERS = {"type": "object", "properties": {}}
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
HERMES_START = "<tool_call>"


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments JSON text)]) of a reply in the hermes format.  Without a call that parses, the
    content is ``text`` as it is; with calls, it is the text around them, trimmed next to them."""
    pieces, calls, pos = [], [], 0
    for match in _HERMES.finditer(text):
        call = _hermes_call(match.group(1))
        if call is not None:
            pieces.append(text[pos:match.start()])
            calls.append(call)
            pos = match.end()
    if not calls:
        return text, []
    pieces.append(text[pos:])
    last = len(pieces) - 1
    trimmed = [p.rstrip() if i == 0 else p.lstrip() if i == last else p.strip() for i, p in enumerate(pieces)]
    return "\n".join(p for p in trimmed if p) or None, calls


def _hermes_call(inner: str) -> tuple[str, str] | None:
    try:
        call = json.loads(inner)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # already JSON text: kept if it is
        try:
            json.loads(arguments)
        except ValueError:
            return None
        return call["name"], arguments
    return call["name"], json.dumps(arguments, ensure_ascii=False)


PARSERS = {"hermes": parse_hermes}  # each: text -> (content or None, [(name, arguments JSON text)])


def openai_tool_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclasses.dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict]  # the request's tools, as sent
    name: str | None = None  # the named function
    parallel: bool = True  # more than one call allowed
    parser: str = "hermes"

    @classmethod
    def of(cls, req) -> "ToolPlan | None":
        """The plan of a chat request, or None when it has no tools; a 400 naming a bad ``tools`` or
        ``tool_choice``."""
        tools, choice = req.tools, req.tool_choice
        for i, tool in enumerate(tools or ()):
            if tool.get("type", "function") != "function":
                raise bad_request(f"tools[{i}].type must be \"function\", got {tool.get('type')!r}", "tools")
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
                raise bad_request(f"tools[{i}].function.name must be a non-empty string, got {tool!r}", "tools")
            if not isinstance(function.get("parameters", {}), dict):
                raise bad_request(f"tools[{i}].function.parameters must be a JSON schema (an object), got "
                                  f"{function['parameters']!r}", "tools")
        if choice is None:
            choice = "auto" if tools else "none"
        names = [t["function"]["name"] for t in tools or ()]
        if isinstance(choice, dict):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if choice.get("type") != "function" or not isinstance(name, str):
                raise bad_request(f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\","
                                  f" \"function\": {{\"name\": ...}}}}, got {choice!r}", "tool_choice")
            if name not in names:
                raise bad_request(f"tool_choice names the function {name!r}, which is not in tools ({names})",
                                  "tool_choice")
            mode = "named"
        elif choice in ("none", "auto", "required"):
            mode, name = choice, None
        else:
            raise bad_request(f"tool_choice must be \"none\", \"auto\", \"required\" or a named function, got "
                              f"{choice!r}", "tool_choice")
        if mode != "none" and not tools:
            raise bad_request(f"tool_choice={choice!r} needs tools", "tool_choice")
        if not tools:
            return None
        return cls(mode, list(tools), name, req.parallel_tool_calls is not False)

    @property
    def render(self) -> list[dict] | None:
        """The tools the chat template renders (none with tool_choice "none")."""
        return None if self.mode == "none" else self.tools

    def _parameters(self) -> list[tuple[int, str, dict]]:
        return [(i, t["function"]["name"], t["function"].get("parameters") or EMPTY_PARAMETERS)
                for i, t in enumerate(self.tools) if self.mode == "required" or t["function"]["name"] == self.name]

    def constraint(self) -> StructuredOutputsParams | None:
        """The constraint that forces the call (named, required), each tool's schema checked (400 naming it)."""
        if self.mode not in ("named", "required"):
            return None
        for i, _, schema in self._parameters():
            try:
                check(StructuredOutputsParams(json=schema))
            except ValueError as e:
                raise bad_request(str(e).replace("structured_outputs.json", f"tools[{i}].function.parameters"),
                                  "tools") from None
        if self.mode == "named":
            return StructuredOutputsParams(json=self._parameters()[0][2])
        items = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                  "required": ["name", "parameters"]} for _, name, schema in self._parameters()]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutputsParams(json=array)

    def reply(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
        """(content, OpenAI tool calls, finish reason) of a choice's whole text.  Text that holds no call, such as
        a forced call cut short by ``max_tokens``, is the content, with the finish reason as it was."""
        calls: list[tuple[str, str]] = []
        content: str | None = text
        if self.mode == "auto":
            content, calls = PARSERS[self.parser](text)
            calls = calls if self.parallel else calls[:1]
        elif self.mode in ("named", "required"):
            try:
                value = json.loads(text)
            except ValueError:
                value = None
            if self.mode == "named" and isinstance(value, dict):
                content, calls = None, [(self.name, text)]
            elif self.mode == "required" and isinstance(value, list) and value and all(
                    isinstance(v, dict) and isinstance(v.get("name"), str) for v in value):
                content = None
                calls = [(v["name"], json.dumps(v.get("parameters", {}), ensure_ascii=False)) for v in value]
        if not calls:
            return content or None, [], finish_reason
        return content, [openai_tool_call(name, arguments) for name, arguments in calls], "tool_calls"


class ToolStream:
    """One streamed choice under a ``ToolPlan``: ``push`` each text delta and send what it returns as content;
    ``finish`` gives the rest of the content, the calls and the finish reason, so that the deltas sent add up to
    ``ToolPlan.reply`` of the whole text."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent = plan, "", 0

    def push(self, text: str) -> str:
        self.text += text
        if self.plan.mode != "auto":  # a forced call's text is the call: nothing is content until it fails to parse
            return ""
        safe = _before_call(self.text)
        delta, self.sent = safe[self.sent:], max(self.sent, len(safe))
        return delta

    def finish(self, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        content, calls, reason = self.plan.reply(self.text, finish_reason)
        content = content or ""
        assert content.startswith(self.text[:self.sent]), (content, self.text[:self.sent])
        return content[self.sent:], calls, reason


def _before_call(text: str) -> str:
    """The part of ``text`` that stays content whatever follows: the text before the first possible call
    markup (a prefix of ``<tool_call>`` at its end included), less the whitespace that would be trimmed next to a
    call."""
    start = text.find(HERMES_START)
    if start < 0:
        start = len(text)
        for k in range(min(len(HERMES_START) - 1, len(text)), 0, -1):
            if text.endswith(HERMES_START[:k]):
                start = len(text) - k
                break
    return text[:start].rstrip()
