"""The few-row int4 projection in CUDA C++ on the tensor cores (``cuda_src/w4a16_mma.cu``), beside the Triton one
(int4 experts: ``cuda_moe.py``).

``prepare(device)`` builds and loads it at start-up (an int4 model on CUDA: ``engine/runner_setup.py``);
``usable(x, qweight, scale, zero, group)`` says whether the library is built for x's GPU and the call ``fits`` its
contract (1 to ``MAX_ROWS`` rows: decode steps, graph mode's padded batch 1 included); ``linear_w4a16_cuda`` then
computes what ``linear_w4a16_triton`` does (``x[:, perm] @ W.T + bias``, or with ``silu_mul`` the fused MLP
activation), gathering x through ``perm`` first.  Elsewhere the caller keeps the Triton kernels, as on a GPU older
than sm_80 (no bf16 ``mma``: its build fails, and ``cuda_build`` logs it).
"""

import torch

from nanovllm.kernels import cuda_build
from nanovllm.kernels.pdl import pdl_enabled

MAX_ROWS = 8  # the n of one mma.m16n8k16
# the C function's parameters, in order (cuda_build.load_function): p a pointer, i an int, l a long long
_SIGNATURE = "pliplplplppliiiiiip"


def fits(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> bool:
    """Whether the call is inside the kernel's contract, on any device: 1 to 8 bf16/fp16 rows, K a multiple of 128,
    groups of a multiple of 128 columns (or one group), unit column strides, 16-byte aligned x and weight rows."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.dtype not in cuda_build.DTYPES:
        return False
    k = x.shape[1]
    if not cuda_build.chunked(k, group):
        return False
    strides = (x.stride(1), qweight.stride(1), scale.stride(1), zero.stride(1))
    aligned = not (qweight.stride(0) % 16 or qweight.data_ptr() % 16 or x.data_ptr() % 16
                   or (x.shape[0] > 1 and x.stride(0) % 8))
    return strides == (1, 1, 1, 1) and aligned


def usable(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> bool:
    """Whether the CUDA kernel runs this call (else the caller's Triton path does): ``fits``, on a GPU for which
    the library is built."""
    return x.is_cuda and fits(x, qweight, scale, zero, group) and _function(x.device) is not None


def prepare(device: torch.device) -> bool:
    """Build (once per machine) and load the kernel for ``device`` now, at start-up, rather than at the first call;
    whether it is ready.  The reason it is not is logged by ``cuda_build``."""
    return _function(device) is not None


def _function(device: torch.device):
    return cuda_build.load_function("w4a16_mma", device, _SIGNATURE)


def linear_w4a16_cuda(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                      perm: torch.Tensor | None, bias: torch.Tensor | None, silu_mul: bool = False) -> torch.Tensor:
    """``x[:, perm] @ W.T (+ bias)`` for the int4 weight W = (qweight, scale, zero, group), or with ``silu_mul``
    ``silu(gate) * up`` of a packed [gate; up] weight; ``usable`` must hold."""
    n, k = qweight.shape[0], x.shape[1]
    assert qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == k, f"qweight {tuple(qweight.shape)} for K={k}"
    assert scale.dtype == torch.float16 and zero.dtype == torch.uint8 and scale.shape == zero.shape
    assert bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == (n,))
    if perm is not None:
        x = x.index_select(1, perm)
    out = x.new_empty(x.shape[0], n // 2 if silu_mul else n)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    err = _function(x.device)(
        x.data_ptr(), x.stride(0), x.shape[0], qweight.data_ptr(), qweight.stride(0), scale.data_ptr(),
        scale.stride(0), zero.data_ptr(), zero.stride(0), bias.data_ptr() if bias is not None else None,
        out.data_ptr(), out.stride(0), out.shape[1], k, min(group, k), int(silu_mul), cuda_build.DTYPES[x.dtype],
        int(pdl_enabled(x.device)), stream)
    if err:
        raise RuntimeError(f"w4a16_mma: CUDA error {err} (silu_mul={silu_mul}, x {tuple(x.shape)})")
    return out
