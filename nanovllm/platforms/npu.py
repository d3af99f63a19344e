"""Ascend NPU through torch_npu and torchair, written to the vendors' documentation and run only against the
stand-ins in ``tests/standins/`` (the README's platform table).

* Device: ``npu`` / ``npu:N``.  ``import torch_npu`` registers the device and must come before ``import torchair``.
  Dtypes: the checkpoint's float16 or bfloat16, else bfloat16 (the attention kernel takes no float32; float32 runs
  the twins).  Memory and completion as on CUDA, through ``torch.npu``; staging buffers are pinned.
* Tensor parallelism: backend ``hccl`` (registered by ``import torch_npu``); rank r of a node runs on ``npu:r`` and
  sets it before joining the group.  Graph mode traces the collectives as PyTorch's functional collectives, which
  torchair converts (``distributed/functional.py``).  ``ASCEND_RT_VISIBLE_DEVICES`` limits the NPUs a process sees.
* Kernels: ``kernels/npu.py``.  Compilation: ``torchair.get_npu_backend``, its mode ``KernelOptions.npu_graph_mode``.
  Default ``max-autotune``, the only mode whose attention takes its lengths as a device tensor, so the step stays
  free of host reads; in ``reduce-overhead`` (aclgraph capture) attention is the twin.
* Static shapes (``static_shapes``): each decode bucket is compiled on its own with ``dynamic=False`` and
  ``fullgraph=True`` (``compile/static_graph.py``) through torchair's ``cache_compile``, whose files live in the
  compile-cache entry (keyed by the CANN, torch_npu and torchair versions).  Nested compile regions are inlined.
"""
import importlib.metadata
from pathlib import Path

import torch

from nanovllm.kernels.npu import register_npu_kernels, register_npu_traced
from nanovllm.platforms.base import TorchDevicePlatform

_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def npu_present() -> bool:
    """Whether torch_npu is installed and sees a device (imports it only when it is installed)."""
    import importlib.util
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)
    return torch.npu.is_available() and torch.npu.device_count() > 0


class NpuPlatform(TorchDevicePlatform):
    name = "npu"
    fp8_kv_cache = False  # FIA and the cache scatter are written for the model's dtype (kernels/npu.py)
    static_shapes = True
    distributed_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    def __init__(self, device: torch.device, options=None):
        import torch_npu  # noqa: F401  (before torchair, which the compile step imports: torchair guide)
        if not torch.npu.is_available():
            raise ValueError(f"device={str(device)!r} was asked for but torch.npu.is_available() is False")
        if device.index is None:
            device = torch.device("npu", torch.npu.current_device())
        if device.index >= torch.npu.device_count():
            raise ValueError(f"device={str(device)!r}: only {torch.npu.device_count()} NPUs are visible")
        # Before joining a process group, as torchair's guide to collectives in graph mode does
        # (docs/context/集合通信入图.md).
        torch.npu.set_device(device)
        super().__init__(device, options)

    def register_kernels(self):
        register_npu_kernels()
        register_npu_traced(self.options.npu_graph_mode)
        from nanovllm.distributed.functional import register_traced_collectives  # (here: ``auto`` imports this file)
        register_traced_collectives("npu")

    @classmethod
    def device_api(cls):
        # hccl: torch.distributed.Backend.register_backend("hccl", ..., extended_api=True, devices=["npu"]) in
        # Ascend/pytorch torch_npu/__init__.py.
        import torch_npu  # noqa: F401  (registers torch.npu and the hccl backend)
        return torch.npu

    def auto_dtype(self, checkpoint_dtype):
        return _HALF.get(checkpoint_dtype or "", torch.bfloat16)

    def arch(self):
        return torch.npu.get_device_name(self.device)

    def versions(self):
        import torch_npu
        try:
            torchair_version = importlib.metadata.version("torchair")
        except importlib.metadata.PackageNotFoundError:  # torchair inside a torch_npu wheel
            import torchair
            torchair_version = getattr(torchair, "__version__", None)
        return {"cann": torch_npu.npu.utils.get_cann_version(), "torch_npu": torch_npu.__version__,
                "torchair": torchair_version}

    # max-autotune is torchair's own default and what nano-vllm-ascend ran.  reduce-overhead (aclgraph, what
    # vllm-ascend moved to) refreshes host-side lengths before each replay, and aclgraph's stream budget (2,048 in
    # all, per the torchair guide) bounds how many buckets can be captured.
    def _compiler_config(self):
        import torchair
        config = torchair.CompilerConfig()
        config.mode = self.options.npu_graph_mode
        return config

    def _backend(self):
        import torchair
        return torchair.get_npu_backend(compiler_config=self._compiler_config())

    def compile(self, fn, dynamic):
        if dynamic is not False:
            raise ValueError(f"the npu platform compiles static shapes only (dynamic=False), got dynamic={dynamic}")
        return _InlinedRegions(torch.compile(fn, backend=self._backend(), fullgraph=True, dynamic=False))

    def compile_static(self, owner, name: str, cache_dir: Path | None):
        """``cache_compile`` of the method (its config taken from the backend, as its doc allows), or plain
        ``torch.compile`` when the compile cache is off (``cache_dir`` None)."""
        import torchair
        method = getattr(owner, name)
        if cache_dir is None:
            return self.compile(method, dynamic=False)
        return _InlinedRegions(torchair.inference.cache_compile(method, backend=self._backend(), dynamic=False,
                                                                cache_dir=str(cache_dir)))


class _InlinedRegions:
    """Calls a compiled function with Dynamo inlining ``nested_compile_region`` calls (torch 2.13+), so no
    ``invoke_subgraph`` reaches torchair."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        config = torch._dynamo.config
        if not hasattr(config, "inline_invoke_subgraph"):
            return self.compiled(*args, **kwargs)
        with config.patch(inline_invoke_subgraph=True):
            return self.compiled(*args, **kwargs)
