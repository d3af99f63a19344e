"""Tool calls in ``/v1/chat/completions``: ``tools`` and ``tool_choice`` checked, the constraint a forced call
needs, and a reply's text turned into OpenAI tool calls.

``ToolPlan.of(req, parser)`` reads the request (None without tools and without ``tool_choice``); ``tool_choice`` is
"auto" by default when tools are given.  The chat template renders the tools (``render``) unless it is "none".
* "none": free text, nothing parsed.
* "auto": free text; the model's own markup is parsed by the server's tool-call parser (``parsers/tool_*.py``,
  ``--tool-call-parser``, hermes by default).  Text outside the calls is the content (None if empty); markup that
  does not parse stays in the content.
* a named function: the output is constrained to its ``parameters`` schema; the reply is one call to it.
* "required": the output is constrained to a JSON array (at least one item; exactly one with
  ``parallel_tool_calls=false``) of ``{"name", "parameters"}``; each item is a call.
A reply with calls finishes on "tool_calls".  ``ToolStream`` streams a choice: content while no call may have
started, each call (its id and name, then argument fragments) as the parser reads it, the rest at the end.
"""
import dataclasses
import json
import uuid

from nanovllm.engine.grammar import check
from nanovllm.entrypoints.parsers import DEFAULT_TOOL_PARSER, ToolParser, tool_parser
from nanovllm.entrypoints.protocol import bad_request
from nanovllm.entrypoints.structured import request_constraint
from nanovllm.sampling_params import StructuredOutputsParams

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def openai_tool_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclasses.dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict]  # the request's tools, as sent
    name: str | None = None  # the named function
    parallel: bool = True  # more than one call allowed
    parser: ToolParser | None = None  # reads "auto" replies

    @classmethod
    def of(cls, req, parser: type[ToolParser] | None = None) -> "ToolPlan | None":
        """The plan of a chat request, or None when it has no tools; a 400 naming a bad ``tools`` or
        ``tool_choice``.  ``parser``: the tool-call parser's class (hermes by default)."""
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
        parser = parser or tool_parser(DEFAULT_TOOL_PARSER)
        return cls(mode, list(tools), name, req.parallel_tool_calls is not False, parser(tools))

    @property
    def skip_special_tokens(self) -> bool:
        """False where the parser reads markup that is a special token (the reply's text must keep it)."""
        return self.mode != "auto" or self.parser.skip_special_tokens

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

    def auto_calls(self, text: str, final: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
        """The parser's (content, [(name, arguments)]) of an "auto" reply (``final=False``: still streaming), only
        the first call without ``parallel_tool_calls``."""
        content, calls = self.parser.parse(text, final)
        return content, calls if self.parallel else calls[:1]

    def reply(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
        """(content, OpenAI tool calls, finish reason) of a choice's whole text.  Text that holds no call, such as
        a forced call cut short by ``max_tokens``, is the content, with the finish reason as it was."""
        calls: list[tuple[str, str]] = []
        content: str | None = text
        if self.mode == "auto":
            content, calls = self.auto_calls(text)
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


def chat_tools(req, parser: type[ToolParser] | None = None) -> tuple[ToolPlan | None, StructuredOutputsParams | None]:
    """A chat request's ``ToolPlan`` (or None) and its one output constraint (``structured.request_constraint``, a
    forced call's among them); a parser that reads special-token markup keeps it in the text."""
    plan = ToolPlan.of(req, parser)
    if plan is not None and not plan.skip_special_tokens:
        req.skip_special_tokens = False  # the parser reads markup that is a special token ([TOOL_CALLS])
    forced = plan.constraint() if plan is not None else None
    return plan, request_constraint(req, forced)


class ToolStream:
    """One streamed choice under a ``ToolPlan``: ``push`` each text delta, ``finish`` once it has ended; each gives
    the content to send and the ``delta.tool_calls`` entries (a call's index, id, type and name with empty
    arguments first, then its argument fragments), so that what is sent adds up to ``ToolPlan.reply`` of the whole
    text as the ``openai`` client accumulates it.  Forced calls (named, required) are given at the end."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent = plan, "", 0
        self.calls: list[list[str]] = []  # per call sent: its id, name and the arguments sent

    def push(self, text: str) -> tuple[str, list[dict]]:
        self.text += text
        if self.plan.mode == "none":  # nothing parsed: all content, as it comes
            self.sent += len(text)
            return text, []
        if self.plan.mode != "auto":  # a forced call's text is the call: nothing is content until it fails to parse
            return "", []
        safe = self.text[:self.plan.parser.content_end(self.text)]
        delta, self.sent = safe[self.sent:], max(self.sent, len(safe))
        return delta, self._deltas(self.plan.auto_calls(self.text, final=False)[1])

    def finish(self, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        """(the rest of the content, the rest of the calls' deltas, the finish reason)."""
        content, calls, reason = self.plan.reply(self.text, finish_reason)
        content = content or ""
        assert content.startswith(self.text[:self.sent]), (content, self.text[:self.sent])
        deltas = self._deltas([(c["function"]["name"], c["function"]["arguments"]) for c in calls])
        return content[self.sent:], deltas, reason

    def _deltas(self, calls: list[tuple[str, str]]) -> list[dict]:
        out = []
        for index, (name, arguments) in enumerate(calls):
            if index == len(self.calls):
                self.calls.append([f"call_{uuid.uuid4().hex[:24]}", name, ""])
                out.append({"index": index, "id": self.calls[index][0], "type": "function",
                            "function": {"name": name, "arguments": ""}})
            _, sent_name, sent = self.calls[index]
            assert name == sent_name and arguments.startswith(sent), (name, arguments, sent_name, sent)
            if len(arguments) > len(sent):
                out.append({"index": index, "function": {"arguments": arguments[len(sent):]}})
                self.calls[index][2] = arguments
        assert len(calls) >= len(self.calls), (calls, self.calls)
        return out
