"""The interface every platform implements; the defaults suit a CPU-like device with no graph capture.

A platform owns everything about its device: dtypes, memory queries, host staging, completion events, the
compiler backend, graph capture, and which kernel implements each op.  Making one reads the kernel options from
the environment (``KernelOptions.from_env``), installs them for the process (``set_options``) and registers its
kernels with ``torch.library`` (``register_kernels``); every op's pure-PyTorch twin is the default on any device.
"""
import contextlib
import hashlib
import platform as host_platform
from contextlib import contextmanager
from pathlib import Path

import torch

from nanovllm.kernels import kv_quant
from nanovllm.kernels import ops  # noqa: F401  (defines the ops, with their twins as the default on every device)
from nanovllm.kernels.options import KernelOptions, set_options

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _DoneEvent:
    """A completion handle for a device whose work is done by the time it is queued (the host runs it)."""

    def synchronize(self) -> None:
        pass


class Platform:
    name = "base"
    supports_graph_capture = False
    measures_memory = False  # available_kv_bytes answers (after a probe step); else the KV cache gets a fixed size
    static_shapes = False  # the compiler needs one static graph per step shape (no symbolic sizes)
    compiles_by_default = True  # graph mode unless enforce_eager; False: eager unless the platform's option says
    distributed_backend = "gloo"  # torch.distributed backend for tensor parallelism on this device
    visible_devices_env: str | None = None  # the variable that limits which devices a process sees, if any
    compile_backend = "inductor"
    pin_memory = False  # whether host staging buffers for device copies should be page-locked
    fp8_kv_cache = True  # whether K and V may be stored as float8 e4m3 (kv_cache_dtype="fp8") here
    queues_work = False  # the device runs queued work while the host goes on (the engine's pipeline adapts its depth)

    def __init__(self, device: torch.device, options: KernelOptions | None = None):
        self.device = device
        self.options = KernelOptions.from_env() if options is None else options
        set_options(self.options)
        self.register_kernels()

    def register_kernels(self) -> None:
        """Register this platform's implementations of the ops (``torch.library.register_kernel``)."""

    # Tensor parallelism: what a rank asks of its platform's class before its engine (and platform) exists.
    @classmethod
    def rank_device(cls, device: str, index: int) -> str:
        """The device of the rank on this node's device ``index`` (its local rank), for the engine option
        ``device``: the option itself for a host device, which every rank shares."""
        return device

    @classmethod
    def bind_rank(cls, device: str) -> None:
        """Make ``device`` this process's current device, before it joins the group (NCCL and HCCL bind a rank to
        the current device)."""

    @classmethod
    def visible_device_count(cls) -> int | None:
        """How many devices ranks can take on this node, or None where ranks share one (a host device)."""
        return None

    def resolve_dtype(self, requested: str, checkpoint_dtype: str | None) -> torch.dtype:
        if requested != "auto":
            return _DTYPES[requested]
        return self.auto_dtype(checkpoint_dtype)

    def auto_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        return torch.float32

    def kv_cache_dtype(self, requested: str, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type for the engine option ``kv_cache_dtype`` (``auto``: the model's)."""
        if requested == "auto":
            return model_dtype
        if not self.fp8_kv_cache:
            raise ValueError(f"kv_cache_dtype={requested!r} is not supported on {self.name}; use 'auto'")
        return kv_quant.FP8_DTYPE

    def synchronize(self) -> None:
        pass

    def versions(self) -> dict:
        """Versions of the device software stack that change compiled artifacts (the compile cache keys on them)."""
        return {}

    def check_tensor_parallel(self, size: int) -> None:
        """Raise ``ValueError`` if this platform cannot run ``size`` tensor-parallel ranks."""

    def prepare_tensor_parallel(self, dtype: torch.dtype, max_elements: int) -> None:
        """Set up this rank's collectives for all-reduces of up to ``max_elements`` elements of ``dtype`` (a decode
        step's), once the group exists; every rank calls it, after its model is built."""

    def release_memory(self) -> None:
        """Return cached device memory that no tensor uses to the device (after an engine is closed)."""

    def record_event(self):
        """A handle whose ``synchronize()`` waits for all device work queued so far."""
        return _DoneEvent()

    def available_kv_bytes(self, utilization: float) -> int | None:
        """Bytes the KV cache may take, or None when the platform cannot measure memory."""
        return None

    def reset_peak_memory(self) -> None:
        pass

    def arch(self) -> str:
        """The processor, as far as it changes generated code: machine, model name and a hash of the CPU flags
        (Inductor's C++ backend picks its vector instructions from them)."""
        info = {}
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                name, _, value = line.partition(":")
                info.setdefault(name.strip(), value.strip())
        flags = hashlib.sha256(info.get("flags", "").encode()).hexdigest()[:12]
        return f"{host_platform.machine()} {info.get('model name', host_platform.processor())} flags={flags}"

    def describe(self) -> dict:
        """What runs where, for logs and benchmark records."""
        return {"name": self.name, "device": str(self.device), "arch": self.arch(),
                "options": self.options.as_dict(), "versions": self.versions()}

    def compile(self, fn, dynamic: bool | None):
        """Lower ``fn`` with this platform's compiler (``dynamic=None``: only dims marked dynamic are symbolic)."""
        return torch.compile(fn, backend=self.compile_backend, fullgraph=True, dynamic=dynamic)

    def compile_static(self, owner, name: str, cache_dir: Path | None):
        """A callable running ``owner.<name>(inputs)`` compiled for one static input shape (``static_shapes``
        platforms only); ``cache_dir`` is where the compiler may keep its own artifacts (None: cache off)."""
        raise NotImplementedError(f"the {self.name} platform compiles with symbolic shapes")

    def graph_pool(self):
        return None

    @contextmanager
    def capture(self, pool):
        """Record the device work of the body for replay; a no-op where there is no graph capture."""
        yield None

    def beside(self):
        """A context in which copies are queued beside the work already queued (on a stream of their own, where
        the device has streams), and work queued after it waits for them.  The body must not touch memory that
        the work queued before it still uses."""
        return contextlib.nullcontext()


class TorchDevicePlatform(Platform):
    """A device whose ``torch.<name>`` module has CUDA's API (``torch.cuda``; ``torch.npu`` from torch_npu):
    synchronisation, completion events and memory measured after a probe step are written once, here."""
    measures_memory = True
    pin_memory = True
    queues_work = True

    def __init__(self, device: torch.device, options: KernelOptions | None = None):
        self._api = self.device_api()  # read once: ``record_event`` runs every step
        self._side = None  # the stream of ``beside``, made when first asked for
        super().__init__(device, options)

    @classmethod
    def device_api(cls):
        """``torch.<name>``, the device's runtime module."""
        return getattr(torch, cls.name)

    @classmethod
    def rank_device(cls, device, index):
        return f"{cls.name}:{index}"

    @classmethod
    def bind_rank(cls, device):
        cls.device_api().set_device(torch.device(device))

    @classmethod
    def visible_device_count(cls):
        return cls.device_api().device_count()

    def synchronize(self):
        self._api.synchronize(self.device)

    def record_event(self):
        event = self._api.Event()
        event.record()  # on the current stream: completes when everything queued before it has
        return event

    @contextmanager
    def beside(self):
        if self._side is None:
            self._side = self._api.Stream(self.device)
        current = self._api.current_stream(self.device)
        with self._api.stream(self._side):
            yield
        current.wait_stream(self._side)

    def release_memory(self):
        self._api.empty_cache()

    def reset_peak_memory(self):
        self._api.empty_cache()
        self._api.reset_peak_memory_stats(self.device)

    def available_kv_bytes(self, utilization):
        free, total = self._api.mem_get_info(self.device)
        used_by_others = total - free - self._api.memory_reserved(self.device)
        peak = self._api.max_memory_allocated(self.device)
        return int(total * utilization - used_by_others - peak)
