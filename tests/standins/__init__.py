"""Stand-ins of vendor APIs for the NPU and MPS platform tests: each checks its arguments against the vendor's
documentation (cited in each module) and computes the documented result on the CPU with nanovllm's twins.

``install_npu(monkeypatch)`` / ``install_mps(monkeypatch)`` make them visible to one test: ``torch_npu`` and
``torchair`` in ``sys.modules`` and ``torch.npu``; or ``torch.mps`` / ``torch.backends.mps`` answers of an Apple
GPU.  The host-memory "npu" device under the NPU stand-in (``host_device.py``) stays registered for the rest of the
process, which is harmless: no tensor of that device exists outside these tests.
"""
import sys

import torch


def install_npu(monkeypatch):
    """(torch_npu, torchair) stand-ins, installed for the calling test."""
    from . import host_device, npu_runtime, torchair
    host_device.install()
    torch_npu, npu = npu_runtime.make_torch_npu()
    air = torchair.make_torchair()
    monkeypatch.setitem(sys.modules, "torch_npu", torch_npu)
    monkeypatch.setitem(sys.modules, "torchair", air)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    # The stand-in device has no pinned host memory (host_device.py); on a card the platform pins its staging.
    from nanovllm.platforms.npu import NpuPlatform
    monkeypatch.setattr(NpuPlatform, "pin_memory", False)
    return torch_npu, air


def install_mps(monkeypatch, *, macos=(15, 0)):
    """The torch.mps stand-in, installed for the calling test, as on macOS ``macos``; the MPS platform's tensors
    stay on the CPU (``mps.py`` says why)."""
    from . import mps
    mps.patch(monkeypatch, macos)
    return mps
