"""nanovllm: a compiler-centric, graph-mode LLM inference engine with a vLLM-style offline API."""
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]
