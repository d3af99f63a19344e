"""The fused MoE's grouped experts in CUDA C++ on the tensor cores, beside the Triton ones: int4 experts
(``cuda_src/w4a16_moe.cu``) and FP8 experts, weight-only (``cuda_src/w8a16_moe.cu``), one kernel body
(``moe_grouped.cuh``) over ``triton_moe_align.py``'s expert-sorted layout.

``prepare(device, fp8)`` builds and loads a format's kernel at start-up (an int4 or FP8 model on CUDA:
``engine/runner_setup.py``).  ``moe_usable(x, top_k, w13, w2, scales, zeros, group)`` says whether the kernel runs
such experts (SiLU, no biases: the caller's to check): int4 ones (``zeros`` given) or e4m3 ones (``zeros``
(None, None), float32 scales per row and group) inside ``moe_fits``'s contract, at steps of at most
``MOE_MAX_MEAN_ROWS`` (FP8: ``FP8_MAX_MEAN_ROWS``) pairs per expert, not dequantized once, the library built.
``experts_cuda`` then computes ``triton_moe.experts_triton``'s output.  FP8 experts run here weight-only (x is not
rounded to e4m3), as the dequantized oracle does; past these rows they keep the W8A8 Triton kernels.  A bf16 model's x
meets them as fp16 rows of x / 16 (``FP16_X_SCALE``; exact from 2^-10 to 1e6), and so does the intermediate, since
e4m3 becomes fp16 in one instruction a pair and bf16 in four.
"""
import torch

from nanovllm.kernels import cuda_build
from nanovllm.kernels.kv_quant import FP8_DTYPE
from nanovllm.kernels.pdl import pdl_enabled
from nanovllm.kernels.triton_moe import dequantized_once
from nanovllm.kernels.triton_moe_align import align_triton

MOE_BLOCKS = (8, 16, 32, 64)  # the kernel's layout blocks: 1, 2, 4 or 8 mma's of n = 8 on one dequantized chunk
MOE_MAX_BLOCK = 32  # moe_block's largest pick: blocks of 64 were no faster at 64 pairs per expert (H200, int4)
MOE_MAX_MEAN_ROWS = 64  # pairs per expert, on average, up to which the kernel beats the Triton tiles (H200, int4)
# FP8: up to which it beats W8A8 Triton (H200, Qwen3-30B-A3B's experts, the whole op: 0.76-0.93 of its time at 4 to
# 10 pairs, 0.96 at 12, 1.00 at 16)
FP8_MAX_MEAN_ROWS = 12
_NAMES = {False: "w4a16_moe", True: "w8a16_moe"}  # by fp8
_SIGNATURE = "plpppiiipllpllpllppliiiiiiiip"  # the C functions' parameters (cuda_build.load_function)
FP16_X_SCALE = 16.0  # the kernel's kFp16XScale: a bf16 model's x and intermediate rows go to FP8 experts as fp16 / 16


def _fp8(w13: torch.Tensor) -> bool:
    return w13.dtype == FP8_DTYPE


def moe_fits(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, scales: tuple, zeros: tuple, group: int) -> bool:
    """Whether experts are inside the kernel's contract, on any device: int4 ones (uint8 ``w13`` [E, 2I, H / 2],
    ``w2`` [E, H, I / 2] as stored, fp16 ``scales``, uint8 ``zeros``) or e4m3 ones ([E, 2I, H], [E, H, I], float32
    ``scales`` [E, N, groups], ``zeros`` None); bf16/fp16 x, H and I multiples of 128, groups of a multiple of 128
    columns (or one), unit column strides, 16-byte aligned rows."""
    fp8 = _fp8(w13) and w2.dtype == FP8_DTYPE and zeros[0] is None and zeros[1] is None
    int4 = w13.dtype == w2.dtype == torch.uint8 and zeros[0] is not None and zeros[1] is not None
    if x.dim() != 2 or x.dtype not in cuda_build.DTYPES or not (fp8 or int4) or any(s is None for s in scales):
        return False
    hidden, inter = x.shape[1], w2.shape[2] * (1 if fp8 else 2)
    if not (cuda_build.chunked(hidden, group) and cuda_build.chunked(inter, group)):
        return False
    zeros = zeros if int4 else ()
    if any(t.stride(-1) != 1 for t in (x, w13, w2, *scales, *zeros)) or any(t.dtype != torch.uint8 for t in zeros):
        return False
    if any(t.dtype != (torch.float32 if fp8 else torch.float16) for t in scales):
        return False
    rows_aligned = all(t.stride(-2) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (w13, w2))
    return rows_aligned and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0


