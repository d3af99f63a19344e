"""A stand-in of torch_npu's ``hccl`` process-group backend (tests only): registered as torch_npu registers it,
it checks its tensors as ProcessGroupHCCL does and runs every collective with gloo on host aliases of the "npu"
tensors (``host_device.py``), so the results land in the device tensors themselves.

Sources (Ascend/pytorch, where someone with an Ascend card can check each fact):

* ``torch_npu/__init__.py``: ``import torch_npu`` calls ``torch.distributed.Backend.register_backend("hccl",
  lambda dist_backend_opts, pg_options: ..., extended_api=True, devices=["npu"])``; the creator builds
  ``ProcessGroupHCCL(store, group_rank, group_size, options)`` from the ``_DistributedBackendOptions`` (store, group
  rank and size, timeout, global ranks).  ``register`` does the same with this stand-in.
* ``torch_npu/csrc/distributed/ProcessGroupHCCL.cpp``, ``check_npu_single_tensor``: a tensor that is not an NPU
  tensor, or is sparse, raises "Tensors must be NPU and dense"; a non-contiguous one "Tensors must be contiguous".
* ``torch_npu/csrc/distributed/HCCLUtils.cpp``, ``kScalarTypeToHcclDataType`` / ``getHcclDataType``: the dtypes
  HCCL takes (uint8, int8, int16, int32, int64, float16, float32, float64, bool as uint8, bfloat16, and the two
  float8 types); any other raises "Unsupported data type for HCCL process group".

Limits (the stand-in's, not HCCL's): PyTorch lets Python build a ``ProcessGroup`` but not a c10d ``Backend``, so
the creator here makes a ``ProcessGroup`` subclass (``ProcessGroupHCCL`` below) where torch_npu's makes a backend
of the default group; the ``torch.distributed`` calls nanovllm makes reach it the same way.  C++ functional collectives call
``_allgather_base``, which a Python process group cannot override, so ``register`` also gives
``_c10d_functional::all_gather_into_tensor`` a kernel for "npu" tensors that runs the gather through this group.
Every collective completes before it returns (gloo, synchronously).  ``stats`` counts the collectives run.
"""
import torch
import torch.distributed as dist

from .host_device import to_host

C10D = torch._C._distributed_c10d
HCCL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
               torch.float64, torch.bool, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
stats = {"allreduce": 0, "allgather": 0, "broadcast": 0, "barrier": 0}
_library = []  # the kernel ``register`` adds, kept alive


def check(tensor: torch.Tensor) -> torch.Tensor:
    """ProcessGroupHCCL's checks of one tensor (module doc); returns its host alias."""
    if tensor.device.type != "npu" or tensor.is_sparse:
        raise RuntimeError("Tensors must be NPU and dense")
    if not tensor.is_contiguous():
        raise RuntimeError("Tensors must be contiguous")
    if tensor.dtype not in HCCL_DTYPES:
        raise RuntimeError("Unsupported data type for HCCL process group")
    return to_host(tensor)


class ProcessGroupHCCL(dist.ProcessGroup):
    """The stand-in group: each collective checks its tensors, then gloo runs it on their host aliases."""

    def __init__(self, options, pg_options=None):
        super().__init__(options.group_rank, options.group_size)
        self._name = options.group_id
        self.gloo = dist.ProcessGroupGloo(options.store, options.group_rank, options.group_size, options.timeout)

    @property
    def group_name(self) -> str:
        return self._name

    def _set_group_name(self, name: str) -> None:
        self._name = name

    def _count(self, name: str) -> None:
        stats[name] += 1

    def allreduce(self, tensors, opts=None):
        self._count("allreduce")
        return self.gloo.allreduce([check(t) for t in tensors], opts or C10D.AllreduceOptions())

    def allgather(self, output_lists, inputs, opts=None):
        self._count("allgather")
        return self.gloo.allgather([[check(t) for t in outs] for outs in output_lists], [check(t) for t in inputs],
                                   opts or C10D.AllgatherOptions())

    def broadcast(self, tensors, opts=None):
        self._count("broadcast")
        return self.gloo.broadcast([check(t) for t in tensors], opts or C10D.BroadcastOptions())

    def barrier(self, opts=None):
        self._count("barrier")
        return self.gloo.barrier(opts or C10D.BarrierOptions())


def _all_gather_into_tensor(x: torch.Tensor, group_size: int, group_name: str) -> torch.Tensor:
    group = dist.distributed_c10d._resolve_process_group(group_name)
    out = x.new_empty((group_size * x.shape[0],) + tuple(x.shape[1:]))
    group.allgather([list(out.chunk(group_size))], [x.contiguous()]).wait()
    return out


def register() -> None:
    """What ``import torch_npu`` does for the backend (module doc); idempotent."""
    if hasattr(dist.Backend, "HCCL"):
        return
    dist.Backend.register_backend("hccl", ProcessGroupHCCL, extended_api=True, devices=["npu"])
    lib = torch.library.Library("_c10d_functional", "IMPL")
    lib.impl("all_gather_into_tensor", _all_gather_into_tensor, "PrivateUse1")
    _library.append(lib)
