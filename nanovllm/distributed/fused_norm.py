"""The all-reduce of a row-parallel projection fused with the residual add and RMSNorm after it, on CUDA.

``all_reduce_add_rms_norm(y, residual, weight, eps, zero_centered)`` (the op ``nanovllm::tp_all_reduce_add_rms_norm``)
returns ``(x, h)``: ``x = residual + (sum of y over the ranks)``, the sum rounded to y's dtype as an all-reduce
returns it, then the add rounded; ``h`` is RMSNorm of x by ``kernels/norm_rope.rms_norm``'s rule (statistics in
float32, the normed value rounded to x's dtype before ``weight`` scales it), or, ``zero_centered``, by
``ZeroCenteredRMSNorm``'s (``norm(x) * (1 + weight)`` in float32, rounded once).  One Triton launch does it: each
program copies its rows of y into this rank's symmetric buffer, meets the same program of every peer through flags
in that buffer, sums the ranks' rows in rank order (so every rank gets the same bits), adds, normalizes and writes
both outputs.  The data area has two halves, alternated by a device counter; a rank writes a half again only after
every peer has met it in the call between.  ``prepare`` makes the buffer (collective, beside
``collectives.use_symmetric_all_reduce``); ``usable`` says whether the models call the op (16-bit rows of at most
``MAX_HIDDEN`` columns); a call past the decode-sized numel prepared (prefill) sums with ``collectives``' all-reduce,
then adds and norms in one Triton launch of the same arithmetic; a process with no buffer norms in torch instead.
"""
import torch

from nanovllm import traced

MAX_HIDDEN = 8192  # one program holds a whole row (8,192 wide: the widest block run on a GPU)
_FLAG_BYTES = 1 << 16  # room for the flags of every program (at most the SMs) and every rank
_state: dict = {}  # dtype -> _Buffers


class _Buffers:
    def __init__(self, device: torch.device, dtype: torch.dtype, max_numel: int, group: str):
        import torch.distributed._symmetric_memory as symm_mem
        self.max_numel = max_numel
        data_bytes = 2 * max_numel * dtype.itemsize
        self.raw = symm_mem.empty(_FLAG_BYTES + data_bytes, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(self.raw, group)
        self.rank, world = handle.rank, handle.world_size
        offset = self.raw.data_ptr() - handle.buffer_ptrs[self.rank]  # this tensor inside its allocation
        whole = [handle.get_buffer(r, (self.raw.numel(),), torch.uint8, offset) for r in range(world)]
        self.flags = tuple(b[:_FLAG_BYTES].view(torch.int32) for b in whole)
        self.datas = tuple(b[_FLAG_BYTES:_FLAG_BYTES + data_bytes].view(dtype) for b in whole)
        self.counters = torch.zeros(2, dtype=torch.int32, device=device)  # calls made, programs done in this one
        self.programs = min(torch.cuda.get_device_properties(device).multi_processor_count,
                            _FLAG_BYTES // (4 * world))
        self.raw.zero_()
        torch.cuda.synchronize(device)
        handle.barrier()  # no peer signals before every rank's flags are zero


def prepare(device: torch.device, dtype: torch.dtype, max_numel: int, group: str) -> None:
    """Make this rank's symmetric buffer for fused calls of up to ``max_numel`` elements of ``dtype`` (every rank
    of ``group`` must call it)."""
    if dtype in (torch.bfloat16, torch.float16):
        _state[dtype] = _Buffers(device, dtype, max_numel, group)


def release() -> None:
    _state.clear()


@torch._dynamo.assume_constant_result  # read while tracing, no guard: a cached step loaded where no buffer is made
def _prepared(dtype: torch.dtype) -> bool:  # (another process's group) runs the op's torch path
    return dtype in _state


def usable(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether calls like this one take the fused kernel in this process, from what a traced step knows without
    its row count (so no guard on it): a prepared buffer of y's dtype, y [rows, H] on CUDA with H at most
    ``MAX_HIDDEN``, residual of y's shape, residual and weight of y's dtype, unit column strides.  A call past the
    buffer's numel (a prefill step) then takes the op's torch path."""
    return (_prepared(y.dtype) and y.is_cuda and y.dim() == 2 and y.shape[1] <= MAX_HIDDEN
            and residual.shape == y.shape and residual.dtype == weight.dtype == y.dtype
            and weight.shape == (y.shape[1],)
            and y.stride(1) == 1 and residual.stride(1) == 1)


@torch.library.custom_op("nanovllm::tp_all_reduce_add_rms_norm", mutates_args=())
def _all_reduce_add_rms_norm(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             zero_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = usable(y, residual, weight)
    if kernels and 0 < y.numel() <= _state[y.dtype].max_numel:
        from nanovllm.distributed.triton_fused_norm import fused  # triton: present wherever CUDA is
        b = _state[y.dtype]
        return fused(y, residual, weight, eps, b.datas, b.flags, b.counters, b.rank, b.programs, b.max_numel,
                     zero_centered)
    summed = torch.ops.nanovllm.tp_all_reduce(y)
    if kernels:  # past the buffer (prefill): the kernel's add and norm after the collective sum
        from nanovllm.distributed.triton_fused_norm import add_norm
        return add_norm(summed, residual, weight, eps, zero_centered)
    return add_rms_norm(residual, summed, weight, eps, zero_centered)


def add_rms_norm(residual: torch.Tensor, summed: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centered: bool = False):
    """The op's torch path after the sum: ``(residual + summed, its RMSNorm)`` by ``kernels/norm_rope.rms_norm``'s
    rounding, or ``ZeroCenteredRMSNorm``'s (those layers are not importable from here)."""
    x = residual + summed
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return x, (normed * (1.0 + weight.float())).to(x.dtype)
    return x, weight * normed.to(x.dtype)


@_all_reduce_add_rms_norm.register_fake
def _(y, residual, weight, eps, zero_centered=False):
    return torch.empty_like(y), torch.empty_like(y)


def all_reduce_add_rms_norm(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            zero_centered: bool = False):
    """``(residual + sum of y over the group, its RMSNorm by weight)`` in one launch where ``usable``;
    ``zero_centered``: the norm scales by ``1 + weight`` (``ZeroCenteredRMSNorm``)."""
    op = traced.lookup("tp_all_reduce_add_rms_norm", y.device) or torch.ops.nanovllm.tp_all_reduce_add_rms_norm
    return op(y, residual, weight, eps, zero_centered)
