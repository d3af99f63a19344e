"""Programmatic dependent launch (PDL) for the Triton kernels of a step, on Hopper (sm_90) and newer.

Without PDL, the next kernel on a stream is launched only after the previous one has finished and its writes
have been flushed.  Each decode step runs about 260 kernels, most of them a few microseconds long, so the gap
and ramp-up between kernels add up.  With PDL, a kernel is launched as soon as every program of the previous
kernel has called ``gdc_launch_dependents`` (or exited).  Its programs become resident early and then block in
``gdc_wait`` until the previous kernel has completed and its writes are visible.  What overlaps is the launch
and scheduling latency; every kernel here waits first, so none does work before its wait.

Every kernel launched with ``launch_pdl`` must call ``pdl_begin`` (this module) before it reads or writes
anything another kernel touches, and before any early exit.  Then a kernel cannot complete before the kernel
ahead of it has.  That keeps ordering transitive: a kernel that waits on its predecessor has also waited on
everything before that.  Kernels launched without PDL (cuBLAS, copies) keep the stream's usual full ordering.

Inductor's own kernels follow the same protocol when ``torch._inductor.config.triton.enable_pdl`` is set.
``configure_inductor`` sets it with this switch, unless ``TORCHINDUCTOR_ENABLE_PDL`` is set explicitly.

The switch is ``KernelOptions.pdl`` (``options.py``: ``NANOVLLM_PDL=0`` turns it off, and it is off under
``TRITON_INTERPRET=1``).  PDL is also off on any device but CUDA, before sm_90, and with Hopper features off
(``NANOVLLM_HOPPER_FEATURES=0``, ``triton_common._hopper_or_newer``).
"""
import os

import torch
import triton
import triton.language as tl

from nanovllm.kernels.options import current_options
from nanovllm.kernels.triton_common import _hopper_or_newer


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL."""
    if device.type != "cuda" or not current_options().pdl:
        return False
    return _hopper_or_newer(device)


def pdl_launch(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the kernel's ``PDL`` constexpr, plus Triton's ``launch_pdl`` when on."""
    if pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def configure_inductor(device: torch.device) -> bool:
    """Make Inductor's generated kernels follow PDL too (where this torch supports it); returns whether it does."""
    from torch._inductor import config
    if not hasattr(config.triton, "enable_pdl"):
        return False
    if "TORCHINDUCTOR_ENABLE_PDL" not in os.environ:
        config.triton.enable_pdl = pdl_enabled(device)
    return bool(config.triton.enable_pdl)


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """Wait until the previous kernel has completed and its writes are visible, then let the next kernel launch.

    Call it in every program, before any access to data another kernel touches and before any early return."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
