"""Stand-ins of the ``torch_npu`` module and the ``torch.npu`` device module it installs (tests only).

Each function nanovllm calls is here with the signature of Ascend/pytorch (commit 9e73e70, 2026-08-21):
``torch_npu/npu/__init__.py`` (``is_available``, ``device_count``, ``get_device_name``, ``mem_get_info`` returning
``(free, total)`` bytes), ``torch_npu/npu/utils.py`` (``synchronize``, ``set_device``, ``current_device``,
``get_cann_version(module="CANN")``), ``torch_npu/npu/memory.py`` (``empty_cache``, ``reset_peak_memory_stats``,
``max_memory_allocated``, ``memory_reserved``), ``torch_npu/npu/streams.py`` (``Event`` with ``record`` and
``synchronize``; ``Stream`` with ``wait_stream``, ``current_stream`` and ``stream``), and ``torch_npu.__version__``.
``import torch_npu`` on a card renames PrivateUse1 to "npu" and registers ``torch.npu``; ``install`` does the same
with the host-memory device of ``host_device.py``.

The device reports ``DEVICES`` cards of ``TOTAL_BYTES`` each, ``FREE_BYTES`` free; the allocator statistics are
the stand-in's own bookkeeping (``stats``), not measurements.  Work is synchronous, so events and
``synchronize`` only count calls.
"""
import contextlib
import importlib.machinery
import types

import torch

from . import npu_ops

TORCH_NPU_VERSION = "2.13.0.standin"
CANN_VERSION = "8.5.0.standin"
DEVICES = 2
TOTAL_BYTES = 1 << 30
FREE_BYTES = 900 << 20
DEVICE_NAME = "Ascend910B3 (stand-in)"
stats = {"current_device": 0, "synchronize": 0, "events_recorded": 0, "empty_cache": 0, "peak_resets": 0,
         "max_memory_allocated": 64 << 20, "memory_reserved": 96 << 20, "stream_waits": 0}


def _index(device) -> int:
    if device is None:
        return stats["current_device"]
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "npu":
        raise ValueError(f"Expected an npu device, got {device}")
    return stats["current_device"] if device.index is None else device.index


def _check(device) -> int:
    index = _index(device)
    if not 0 <= index < DEVICES:
        raise AssertionError(f"Invalid device id {index}")
    return index


class Event:
    """torch_npu.npu.Event: ``record(stream=None)``, ``synchronize()``."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True
        stats["events_recorded"] += 1

    def synchronize(self):
        if not self.recorded:
            raise RuntimeError("stand-in: synchronize() on an event never recorded")


class Stream:
    """torch_npu.npu.Stream(device=None, priority=0): ``wait_stream(stream)``.  Work is synchronous, so a wait is
    only counted."""

    def __init__(self, device=None, priority=0):
        self.device_index = _check(device)

    def wait_stream(self, stream):
        stats["stream_waits"] += 1


_current = {}  # device index -> the stream ``stream`` made current there (None: its default stream)
_default = {}  # device index -> its default stream


@contextlib.contextmanager
def _stream(stream):
    """torch_npu.npu.stream(stream): ``stream`` is the current one in the body."""
    index = stream.device_index
    saved = _current.get(index)
    _current[index] = stream
    try:
        yield
    finally:
        _current[index] = saved


def _current_stream(device=None):
    """torch_npu.npu.current_stream(device=None)."""
    index = _check(device)
    if _current.get(index) is None:
        _default.setdefault(index, Stream(index))
    return _current.get(index) or _default[index]


def _device_module() -> types.ModuleType:
    m = types.ModuleType("torch.npu")
    m.is_available = lambda: DEVICES > 0
    m.device_count = lambda: DEVICES
    m.current_device = lambda: stats["current_device"]
    m.set_device = lambda device: stats.__setitem__("current_device", _check(device))
    m.get_device_name = lambda device_name=None: (_check(device_name), DEVICE_NAME)[1]
    m.mem_get_info = lambda device=None: (_check(device), (FREE_BYTES, TOTAL_BYTES))[1]
    m.synchronize = lambda device=None: stats.__setitem__("synchronize", stats["synchronize"] + 1 + 0 * _check(device))
    m.empty_cache = lambda: stats.__setitem__("empty_cache", stats["empty_cache"] + 1)
    m.reset_peak_memory_stats = lambda device=None: stats.__setitem__("peak_resets",
                                                                      stats["peak_resets"] + 1 + 0 * _check(device))
    m.max_memory_allocated = lambda device=None: (_check(device), stats["max_memory_allocated"])[1]
    m.memory_reserved = lambda device=None: (_check(device), stats["memory_reserved"])[1]
    m.Event = Event
    m.Stream, m.stream, m.current_stream = Stream, _stream, _current_stream
    m.utils = types.ModuleType("torch_npu.npu.utils")
    m.utils.get_cann_version = lambda module="CANN": CANN_VERSION
    return m


def make_torch_npu() -> tuple[types.ModuleType, types.ModuleType]:
    """(torch_npu, torch.npu) stand-in modules."""
    npu = _device_module()
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)  # so importlib.util.find_spec finds it
    mod.__version__ = TORCH_NPU_VERSION
    mod.npu = npu
    mod.npu_fused_infer_attention_score = npu_ops.npu_fused_infer_attention_score
    mod.npu_scatter_nd_update_ = npu_ops.npu_scatter_nd_update_
    return mod, npu
