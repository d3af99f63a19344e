"""Output parsers of ``/v1/chat/completions``, one file per format, chosen by name.

Reasoning parsers (``--reasoning-parser NAME``): ``reasoning_parser(name)`` returns the class registered under
``name`` (``registry.py`` states the contract of ``ReasoningParser``), or raises ``ValueError`` naming it and the
known names: ``qwen3`` (``reasoning_qwen3.py``) and ``deepseek_r1`` (``reasoning_deepseek_r1.py``).  Importing
this package registers them all.
"""
from nanovllm.entrypoints.parsers import reasoning_deepseek_r1, reasoning_qwen3  # noqa: F401 - they register
from nanovllm.entrypoints.parsers.registry import REASONING_PARSERS, ReasoningParser, reasoning_parser

__all__ = ["REASONING_PARSERS", "ReasoningParser", "reasoning_parser"]
