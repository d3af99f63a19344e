"""Programmatic dependent launch (PDL) for the Triton kernels of a step, on Hopper (sm_90) and newer.

With PDL a kernel is launched as soon as every program of the previous one has called ``gdc_launch_dependents``
(or exited); its programs become resident early and block in ``gdc_wait`` until the previous kernel has completed
and its writes are visible.  What overlaps is launch and scheduling latency: every kernel here waits first.

Every kernel launched with ``launch_pdl`` must call ``pdl_begin`` before it reads or writes anything another kernel
touches, and before any early exit.  Then no kernel completes before the one ahead of it, so ordering stays
transitive.  Kernels launched without PDL (cuBLAS, copies) keep the stream's usual full ordering.

``configure_inductor`` makes Inductor's own kernels follow the protocol (``torch._inductor.config.triton.enable_pdl``,
a process-wide setting, recorded for the start-up line), unless ``TORCHINDUCTOR_ENABLE_PDL`` is set.  The switch is
``KernelOptions.pdl`` (``NANOVLLM_PDL``; off under ``TRITON_INTERPRET=1``).  PDL is also off on any device but CUDA,
before sm_90, and with Hopper features off (``NANOVLLM_HOPPER_FEATURES=0``, ``triton_common._hopper_or_newer``).
"""
import torch
import triton
import triton.language as tl

from nanovllm import envs
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
    wanted = pdl_enabled(device)
    if not envs.is_set("TORCHINDUCTOR_ENABLE_PDL") and config.triton.enable_pdl != wanted:
        config.triton.enable_pdl = wanted
        envs.note_process_setting("torch._inductor.config.triton.enable_pdl", wanted)
    return bool(config.triton.enable_pdl)


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """Wait until the previous kernel has completed and its writes are visible, then let the next kernel launch.

    Call it in every program, before any access to data another kernel touches and before any early return."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
