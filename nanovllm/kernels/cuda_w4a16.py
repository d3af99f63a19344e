"""The one-row int4 projection in CUDA C++ (``cuda_src/w4a16_gemv.cu``), beside the Triton kernels.

``prepare(device)`` builds and loads it at start-up (an int4 model on CUDA: ``engine/runner_setup.py``);
``usable(x, qweight, scale, zero, group)`` says whether the library is built for x's GPU and the call ``fits`` its
contract; ``linear_w4a16_gemv_cuda`` then computes what ``linear_w4a16_triton`` does (``x[:, perm] @ W.T + bias``, or
with ``silu_mul`` the fused MLP activation), gathering x through ``perm`` first.  Elsewhere the caller keeps the
Triton kernels: graph mode pads a decode step to at least 2 rows (``compile/graph.py``), so its decode graphs
take the kernel at no batch size yet; eager decode at batch 1 does.  ``ROWS`` is the weight rows each warp reads
together (``kernel_bench --int4 --sweep 1``).
"""
import ctypes

import torch

from nanovllm.kernels import cuda_build
from nanovllm.kernels.pdl import pdl_enabled

ROWS = 2  # weight rows a warp streams at once (with silu_mul: one gate, one up); the H200 sweep's best
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}


def fits(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> bool:
    """Whether the call is inside the kernel's contract, on any device: one bf16/fp16 row, K a multiple of 32,
    groups of a multiple of 32 columns (or one group), unit column strides, 16-byte aligned x and weight rows."""
    if x.dim() != 2 or x.shape[0] != 1 or x.dtype not in _DTYPES:
        return False
    k = x.shape[1]
    if k % 32 or group <= 0 or (group % 32 and group < k):
        return False
    strides = (x.stride(1), qweight.stride(1), scale.stride(1), zero.stride(1))
    return strides == (1, 1, 1, 1) and not (qweight.stride(0) % 16 or qweight.data_ptr() % 16 or x.data_ptr() % 16)


def usable(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> bool:
    """Whether the CUDA kernel runs this call (else the caller's Triton path does): ``fits``, on a GPU for which
    the library is built."""
    return x.is_cuda and fits(x, qweight, scale, zero, group) and _library(x.device) is not None


def prepare(device: torch.device) -> bool:
    """Build (once per machine) and load the kernel for ``device`` now, at start-up, rather than at the first
    one-row call; whether it is ready.  The reason it is not is logged by ``cuda_build``."""
    return _library(device) is not None


def _library(device: torch.device):
    lib = cuda_build.load("w4a16_gemv", device)
    if lib is not None and lib.nvl_w4a16_gemv.argtypes is None:
        p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        lib.nvl_w4a16_gemv.argtypes = [p, p, p, p, p, p, i, i, ll, ll, ll, i, i, i, i, i, p]
        lib.nvl_w4a16_gemv.restype = i
    return lib


def linear_w4a16_gemv_cuda(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           group: int, perm: torch.Tensor | None, bias: torch.Tensor | None, silu_mul: bool = False,
                           rows: int = ROWS) -> torch.Tensor:
    """``x[:, perm] @ W.T (+ bias)`` for one row x and the int4 weight W = (qweight, scale, zero, group), or with
    ``silu_mul`` ``silu(gate) * up`` of a packed [gate; up] weight; ``usable`` must hold."""
    n, k = qweight.shape[0], x.shape[1]
    assert qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == k, f"qweight {tuple(qweight.shape)} for K={k}"
    assert scale.dtype == torch.float16 and zero.dtype == torch.uint8 and scale.shape == zero.shape
    assert bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == (n,))
    if perm is not None:
        x = x.index_select(1, perm)
    out = x.new_empty(1, n // 2 if silu_mul else n)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    err = _library(x.device).nvl_w4a16_gemv(
        x.data_ptr(), qweight.data_ptr(), scale.data_ptr(), zero.data_ptr(), bias.data_ptr() if bias is not None
        else None, out.data_ptr(), out.shape[1], k, qweight.stride(0), scale.stride(0), zero.stride(0), min(group, k),
        int(silu_mul), _DTYPES[x.dtype], rows, int(pdl_enabled(x.device)), stream)
    if err:
        raise RuntimeError(f"w4a16_gemv: CUDA error {err} (rows={rows}, silu_mul={silu_mul}, x {tuple(x.shape)})")
    return out
