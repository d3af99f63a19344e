"""``deepseek_r1``: DeepSeek-R1's replies, whose chat template ends the prompt with ``<think>\\n``.

The reply is reasoning up to ``</think>``, then content, though it carries no opening tag (one it writes anyway is
dropped); a reply whose ``</think>`` never comes (cut short by ``max_tokens``) is all reasoning.  Also right for
other templates that open the think block in the prompt (Qwen3-*-Thinking-2507).
"""
from nanovllm.entrypoints.parsers.registry import ReasoningParser, register


@register
class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    opens_in_prompt = True
