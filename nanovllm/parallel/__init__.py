"""Tensor parallelism's control plane, above the engine: starting the ranks (``launch.py``), the channel engine
calls travel on and rank 0's handle on the other ranks (``control.py``), and the engine mirrored across them
(``mirror.py``).  The process group itself and the collectives a model step calls are ``nanovllm.distributed``'s."""
from nanovllm.parallel.launch import launched_by_torchrun, rank_options, start
from nanovllm.parallel.mirror import MirroredEngine

__all__ = ["MirroredEngine", "launched_by_torchrun", "rank_options", "start"]