def moe_usable(x: torch.Tensor, top_k: int, w13: torch.Tensor, w2: torch.Tensor, scales: tuple, zeros: tuple,
               group: int) -> bool:
    """Whether the CUDA kernel runs these experts (SiLU, no biases: the caller's to check): ``moe_fits``,
    ``moe_faster``, the Triton MoE would stream them rather than dequantize them once
    (``triton_moe.dequantized_once``), and the format's library is built for x's GPU."""
    return (x.is_cuda and moe_faster(x.shape[0], top_k, w13.shape[0], _fp8(w13))
            and moe_fits(x, w13, w2, scales, zeros, group)
            and not dequantized_once(x, top_k, w13, w2, scales[0], zeros[0])
            and _function(x.device, _fp8(w13)) is not None)


def moe_faster(num_tokens: int, top_k: int, num_experts: int, fp8: bool = False) -> bool:
    """Whether the kernel beats the Triton tiles on such a step, as measured: at most ``MOE_MAX_MEAN_ROWS`` pairs per
    expert on average (steps of up to 256 tokens at Mixtral's 8 experts and top 2, 1,024 at Qwen3-30B-A3B's 128 and
    top 8); FP8 experts at most ``FP8_MAX_MEAN_ROWS`` (Qwen3-30B-A3B: 192 tokens)."""
    return num_tokens * top_k <= (FP8_MAX_MEAN_ROWS if fp8 else MOE_MAX_MEAN_ROWS) * num_experts


def moe_block(num_tokens: int, top_k: int, num_experts: int) -> int:
    """The layout block for such a step: the smallest of ``MOE_BLOCKS`` that holds twice the pairs an expert gets
    on average, at most ``MOE_MAX_BLOCK`` (an expert's chunks are dequantized once per block, and one that spills
    into a second block is dequantized twice).  Measured for Qwen3-30B-A3B and Mixtral at 4, 8, 16 and 64 pairs."""
    want = min(2 * num_tokens * top_k / num_experts, MOE_MAX_BLOCK)
    return next(b for b in MOE_BLOCKS if b >= want)


def prepare(device: torch.device, fp8: bool) -> bool:
    """Build (once per machine) and load the kernel of int4 (or with ``fp8`` e4m3) experts for ``device`` now, at
    start-up, rather than at the first call; whether it is ready (``cuda_build`` logs why not)."""
    return _function(device, fp8) is not None


def _function(device: torch.device, fp8: bool):
    return cuda_build.load_function(_NAMES[fp8], device, _SIGNATURE)


