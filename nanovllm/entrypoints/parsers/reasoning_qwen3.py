"""``qwen3``: Qwen3's thinking replies, ``<think>\\nreasoning\\n</think>\\n\\nanswer``.

The model writes ``<think>`` itself: a reply that opens with it (after any whitespace) is reasoning up to
``</think>`` (or its end, when cut short), then content.  A reply that does not open with it has no reasoning and
is all content: what Qwen3 writes with ``chat_template_kwargs={"enable_thinking": false}``, whose template puts an
empty ``<think></think>`` block in the prompt.  Templates that open ``<think>`` in the prompt themselves
(Qwen3-*-Thinking-2507) need ``deepseek_r1`` instead.
"""
from nanovllm.entrypoints.parsers.registry import ReasoningParser, register


@register
class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    opens_in_prompt = False
