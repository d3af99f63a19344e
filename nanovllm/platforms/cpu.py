"""CPU: float32 by default, Inductor's C++ backend, no graph capture (the compiled code is the graph), and the
ops' pure-PyTorch twins (their defaults), with the sampler inlined into compiled steps (``kernels/cpu.py``)."""
from nanovllm.kernels.cpu import register_cpu_kernels
from nanovllm.platforms.base import Platform


class CpuPlatform(Platform):
    name = "cpu"

    def register_kernels(self):
        register_cpu_kernels()