def experts_cuda(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, hist: torch.Tensor,
                 w13: torch.Tensor, w2: torch.Tensor, scales: tuple, zeros: tuple, group: int,
                 round_weights: bool = False, block: int | None = None) -> torch.Tensor:
    """``triton_moe.experts_triton`` for int4 or e4m3 SiLU experts without biases (``moe_fits`` and a built library
    must hold; ``moe_usable`` says when they are the faster): routed ``weights`` (float32), ``ids`` and ``hist``
    (``route_triton``) -> [T, H] in x's dtype.  ``block``: one of ``MOE_BLOCKS``, by default ``moe_block``'s."""
    num_tokens, hidden = x.shape
    fp8 = _fp8(w13)
    per_byte = 1 if fp8 else 2  # columns a stored element holds
    top_k, num_experts, inter = ids.shape[1], w13.shape[0], w2.shape[2] * per_byte
    assert w13.shape == (num_experts, 2 * inter, hidden // per_byte), f"w13 {tuple(w13.shape)} for H={hidden}"
    assert w2.shape == (num_experts, hidden, inter // per_byte), f"w2 {tuple(w2.shape)} for I={inter}"
    if num_tokens == 0:
        return torch.zeros_like(x)
    block = block or moe_block(num_tokens, top_k, num_experts)
    assert block in MOE_BLOCKS, f"block {block} is not one of {MOE_BLOCKS}"
    sorted_ids, block_expert, block_rows = align_triton(ids, hist, num_experts, block)
    num_blocks = block_expert.shape[0]
    per_pair = x.new_empty(num_tokens * top_k, hidden)
    fp16_x = fp8 and x.dtype == torch.bfloat16
    if fp16_x:  # one pass: x / 16 is exact in bf16, then rounded to fp16
        x = torch.mul(x, 1 / FP16_X_SCALE, out=torch.empty(x.shape, dtype=torch.float16, device=x.device))
    if block > MOE_BLOCKS[0] and not fp8:  # int4's contract: past one sub-block, x comes with its columns paired
        x = permute_columns(x)
    inter_rows = x.new_empty(num_blocks * block, inter)
    layout = (sorted_ids.data_ptr(), block_expert.data_ptr(), block_rows.data_ptr(), num_blocks, block, top_k)
    gemm = (fp8, fp16_x, layout, group, weights, round_weights, cuda_build.DTYPES[per_pair.dtype])
    _moe_gemm(*gemm, x, w13, scales[0], zeros[0], inter_rows, True)
    _moe_gemm(*gemm, inter_rows, w2, scales[1], zeros[1], per_pair, False)
    return per_pair.view(num_tokens, top_k, hidden).sum(dim=1)


def permute_columns(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of 2-D ``x`` with each 8 columns in the order the int4 kernel's mma pairs them: column
    8i + j at 8i + 2 (j % 4) + j // 4, so 0, 4, 1, 5, 2, 6, 3, 7 (its layout blocks of more than 8 slots read x so,
    and its up GEMM writes the intermediate rows so)."""
    rows, cols = x.shape
    assert cols % 8 == 0, f"{cols} columns are not a multiple of 8"
    return x.unflatten(1, (cols // 8, 2, 4)).transpose(2, 3).reshape(rows, cols)


def _moe_gemm(fp8, fp16_x, layout, group, weights, round_weights, dtype, src, w, scale, zero, dst, up: bool) -> None:
    """One of the two grouped GEMMs (``up``: x -> the intermediate rows; else those -> the weighted pair rows, in
    the model's ``dtype``); ``fp16_x``: src (and up's dst) are fp16 rows / ``FP16_X_SCALE``."""
    k, dev = src.shape[1], src.device
    zero_args = (w.data_ptr(), 0, 0) if zero is None else (zero.data_ptr(), zero.stride(0), zero.stride(1))
    err = _function(dev, fp8)(
        src.data_ptr(), src.stride(0), *layout, w.data_ptr(), w.stride(0), w.stride(1), scale.data_ptr(),
        scale.stride(0), scale.stride(1), *zero_args, weights.data_ptr(), dst.data_ptr(), dst.stride(0), dst.shape[1],
        k, min(group, k), int(up), int(round_weights), dtype, int(fp16_x), int(pdl_enabled(dev)),
        torch.cuda.current_stream(dev).cuda_stream)
    if err:
        raise RuntimeError(f"{_NAMES[fp8]}: CUDA error {err} ({'up' if up else 'down'}, {tuple(src.shape)} rows)")
