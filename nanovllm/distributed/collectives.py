"""The collectives of a tensor-parallel step, as registered torch ops (``torch.library.custom_op`` with a fake
implementation): Dynamo traces each as one node, so a compiled step has no graph break, and on CUDA the NCCL call
inside is captured with the rest of the step's CUDA graph.  Both return a new tensor (no input is mutated).

* ``all_reduce(x)``: the sum of ``x`` over the group (after a row-parallel projection).
* ``all_gather_last_dim(x)``: the ranks' ``x`` concatenated along the last dimension, rank order (the logits of a
  vocabulary-parallel LM head).

At a group size of 1 both return ``x`` itself.  While compiling for a device type with a traced implementation
registered (``traced.py``; the NPU platform registers ``functional.py``'s), Dynamo traces that in place of the op.

On CUDA, ``use_symmetric_all_reduce`` sends all-reduces of up to a decode step's size through PyTorch's symmetric-
memory kernels: one-shot below ``TWO_SHOT_FROM_BYTES``, two-shot (reduce-scatter, then all-gather) from there;
asked to, a sum that a residual add and RMSNorm follow takes ``fused_norm.py``'s one launch with them instead.
Prefill's stay on NCCL, as do all of a group where a process made an earlier rendezvous (``one_shot_allowed``).
"""
import torch
import torch.distributed as dist

from nanovllm import traced
from nanovllm.distributed import fused_norm
from nanovllm.distributed.group import current
from nanovllm.logger import logger


_symmetric: dict = {}  # dtype -> (buffer, group name, two-shot from this many elements): use_symmetric_all_reduce

# Where two-shot overtakes one-shot in CUDA graphs on two and four H200s (hidden 5120 bf16; the benchmark that
# measured it is in git history, 2026-11-26): one-shot leads at 16 rows (0.16 MB), two-shot from 64 rows (0.66 MB) on; docs/PERFORMANCE.md.
TWO_SHOT_FROM_BYTES = 512 << 10


_rendezvous_made = False  # this process made a symmetric-memory rendezvous, in this group or an earlier one


def use_symmetric_all_reduce(device: torch.device, dtype: torch.dtype, max_numel: int, two_shot: bool = True,
                              fuse_norm: bool = False) -> bool:
    """Make all-reduces of at most ``max_numel`` elements of ``dtype`` take the symmetric-memory kernels: two-shot
    from ``TWO_SHOT_FROM_BYTES`` on where ``two_shot``, else one-shot (CUDA, every rank of the group must call it:
    the buffer's rendezvous is collective); with ``fuse_norm`` also ``fused_norm``'s buffer.  Returns whether they do:
    not where any rank's process made a rendezvous in an earlier group (agreed), since PyTorch numbers a process's
    rendezvous from its start, so a fresh rank and a rank 0 on its second group would wait on different keys; those
    all-reduces then stay on NCCL."""
    # Each rank copies its part into a buffer its peers map over NVLink, then every rank sums all parts with peer
    # loads.  No multicast object is made (``group.py`` sets ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``).
    global _rendezvous_made
    if not one_shot_allowed(device):
        logger.info("tensor parallelism: a rank made a symmetric-memory rendezvous in an earlier group of its "
                    "process; this group's all-reduces all take NCCL")
        return False
    import torch.distributed._symmetric_memory as symm_mem
    group = dist.group.WORLD.group_name
    buffer = symm_mem.empty(max_numel, dtype=dtype, device=device)
    _rendezvous_made = True
    symm_mem.rendezvous(buffer, group)
    _symmetric[dtype] = (buffer, group, -(-TWO_SHOT_FROM_BYTES // dtype.itemsize) if two_shot else max_numel + 1)
    if fuse_norm:  # a sum that a residual add and RMSNorm follow: one launch with them
        fused_norm.prepare(device, dtype, max_numel, group)
    return True


def one_shot_allowed(device=None) -> bool:
    """Whether no rank of the group made a symmetric-memory rendezvous before (every rank gets the same answer)."""
    return agree_min(0 if _rendezvous_made else 1, device) == 1


def release_symmetric_all_reduce() -> None:
    """Drop the symmetric buffers (leaving the group): later all-reduces take NCCL or gloo until the next
    ``use_symmetric_all_reduce``."""
    _symmetric.clear()
    fused_norm.release()


@torch.library.custom_op("nanovllm::tp_all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    symmetric = _symmetric.get(x.dtype)
    if symmetric is not None and x.numel() <= symmetric[0].numel() and x.is_cuda:
        buffer, group, two_shot_from = symmetric
        staged = buffer[:x.numel()].view(x.shape)
        if x.numel() >= two_shot_from:
            staged.copy_(x)
            return torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", group, torch.empty_like(staged))
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staged, x.contiguous(), "sum", group)
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
    if current().size == 1:
        return x
    return (traced.lookup("tp_all_reduce", x.device) or torch.ops.nanovllm.tp_all_reduce)(x)


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank, concatenated along the last dimension in rank order."""
    size = current().size
    if size == 1:
        return x
    return (traced.lookup("tp_all_gather_last_dim", x.device) or torch.ops.nanovllm.tp_all_gather_last_dim)(x, size)


def _agreement_device() -> torch.device:
    """Where the default group's backend takes tensors: this process's current CUDA or NPU device, else the CPU."""
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "hccl":
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def agree_min(value: int, device=None) -> int:
    """The smallest of the ranks' ``value`` (every rank gets it): e.g. the KV blocks all ranks can hold, or whether
    every rank holds a compile-cache entry.  ``device``: where the backend takes the tensor (default: this
    process's current device of the backend)."""
    if current().size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device if device is not None else _agreement_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def agree_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise largest of the ranks' ``t`` (every rank gets it), outside any graph: e.g. a calibrated
    scale that must be one number for the whole layer."""
    if current().size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
