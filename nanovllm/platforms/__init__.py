"""Everything device-specific: device choice, dtypes, memory queries, compiler backend and graph capture.

Model files never name a device; they run on whatever ``get_platform`` returns.
"""
import torch

from nanovllm.platforms.base import Platform


def get_platform(device: str = "auto") -> Platform:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but torch.cuda.is_available() is False")
        from nanovllm.platforms.cuda import CudaPlatform
        return CudaPlatform(torch.device(device))
    from nanovllm.platforms.cpu import CpuPlatform
    return CpuPlatform(torch.device("cpu"))
