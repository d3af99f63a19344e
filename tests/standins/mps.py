"""A stand-in of the ``torch.mps`` and ``torch.backends.mps`` answers of an Apple GPU (tests only).

Sources: PyTorch 2.13's ``torch/mps/__init__.py`` (``synchronize``, ``empty_cache``, ``recommended_max_memory``:
"recommended max working set size for GPU memory in bytes", ``driver_allocated_memory``: "total GPU memory
allocated by Metal driver for the process in bytes ... includes cached allocations in MPSAllocator pools"),
``torch/mps/event.py`` (``Event.record()``, ``Event.synchronize()``) and ``torch/backends/mps/__init__.py``
(``is_available``, ``is_built``, ``is_macos_or_newer(major, minor)``).  The memory figures are the stand-in's
(``RECOMMENDED_BYTES``, ``DRIVER_BYTES``).

Limit: a CPU-only PyTorch cannot hold "mps" tensors (its Python bindings take a device guard, and a CPU build has
none for MPS; see ``host_device.py``), so ``patch`` also makes the MPS platform put its tensors on the CPU.  What is
proven is the platform's side (device choice, dtypes, memory sizing from these queries, events, eager by default,
opt-in compilation, the one-device rule) and that its kernels are the twins; not Metal, and not MPSInductor: a
compiled step here is Inductor's CPU code.
"""
import torch

RECOMMENDED_BYTES = 1 << 30
DRIVER_BYTES = 200 << 20
stats = {"synchronize": 0, "empty_cache": 0, "events_recorded": 0}


class Event:
    def __init__(self, enable_timing=False):
        self.recorded = False

    def record(self):
        self.recorded = True
        stats["events_recorded"] += 1

    def synchronize(self):
        if not self.recorded:
            raise RuntimeError("stand-in: synchronize() on an event never recorded")


def patch(monkeypatch, macos: tuple[int, int]) -> None:
    """Answer as an Apple GPU on macOS ``macos`` for the calling test."""
    backends = torch.backends.mps
    monkeypatch.setattr(backends, "is_available", lambda: True)
    monkeypatch.setattr(backends, "is_built", lambda: True)
    monkeypatch.setattr(backends, "is_macos_or_newer", lambda major, minor: tuple(macos) >= (major, minor))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: stats.__setitem__("synchronize", stats["synchronize"] + 1))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: stats.__setitem__("empty_cache", stats["empty_cache"] + 1))
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: RECOMMENDED_BYTES)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: DRIVER_BYTES)
    monkeypatch.setattr(torch.mps, "Event", Event)
    from nanovllm.platforms.mps import MpsPlatform
    init = MpsPlatform.__init__
    monkeypatch.setattr(MpsPlatform, "__init__", lambda self, device, options=None: init(
        self, torch.device("cpu"), options))
