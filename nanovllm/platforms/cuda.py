"""CUDA: the checkpoint's dtype, memory measured after a warm-up, pinned host staging, Inductor + CUDA graphs
sharing one pool, NCCL (decode-sized all-reduces through the symmetric-memory kernels unless
``KernelOptions.all_reduce`` is ``nccl``: ``prepare_tensor_parallel``), and the Triton kernels registered for the ops
(``nanovllm/kernels/cuda.py``).

Below Hopper: TMA loads and programmatic dependent launch need sm_90; ``KernelOptions.hopper_features``
(``NANOVLLM_HOPPER_FEATURES=0``) turns both off on any GPU, so the path older GPUs take can be run on an H100.
Compute capability below 8.0 (Volta, Turing) has no bfloat16: ``auto`` gives float16 there, and asking for
bfloat16 is an error.  Triton's README lists compute capability 8.0+ as supported hardware, so below that the
Triton kernels (and Inductor's) are outside what Triton promises; a warning at start-up names the fallbacks.
"""
from contextlib import contextmanager

import torch

import nanovllm.distributed as distributed
from nanovllm.kernels.cuda import register_cuda_kernels
from nanovllm.kernels.pdl import configure_inductor
from nanovllm.logger import logger
from nanovllm.platforms.base import _DTYPES, TorchDevicePlatform


class CudaPlatform(TorchDevicePlatform):
    name = "cuda"
    supports_graph_capture = True
    distributed_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"

    def __init__(self, device: torch.device, options=None):
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        super().__init__(device, options)
        configure_inductor(device)  # Inductor's kernels take part in programmatic dependent launch (Hopper+)
        if not self._has_bf16():
            logger.warning("%s: Triton's README supports compute capability 8.0+; if its kernels fail here, "
                           "NANOVLLM_KERNELS=reference runs the ops' PyTorch twins and enforce_eager=True skips "
                           "Inductor's Triton code", self.arch())

    def register_kernels(self):
        register_cuda_kernels()

    def prepare_tensor_parallel(self, dtype, max_elements):
        if distributed.current().size > 1 and self.options.all_reduce != "nccl":
            distributed.use_symmetric_all_reduce(self.device, dtype, max_elements,
                                                 two_shot=self.options.all_reduce in ("auto", "unfused"),
                                                 fuse_norm=self.options.all_reduce == "auto")

    def _has_bf16(self) -> bool:
        return torch.cuda.get_device_capability(self.device)[0] >= 8

    def resolve_dtype(self, requested, checkpoint_dtype):
        if requested == "bfloat16" and not self._has_bf16():
            raise ValueError(f"dtype='bfloat16' needs compute capability 8.0+, but {self.arch()} has none; "
                             f"use 'float16' or 'float32'")
        return super().resolve_dtype(requested, checkpoint_dtype)

    def auto_dtype(self, checkpoint_dtype):
        dtype = _DTYPES.get(checkpoint_dtype or "", torch.bfloat16)
        return torch.float16 if dtype == torch.bfloat16 and not self._has_bf16() else dtype

    def kv_cache_dtype(self, requested, model_dtype):
        if requested != "auto" and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise ValueError(f"kv_cache_dtype={requested!r} needs compute capability 8.9+ (Ada, Hopper), but "
                             f"{self.arch()} has less; use 'auto'")
        return super().kv_cache_dtype(requested, model_dtype)

    def versions(self):
        return {"cuda": torch.version.cuda}

    def arch(self):
        major, minor = torch.cuda.get_device_capability(self.device)
        return f"{torch.cuda.get_device_name(self.device)} sm_{major}{minor}"

    def graph_pool(self):
        return torch.cuda.graph_pool_handle()

    @contextmanager
    def capture(self, pool):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            yield graph
