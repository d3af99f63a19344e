"""nanovllm: a compiler-centric, graph-mode LLM inference engine with a vLLM-style offline API."""
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams
from nanovllm.version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]
