"""Everything device-specific: device choice, dtypes, memory queries, host staging and completion events,
compiler backend, graph capture, and the kernels registered for the ops.

Model files never name a device; they run on whatever ``get_platform`` returns.  Making a platform installs its
kernel options for the process and registers its kernels (``base.Platform``).
"""
import torch

from nanovllm.kernels.options import KernelOptions
from nanovllm.platforms.base import Platform


def get_platform(device: str = "auto", options: KernelOptions | None = None) -> Platform:
    """The platform of ``device`` ("auto", "cpu", "cuda" or "cuda:N"); ``options`` default to the environment's."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but torch.cuda.is_available() is False")
        from nanovllm.platforms.cuda import CudaPlatform
        return CudaPlatform(torch.device(device), options)
    from nanovllm.platforms.cpu import CpuPlatform
    return CpuPlatform(torch.device("cpu"), options)
