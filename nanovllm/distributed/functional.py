"""The collectives' traced implementations through PyTorch's functional collectives
(``torch.distributed._functional_collectives``), for graph compilers that convert those and not nanovllm's opaque
ops: registered per device type by a platform (``register_traced_collectives``; the NPU platform for torchair).

Dynamo traces ``funcol.all_reduce`` and ``funcol.all_gather_single`` into ``_c10d_functional.all_reduce`` /
``all_gather_into_tensor`` nodes, each followed by ``_c10d_functional.wait_tensor``, with the default group's name
as an argument; gathering along the last dimension adds aten chunk and cat nodes.  torchair converts exactly those
three ops to HCCL graph ops (``HcomAllReduce``, ``HcomAllGather``, ``Identity`` for the wait): Ascend/torchair
``python/torchair/_ge_concrete_graph/ge_converter/c10d_functional/c10d_functional.py``, the block registered for
torch >= 2.3.1.  torchair's guide to collectives in graph mode (``docs/context/集合通信入图.md``, commit 0f43344)
says its NPU backend has Ascend converters for the collectives from PyTorch 2.6 on and that a script's collectives
must also run in eager mode.  Eager calls keep the ops of ``collectives.py`` (``torch.distributed.all_reduce`` /
``all_gather`` on the default group), which run on HCCL through the process group.
"""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from nanovllm import traced
from nanovllm.distributed import fused_norm


def all_reduce_functional(x: torch.Tensor) -> torch.Tensor:
    """``nanovllm::tp_all_reduce``: the sum of ``x`` over the default group."""
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def all_gather_last_dim_functional(x: torch.Tensor, size: int) -> torch.Tensor:
    """``nanovllm::tp_all_gather_last_dim``: the ranks' ``x`` concatenated along the last dimension, rank order."""
    return funcol.all_gather_single(x.contiguous(), x.dim() - 1, dist.group.WORLD)


def all_reduce_add_rms_norm_functional(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                       zero_centered: bool = False):
    """``nanovllm::tp_all_reduce_add_rms_norm``: the functional sum, then the op's own add and RMSNorm."""
    return fused_norm.add_rms_norm(residual, all_reduce_functional(y), weight, eps, zero_centered)


TRACED = {"tp_all_reduce": all_reduce_functional, "tp_all_gather_last_dim": all_gather_last_dim_functional,
          "tp_all_reduce_add_rms_norm": all_reduce_add_rms_norm_functional}


def register_traced_collectives(device_type: str) -> None:
    """Make Dynamo trace the functional collectives for the collectives' ops on ``device_type`` tensors."""
    for name, fn in TRACED.items():
        traced.register(name, device_type, fn)
