"""Stand-ins of vendor APIs for the NPU and MPS platform tests: each checks its arguments against the vendor's
documentation (cited in each module) and computes the documented result on the CPU with nanovllm's twins.

``install_npu(monkeypatch)`` / ``install_mps(monkeypatch)`` make them visible to one test (``install_npu()``: to a
whole process; ``site/sitecustomize.py`` calls it in the ranks a tensor-parallel test spawns): ``torch_npu`` and
``torchair`` in ``sys.modules`` and ``torch.npu``; or ``torch.mps`` / ``torch.backends.mps`` answers of an Apple
GPU.  The host-memory "npu" device under the NPU stand-in (``host_device.py``) stays registered for the rest of the
process, which is harmless: no tensor of that device exists outside these tests.
"""
import sys

import torch


class _ForTheProcess:
    """``monkeypatch``'s two setters, without the undoing: for a process that is all one test (a spawned rank)."""

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value

    @staticmethod
    def setattr(target, name, value, raising=True):
        setattr(target, name, value)


def install_npu(monkeypatch=None):
    """(torch_npu, torchair) stand-ins, installed for the calling test (``monkeypatch``) or, without one, for the
    rest of the process.  The ``hccl`` backend (``hccl.py``) is registered for the rest of the process either way,
    as ``import torch_npu`` registers it: it serves only groups asked for by name."""
    from . import hccl, host_device, npu_runtime, torchair
    monkeypatch = monkeypatch or _ForTheProcess()
    host_device.install()
    hccl.register()
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
