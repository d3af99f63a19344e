"""Tensor parallelism's process side: the group this process belongs to (``group.py``) and the collectives a
model step calls, as registered ops that trace into a compiled step with no graph break (``collectives.py``); the
start-up rendezvous of ranks that rank 0 spawned, which sees a rank die before it joins (``rendezvous.py``)."""
from nanovllm.distributed.group import TensorParallel, abandon_group, current, init_process_group, set_current
from nanovllm.distributed.collectives import (agree_max, agree_min, all_gather_last_dim, all_reduce,
                                              release_symmetric_all_reduce, use_symmetric_all_reduce)

__all__ = ["TensorParallel", "abandon_group", "current", "init_process_group", "set_current", "agree_max", "agree_min",
           "all_gather_last_dim", "all_reduce", "release_symmetric_all_reduce", "use_symmetric_all_reduce"]
