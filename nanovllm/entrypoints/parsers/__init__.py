"""Output parsers of ``/v1/chat/completions``, one file per format, chosen by name.

Reasoning parsers (``--reasoning-parser NAME``): ``reasoning_parser(name)`` returns the class registered under
``name`` (``registry.py`` states the contract of ``ReasoningParser``), or raises ``ValueError`` naming it and the
known names: ``qwen3``, ``deepseek_r1`` and ``gpt_oss`` (``reasoning_NAME.py``).
Tool-call parsers (``--tool-call-parser NAME``, default ``hermes``): ``tool_parser(name)`` likewise
(``tool_base.py`` states the contract of ``ToolParser``): ``hermes``, ``qwen3_coder``, ``llama3_json`` and
``mistral`` (``tool_NAME.py``).  Importing this package registers them all.
"""
from nanovllm.entrypoints.parsers import reasoning_deepseek_r1, reasoning_gpt_oss, reasoning_qwen3  # noqa: F401
from nanovllm.entrypoints.parsers import tool_hermes, tool_llama3_json, tool_mistral, tool_qwen3_coder  # noqa: F401
from nanovllm.entrypoints.parsers.registry import REASONING_PARSERS, ReasoningParser, reasoning_parser
from nanovllm.entrypoints.parsers.tool_base import TOOL_PARSERS, ToolParser, tool_parser

DEFAULT_TOOL_PARSER = "hermes"

__all__ = ["DEFAULT_TOOL_PARSER", "REASONING_PARSERS", "ReasoningParser", "TOOL_PARSERS", "ToolParser",
           "reasoning_parser", "tool_parser"]
