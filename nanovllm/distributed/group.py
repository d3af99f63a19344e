"""The tensor-parallel group of this process: its rank and size, set once before a model is built (the model's
layers read them to size their shards) and read by the collectives.

``init_process_group`` joins ``torch.distributed``'s default group (gloo on CPU, nccl on CUDA, hccl on Ascend: the
platform names it) and records the rank and size.  Every process nanovllm starts keeps NVLink multicast off
(``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``): on shared machines a multicast object can take
the host's GPUs out of service.  A group whose rank 0 spawned the others meets through rank 0's store
(``rendezvous.py``), so a rank that dies before joining is seen at once.  A group whose teardown hung is given up
(``abandon_group``): the process then refuses to join another.
"""
import os
from dataclasses import dataclass

import torch.distributed as dist

from nanovllm import envs
from nanovllm.logger import logger

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} outside [0, size={self.size})")


_current = TensorParallel()
_abandoned: str | None = None  # why this process gave its last group up without leaving it


def abandon_group(reason: str) -> None:
    """Give up a group this process could not leave (its teardown hangs): it is a rank of one again, and joining
    another group raises ``RuntimeError`` naming ``reason``."""
    global _abandoned
    logger.warning("%s; giving the group up (its device memory is freed when this process ends)", reason)
    _abandoned = reason
    set_current(TensorParallel())


def current() -> TensorParallel:
    """This process's group (rank 0 of 1 unless ``set_current`` or ``init_process_group`` said otherwise)."""
    return _current


def set_current(tp: TensorParallel) -> TensorParallel:
    """Make ``tp`` this process's group; returns the previous one."""
    global _current
    previous, _current = _current, tp
    return previous


def init_process_group(backend: str, rank: int, size: int, init_method: str | None = None,
                       timeout_s: float = 600.0, store: dist.Store | None = None) -> TensorParallel:
    """Join the default process group of ``size`` ranks as ``rank`` and make it current: through ``store`` when
    given (``rendezvous.py``), else ``init_method`` (None: env://, as torchrun sets it)."""
    import datetime
    if _abandoned is not None:
        raise RuntimeError(f"this process cannot join another tensor-parallel group: {_abandoned}; start a new "
                           f"process for the next tensor-parallel engine")
    for key, value in NO_MULTICAST.items():  # process-wide: NCCL reads them when the group forms
        os.environ[key] = value
        envs.note_process_setting(key, value)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s), store=store)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, size):
        raise RuntimeError(f"a process group of rank {dist.get_rank()} of {dist.get_world_size()} already exists; "
                           f"asked for rank {rank} of {size}")
    tp = TensorParallel(rank, size)
    set_current(tp)
    return tp
