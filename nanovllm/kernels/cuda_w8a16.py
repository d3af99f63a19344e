"""The few-row FP8 weight-only projection in CUDA C++ on the tensor cores (``cuda_src/w8a16_mma.cu``), beside the
Triton one.

``prepare(device)`` builds and loads it at start-up (an FP8 model on CUDA: ``engine/runner_setup.py``);
``usable(x, weight, scale, group)`` says whether the library is built for x's GPU and the call ``fits`` its contract
(1 to ``MAX_ROWS`` rows: decode steps, graph mode's padded batch 1 included); ``linear_w8a16_cuda`` then computes
what ``linear_triton`` does for an FP8 weight (``weight_quant.py``'s format): ``x @ W.T + bias``, or with
``silu_mul`` the fused MLP activation.  Elsewhere the caller keeps the Triton kernel, as on a GPU older than sm_89
(no e4m3 conversion: the build fails, and ``cuda_build`` logs it).
"""

import torch

from nanovllm.kernels import cuda_build
from nanovllm.kernels.kv_quant import FP8_DTYPE
from nanovllm.kernels.pdl import pdl_enabled

MAX_ROWS = 8  # the n of one mma.m16n8k16
NAME = "w8a16_mma"
_SIGNATURE = "pliplplppliiiiiip"  # its parameters (cuda_build.load_function): p a pointer, i an int, l a long long


def fits(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group: int) -> bool:
    """Whether the call is inside the kernel's contract, on any device: 1 to 8 bf16/fp16 rows, an e4m3 weight [N, K]
    with K a multiple of 128, float32 scales in groups of a multiple of 128 columns (or one a row), unit column
    strides, 16-byte aligned x and weight rows."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.dtype not in cuda_build.DTYPES:
        return False
    k = x.shape[1]
    if weight.dtype != FP8_DTYPE or weight.dim() != 2 or weight.shape[1] != k or scale.dtype != torch.float32:
        return False
    if not cuda_build.chunked(k, group):
        return False
    if (x.stride(1), weight.stride(1), scale.stride(1)) != (1, 1, 1):
        return False
    return not (weight.stride(0) % 16 or weight.data_ptr() % 16 or x.data_ptr() % 16
                or (x.shape[0] > 1 and x.stride(0) % 8))


def usable(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group: int) -> bool:
    """Whether the CUDA kernel runs this call (else the caller's Triton path does): ``fits``, on a GPU for which
    the library is built."""
    return x.is_cuda and fits(x, weight, scale, group) and _function(x.device) is not None


def prepare(device: torch.device) -> bool:
    """Build (once per machine) and load the kernel for ``device`` now, at start-up; whether it is ready."""
    return _function(device) is not None


def _function(device: torch.device):
    return cuda_build.load_function(NAME, device, _SIGNATURE)


def linear_w8a16_cuda(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group: int,
                      bias: torch.Tensor | None, silu_mul: bool = False) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the FP8 weight W = (weight, scale, group), or with ``silu_mul`` ``silu(gate) * up``
    of a packed [gate; up] weight; ``usable`` must hold."""
    n, k = weight.shape
    assert scale.shape[0] == n and scale.shape[1] == -(-k // min(group, k)), f"scale {tuple(scale.shape)} for {n}x{k}"
    assert bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == (n,))
    out = x.new_empty(x.shape[0], n // 2 if silu_mul else n)
    err = _function(x.device)(
        x.data_ptr(), x.stride(0), x.shape[0], weight.data_ptr(), weight.stride(0), scale.data_ptr(),
        scale.stride(0), bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0), out.shape[1],
        k, min(group, k), int(silu_mul), cuda_build.DTYPES[x.dtype], int(pdl_enabled(x.device)),
        torch.cuda.current_stream(x.device).cuda_stream)
    if err:
        raise RuntimeError(f"{NAME}: CUDA error {err} (silu_mul={silu_mul}, x {tuple(x.shape)})")
    return out
