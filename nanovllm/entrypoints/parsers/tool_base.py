"""The tool-call parsers' base class and their registry by name.

Contract of a ``ToolParser`` (built with a request's ``tools`` as sent; stateless, so one serves any number of texts):
* ``parse(text)`` -> ``(content, calls)`` of a whole reply: ``calls`` a list of ``(name, arguments JSON text)``;
  ``content`` the text outside them, trimmed next to them, pieces joined by a newline (None if empty), or ``text``
  as it is when no call parses.  Markup that does not parse stays in the content.
* ``parse(text, final=False)``: a reply still streaming.  Only its calls count, and they are a prefix of the whole
  reply's, whatever follows: no call is taken back, no name changes, the last call's arguments may be a prefix of
  its final ones (they only grow).  So deltas of successive parses add up to the whole reply's calls.
* ``content_end(text)``: how much of a reply still streaming is content whatever follows: the text before the first
  place a call may start (a prefix of the opening markup at its end included), less the whitespace a call trims.
* ``skip_special_tokens``: False where the markup is a special token the text must keep (``[TOOL_CALLS]``).
``register_tool`` adds a class under its ``name``; ``tool_parser(name)`` returns it, or a ``ValueError`` naming it
and the known ones.
"""
import json

TOOL_PARSERS: dict[str, type["ToolParser"]] = {}


def register_tool(cls: type["ToolParser"]) -> type["ToolParser"]:
    TOOL_PARSERS[cls.name] = cls
    return cls


def tool_parser(name: str) -> type["ToolParser"]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None


def held_prefix(text: str, tag: str) -> int:
    """The length of the longest proper prefix of ``tag`` that ``text`` ends with."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def skip_space(text: str, pos: int) -> int:
    """The first position from ``pos`` on that is not whitespace."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def join_content(pieces: list[str]) -> str | None:
    """The content of a reply with calls: the text pieces around them (the first before the first call, the last
    after the last), each trimmed next to a call, the non-empty ones joined by a newline; None if none is left."""
    last = len(pieces) - 1
    trimmed = [p.rstrip() if i == 0 else p.lstrip() if i == last else p.strip() for i, p in enumerate(pieces)]
    return "\n".join(p for p in trimmed if p) or None


def json_call(obj, keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[str, str] | None:
    """``(name, arguments JSON text)`` of a decoded ``{"name": ..., KEY: {...}}`` (the first of ``keys`` present;
    arguments already JSON text are kept as they are if they parse), or None if it is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = next((obj[k] for k in keys if k in obj), {})
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return None
        return obj["name"], arguments
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


class ToolParser:
    name = ""
    starts: tuple[str, ...] = ()  # markup that opens a call
    skip_special_tokens = True

    def __init__(self, tools: list[dict] | None = None):
        self.tools = list(tools or ())

    def parse(self, text: str, final: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        end = len(text)
        for start in self.starts:
            i = text.find(start)
            end = min(end, i if i >= 0 else len(text) - held_prefix(text, start))
        return len(text[:end].rstrip())
