"""The reasoning parsers' base class and their registry by name.

Contract of a ``ReasoningParser`` (one instance per choice; stateless for ``split``, stateful for ``push``):

* ``split(text)`` -> ``(reasoning, content)`` of a whole reply: the text between its tags ``start`` and ``end``
  (per class; ``<think>``, ``</think>`` by default), stripped of surrounding whitespace (``None`` when the reply has
  no reasoning or an empty one), and the rest, with the whitespace that follows ``end`` dropped.
* ``push(delta)`` -> ``(reasoning delta, content delta)`` as a reply streams, and ``finish()`` -> the same for what
  was held back; the deltas concatenate to exactly ``split`` of the whole text (``None`` read as ""), however the
  text is cut.  Text that may still be part of a tag, or whitespace whose side of a tag is unknown, is held back.
``opens_in_prompt``: False when the model writes ``start`` itself (a reply that does not open with it is content;
one that opens with ``answer_start``, if set, has that tag dropped), True when the template wrote it (the reply is
reasoning until ``end``; a leading ``start`` is dropped).  A reply whose ``end`` never comes is all reasoning.
``keeps_special_tokens``: the tags are special tokens the server must keep in the text.  ``register`` adds a class
under its ``name``; ``reasoning_parser(name)`` returns it, or a ``ValueError`` naming it and the known ones."""

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
    start, end = "<think>", "</think>"  # the tags around the reasoning
    answer_start = ""  # a tag that, opening the reply, means no reasoning (dropped, like ``start`` + ``end``)
    opens_in_prompt = False
    keeps_special_tokens = False  # the tags are special tokens: the server keeps them in the text

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
        if body.startswith(self.start):
            body = body[len(self.start):]
        elif not self.opens_in_prompt and self.answer_start and body.startswith(self.answer_start):
            return None, body[len(self.answer_start):].lstrip()
        elif not self.opens_in_prompt:
            return None, text
        end = body.find(self.end)
        if end < 0:
            return body.strip() or None, ""
        return body[:end].strip() or None, body[end + len(self.end):].lstrip()

    def push(self, delta: str) -> tuple[str, str]:
        self._held += delta
        reasoning, content = [], []
        while self._held:
            if self._state == "start":
                body = self._held.lstrip()
                if not body or self.start.startswith(body) or self.answer_start.startswith(body):
                    break  # whitespace, or the start of a tag: not yet known
                if body.startswith(self.start):
                    self._held, self._state = body[len(self.start):], "reasoning"
                elif self.answer_start and body.startswith(self.answer_start):
                    self._held, self._state, self._after_end = body[len(self.answer_start):], "content", True
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
                        if self.start.startswith(self._held) and self._held != self.start:
                            break  # the model may be writing a ``<think>`` the template already wrote
                        self._may_open = False
                        if self._held.startswith(self.start):
                            self._held = self._held[len(self.start):]
                            continue
                    self._lead = False
                end = self._held.find(self.end)
                if end >= 0:
                    reasoning.append(self._held[:end].rstrip())
                    self._held, self._state, self._after_end = self._held[end + len(self.end):], "content", True
                    continue
                keep = _held_tag_prefix(self._held, self.end)
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
            if self.opens_in_prompt or body in (self.start, self.answer_start):
                return "", ""  # an empty (or bare ``<think>``) reply: no reasoning, no content
            return "", held
        if self._state == "reasoning":
            return held.rstrip(), ""
        return "", held.lstrip() if self._after_end else held
