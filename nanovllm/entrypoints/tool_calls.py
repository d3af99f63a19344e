"""Tool calls in ``/v1/chat/completions``, the request side: ``tools`` and ``tool_choice`` checked into a
``ToolPlan`` and the constraint a forced call needs; a reply's text is turned into OpenAI tool calls in
``chat_reply.py`` (``tool_reply``, ``ToolStream``), which takes the plan as data.

``ToolPlan.of(req, parser)`` reads the request (None without tools and without ``tool_choice``); ``tool_choice`` is
"auto" by default when tools are given.  The chat template renders the tools (``render``) unless it is "none".
* "none": free text, nothing parsed.
* "auto": free text; the model's own markup is parsed by the server's tool-call parser (``parsers/tool_*.py``,
  ``--tool-call-parser``, hermes by default).  Text outside the calls is the content (None if empty); markup that
  does not parse stays in the content.
* a named function: the output is constrained to its ``parameters`` schema; the reply is one call to it.
* "required": the output is constrained to a JSON array (at least one item; exactly one with
  ``parallel_tool_calls=false``) of ``{"name", "parameters"}``; each item is a call.
A reply with calls finishes on "tool_calls".  ``skip_special_tokens`` is False where the parser's markup is a
special token (the reply's text must keep it: ``chat.start_chat``).
"""
import dataclasses

from nanovllm.engine.grammar import check
from nanovllm.entrypoints.parsers import DEFAULT_TOOL_PARSER, ToolParser, tool_parser
from nanovllm.entrypoints.protocol import bad_request
from nanovllm.entrypoints.structured import request_constraint
from nanovllm.sampling_params import StructuredOutputsParams

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


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


def chat_tools(req, parser: type[ToolParser] | None = None) -> tuple[ToolPlan | None, StructuredOutputsParams | None]:
    """A chat request's ``ToolPlan`` (or None) and its one output constraint (``structured.request_constraint``, a
    forced call's among them)."""
    plan = ToolPlan.of(req, parser)
    forced = plan.constraint() if plan is not None else None
    return plan, request_constraint(req, forced)
