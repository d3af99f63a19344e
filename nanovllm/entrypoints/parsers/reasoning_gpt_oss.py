"""``gpt_oss``: GPT-OSS's harmony replies, whose channels split into reasoning (``analysis``) and content (``final``).

After the prompt's ``<|start|>assistant`` the model writes ``<|channel|>analysis<|message|>REASONING<|end|>``, then
``<|start|>assistant<|channel|>final<|message|>ANSWER`` and the stop token ``<|return|>`` (not in the text).  A reply
may also open directly with ``<|channel|>final<|message|>`` (that tag dropped, the rest content); one cut short inside
the analysis channel is all reasoning.  The markers are special tokens, so the server keeps special tokens in the
text of requests it reads with this parser (``keeps_special_tokens``).
"""
from nanovllm.entrypoints.parsers.registry import ReasoningParser, register

FINAL = "<|channel|>final<|message|>"


@register
class GptOssReasoningParser(ReasoningParser):
    name = "gpt_oss"
    start = "<|channel|>analysis<|message|>"
    end = "<|end|><|start|>assistant" + FINAL
    answer_start = FINAL
    opens_in_prompt = False
    keeps_special_tokens = True
