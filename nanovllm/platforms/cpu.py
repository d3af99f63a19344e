"""CPU: float32 by default, Inductor's C++ backend, no graph capture (the compiled code is the graph)."""
from nanovllm.platforms.base import Platform


class CpuPlatform(Platform):
    name = "cpu"
