"""The collectives of a tensor-parallel step, as registered torch ops (``torch.library.custom_op`` with a fake
implementation): Dynamo traces each as one node, so a compiled step has no graph break, and on CUDA the NCCL call
inside is captured with the rest of the step's CUDA graph.  Both return a new tensor (no input is mutated).

* ``all_reduce(x)``: the sum of ``x`` over the group (after a row-parallel projection).
* ``all_gather_last_dim(x)``: the ranks' ``x`` concatenated along the last dimension, rank order (the logits of a
  vocabulary-parallel LM head).

At a group size of 1 both return ``x`` itself and no op enters the graph.
"""
import torch
import torch.distributed as dist

from nanovllm.distributed.group import current


@torch.library.custom_op("nanovllm::tp_all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    dist.all_reduce(y)
    return y


@_all_reduce.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("nanovllm::tp_all_gather_last_dim", mutates_args=())
def _all_gather_last_dim(x: torch.Tensor, size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


@_all_gather_last_dim.register_fake
def _(x, size):
    return x.new_empty(*x.shape[:-1], x.shape[-1] * size)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the tensor-parallel group."""
    return x if current().size == 1 else torch.ops.nanovllm.tp_all_reduce(x)


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank, concatenated along the last dimension in rank order."""
    size = current().size
    return x if size == 1 else torch.ops.nanovllm.tp_all_gather_last_dim(x, size)


def agree_min(value: int, device) -> int:
    """The smallest of the ranks' ``value`` (every rank gets it): e.g. the KV blocks all ranks can hold."""
    if current().size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
