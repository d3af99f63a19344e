"""Apple MPS: written to PyTorch's ``torch.mps`` documentation, run only against the stand-in in ``tests/standins/``:
see the README's platform table.

* Device ``mps``.  Dtype: float16 by default; bfloat16 when asked for and the OS has it (macOS 14+,
  ``torch.backends.mps.is_macos_or_newer(14, 0)``), else a ``ValueError``; float32 when asked for.
* Memory: the KV cache gets ``recommended_max_memory() * gpu_memory_utilization - driver_allocated_memory()``
  after a probe step (the driver's figure includes the allocator's cached blocks, so the probe's peak is
  counted).  Where that leaves too little, ``num_kvcache_blocks`` fixes the size.
* Kernels: the ops' pure-PyTorch twins (their defaults on every device), host-sync free; attention calls SDPA in
  float32 with an explicit mask and ``enable_gqa``.
* No graph capture (PyTorch has no MPS graph API).  Eager by default, since MPSInductor has reported silent wrong
  results; ``NANOVLLM_MPS_COMPILE=1`` (``KernelOptions.mps_compile``) compiles the step with it, with a warning.
* One device: tensor parallelism is an error.
"""
import platform as host_platform

import torch

from nanovllm.logger import logger
from nanovllm.platforms.base import Platform


# The MPS port of nano-vllm found scaled_dot_product_attention failing in decode with grouped KV heads and wrote
# attention by hand; the twin's float32 SDPA with an explicit mask and enable_gqa has not run on a Mac.
class MpsPlatform(Platform):
    name = "mps"
    measures_memory = True
    queues_work = True
    fp8_kv_cache = False  # MPS has no float8 tensors

    def __init__(self, device: torch.device, options=None):
        super().__init__(device, options)
        if self.options.mps_compile:
            logger.warning("NANOVLLM_MPS_COMPILE=1: compiling the step with MPSInductor, which has reported silent "
                           "wrong results (pytorch#150629, #170360, #191976); compare its output with eager mode")

    # MPSInductor's reported silent wrong results: RMSNorm returning zeros (pytorch#150629), a broadcast sum off by
    # 2x (#170360), LayerNorm off by up to 1.8 (#191976).
    @property
    def compiles_by_default(self) -> bool:
        return self.options.mps_compile

    def _has_bf16(self) -> bool:
        return torch.backends.mps.is_macos_or_newer(14, 0)

    def resolve_dtype(self, requested, checkpoint_dtype):
        if requested == "bfloat16" and not self._has_bf16():
            raise ValueError("dtype='bfloat16' needs macOS 14 or newer on mps; use 'float16' or 'float32'")
        return super().resolve_dtype(requested, checkpoint_dtype)

    def auto_dtype(self, checkpoint_dtype):
        return torch.float16

    def check_tensor_parallel(self, size):
        if size != 1:
            raise ValueError(f"tensor_parallel_size={size}: the mps platform has one device; use 1")

    def synchronize(self):
        torch.mps.synchronize()

    def record_event(self):
        event = torch.mps.Event()
        event.record()
        return event

    def reset_peak_memory(self):
        torch.mps.empty_cache()

    def available_kv_bytes(self, utilization):
        return int(torch.mps.recommended_max_memory() * utilization - torch.mps.driver_allocated_memory())

    def arch(self):
        return f"Apple {host_platform.machine()} macOS {host_platform.mac_ver()[0] or 'unknown'}"
