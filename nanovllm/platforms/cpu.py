"""CPU: float32 by default, Inductor's C++ backend, no graph capture (the compiled code is the graph), and the
ops' pure-PyTorch twins (their defaults), with the sampler inlined into compiled steps (``kernels/cpu.py``).
With ``KernelOptions.cpu_vectorize`` off (``NANOVLLM_CPU_VECTORIZE=0``) Inductor writes scalar C++ loops: the
same arithmetic, generated and compiled faster, run slower."""
import torch

from nanovllm.kernels.cpu import register_cpu_kernels
from nanovllm.platforms.base import Platform


class CpuPlatform(Platform):
    name = "cpu"

    def register_kernels(self):
        register_cpu_kernels()

    def compile(self, fn, dynamic):
        options = None if self.options.cpu_vectorize else {"cpp.simdlen": 0}  # 0: no vector ISA matches
        return torch.compile(fn, backend=self.compile_backend, fullgraph=True, dynamic=dynamic, options=options)
