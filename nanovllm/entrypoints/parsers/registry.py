"""The reasoning parsers' base class and their registry by name.

Contract of a ``ReasoningParser`` (one instance per choice; stateless for ``split``, stateful for ``push``):

* ``split(text)`` -> ``(reasoning, content)`` of a whole reply: the text of its ``<think>...</think>`` block,
  stripped of surrounding whitespace (``None`` when the reply has no reasoning or an empty one), and the rest,
  with the whitespace that follows ``</think>`` dropped.
* ``push(delta)`` -> ``(reasoning delta, content delta)`` as a reply streams, and ``finish()`` -> the same for what
  was held back; the deltas concatenate to exactly ``split`` of the whole text (``None`` read as ""), however
  the text is cut.  Text that may still be part of a tag, or whitespace whose side of a tag is not yet known, is
  held back until it is known.
A format sets ``opens_in_prompt``: False when the model writes ``<think>`` itself (a reply that does not open with
it is all content), True when the chat template opened it (the reply is reasoning until ``</think>``; a leading
``<think>`` is dropped).  A reply whose ``</think>`` never comes is reasoning to its end.  ``register`` adds a
class under its ``name``; ``reasoning_parser(name)`` returns it, or a ``ValueError`` naming it and the known ones.
"""

START, END = "<think>", "</think>"

REASONING_PARSERS: dict[str, type["ReasoningParser"]] = {}


def register(cls: type["ReasoningParser"]) -> type["ReasoningParser"]:
    REASONING_PARSERS[cls.name] = cls
    return cls


def reasoning_parser(name: str) -> type["ReasoningParser"]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}") \
            from None


def _held_tag_prefix(text: str, tag: str) -> int:
    """The length of the longest proper prefix of ``tag`` that ``text`` ends with."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    name = ""
    opens_in_prompt = False

    def __init__(self):
        # "start": before the reply shows whether it opens a think block; "reasoning": inside it (``_lead``: its
        # leading whitespace not yet passed); "content": after it, or a reply with no reasoning
        self._state = "reasoning" if self.opens_in_prompt else "start"
        self._lead = True
        self._may_open = self.opens_in_prompt  # a ``<think>`` the model writes though the template opened it
        self._after_end = False  # content that follows ``</think>``: its leading whitespace is dropped
        self._held = ""

    def split(self, text: str) -> tuple[str | None, str]:
        body = text.lstrip()
        if body.startswith(START):
            body = body[len(START):]
        elif not self.opens_in_prompt:
            return None, text
        end = body.find(END)
        if end < 0:
            return body.strip() or None, ""
        return body[:end].strip() or None, body[end + len(END):].lstrip()

    def push(self, delta: str) -> tuple[str, str]:
        self._held += delta
        reasoning, content = [], []
        while self._held:
            if self._state == "start":
                body = self._held.lstrip()
                if not body or START.startswith(body):
                    break  # whitespace, or the start of ``<think>``: not yet known
                if body.startswith(START):
                    self._held, self._state = body[len(START):], "reasoning"
                elif self.opens_in_prompt:
                    self._state = "reasoning"
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                if self._lead:
                    self._held = self._held.lstrip()
                    if not self._held:
                        break
                    if self._may_open:
                        if START.startswith(self._held) and self._held != START:
                            break  # the model may be writing a ``<think>`` the template already wrote
                        self._may_open = False
                        if self._held.startswith(START):
                            self._held = self._held[len(START):]
                            continue
                    self._lead = False
                end = self._held.find(END)
                if end >= 0:
                    reasoning.append(self._held[:end].rstrip())
                    self._held, self._state, self._after_end = self._held[end + len(END):], "content", True
                    continue
                keep = _held_tag_prefix(self._held, END)
                safe = self._held[:len(self._held) - keep]
                ready = safe.rstrip()  # trailing whitespace: reasoning's, unless ``</think>`` comes next
                reasoning.append(ready)
                self._held = self._held[len(ready):]
                break
            else:
                if self._after_end:
                    self._held = self._held.lstrip()
                    if not self._held:
                        break
                    self._after_end = False
                content.append(self._held)
                self._held = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The reply ended: what was held back, as reasoning or content (``split``'s reading of the whole)."""
        held, self._held = self._held, ""
        if self._state == "start":
            body = held.lstrip()
            if self.opens_in_prompt or body == START:
                return "", ""  # an empty (or bare ``<think>``) reply: no reasoning, no content
            return "", held
        if self._state == "reasoning":
            return held.rstrip(), ""
        return "", held.lstrip() if self._after_end else held
