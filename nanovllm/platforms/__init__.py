"""Everything device-specific: device choice, dtypes, memory queries, host staging and completion events,
compiler backend, graph capture, and the kernels registered for the ops.

Model files never name a device; they run on whatever ``get_platform`` returns.  Making a platform installs its
kernel options for the process and registers its kernels (``base.Platform``).

``auto`` picks, in order: CUDA when ``torch.cuda.is_available()``; the NPU when torch_npu is installed and sees a
device; MPS on Apple silicon (``torch.backends.mps.is_available()``); else the CPU.
"""
import torch

from nanovllm.kernels.options import KernelOptions
from nanovllm.platforms.base import Platform

DEVICE_KINDS = ("cpu", "cuda", "npu", "mps")


def resolve_device(device: str) -> str:
    """The device ``auto`` stands for on this machine; any other value unchanged."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    from nanovllm.platforms.npu import npu_present
    if npu_present():
        return "npu"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def platform_class(device: str) -> type[Platform]:
    """The platform class of ``device`` ("auto" resolved), without making one: what a tensor-parallel rank asks
    before its engine exists (its distributed backend, its device, binding it)."""
    kind = resolve_device(device).split(":")[0]
    if kind == "cuda":
        from nanovllm.platforms.cuda import CudaPlatform
        return CudaPlatform
    if kind == "npu":
        from nanovllm.platforms.npu import NpuPlatform
        return NpuPlatform
    if kind == "mps":
        from nanovllm.platforms.mps import MpsPlatform
        return MpsPlatform
    if kind != "cpu":
        raise ValueError(f"device={device!r} is not one of 'auto', {', '.join(map(repr, DEVICE_KINDS))} "
                         f"(or 'cuda:N', 'npu:N')")
    from nanovllm.platforms.cpu import CpuPlatform
    return CpuPlatform


def get_platform(device: str = "auto", options: KernelOptions | None = None) -> Platform:
    """The platform of ``device`` ("auto", "cpu", "cuda", "cuda:N", "npu", "npu:N" or "mps"); ``options`` default
    to the environment's."""
    device = resolve_device(device)
    cls = platform_class(device)
    kind = cls.name
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but torch.cuda.is_available() is False")
    if kind == "npu":
        from nanovllm.platforms.npu import npu_present
        if not npu_present():
            raise ValueError(f"device={device!r} was asked for but torch_npu is not installed or sees no NPU")
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={device!r} was asked for but torch.backends.mps.is_available() is False")
        device = "mps"
    return cls(torch.device(device), options)
