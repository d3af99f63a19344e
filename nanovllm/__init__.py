"""nanovllm: a compiler-centric, graph-mode LLM inference engine with a vLLM-style offline API."""
from nanovllm.llm import LLM
from nanovllm.lora.request import LoRARequest
from nanovllm.pooling_params import PoolingParams
from nanovllm.sampling_params import SamplingParams
from nanovllm.version import __version__

__all__ = ["LLM", "LoRARequest", "PoolingParams", "SamplingParams", "__version__"]
