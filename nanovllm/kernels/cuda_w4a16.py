"""The int4 kernels in CUDA C++ on the tensor cores, beside the Triton ones: the few-row projection
(``cuda_src/w4a16_mma.cu``) and the fused MoE's grouped experts (``cuda_src/w4a16_moe.cu``).

``prepare(device)`` builds and loads both at start-up (an int4 model on CUDA: ``engine/runner_setup.py``);
``usable(x, qweight, scale, zero, group)`` says whether the library is built for x's GPU and the call ``fits`` its
contract (1 to ``MAX_ROWS`` rows: decode steps, graph mode's padded batch 1 included); ``linear_w4a16_cuda`` then
computes what ``linear_w4a16_triton`` does (``x[:, perm] @ W.T + bias``, or with ``silu_mul`` the fused MLP
activation), gathering x through ``perm`` first.  Elsewhere the caller keeps the Triton kernels, as on a GPU older
than sm_80 (no bf16 ``mma``: its build fails, and ``cuda_build`` logs it).  ``moe_usable`` and
``experts_int4_cuda`` do the same for int4 experts (SiLU, no biases) that the Triton MoE would not dequantize once.
"""

import torch

from nanovllm.kernels import cuda_build
from nanovllm.kernels.pdl import pdl_enabled
from nanovllm.kernels.triton_moe import dequantized_once
from nanovllm.kernels.triton_moe_align import align_triton

MAX_ROWS = 8  # the n of one mma.m16n8k16
MOE_BLOCKS = (8, 16, 32, 64)  # the MoE kernel's layout blocks: 1, 2, 4 or 8 mma's of n = 8 on one dequantized chunk
MOE_MAX_BLOCK = 32  # moe_block's largest pick: blocks of 64 were no faster at 64 pairs per expert (H200)
MOE_MAX_MEAN_ROWS = 64  # pairs per expert, on average, up to which the MoE kernel beats the Triton tiles (H200)
CHUNK = 128  # the kernel's kChunk: columns a warp sums at a time; K and groups are multiples of it
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
# each C function's parameters, in order (cuda_build.load_function): p a pointer, i an int, l a long long
_SIGNATURES = {"w4a16_mma": "pliplplplppliiiiiip", "w4a16_moe": "plpppiiipllpllpllppliiiiiiip"}


def fits(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> bool:
    """Whether the call is inside the kernel's contract, on any device: 1 to 8 bf16/fp16 rows, K a multiple of 128,
    groups of a multiple of 128 columns (or one group), unit column strides, 16-byte aligned x and weight rows."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.dtype not in _DTYPES:
        return False
    k = x.shape[1]
    if k % CHUNK or group <= 0 or (group % CHUNK and group < k):
        return False
    strides = (x.stride(1), qweight.stride(1), scale.stride(1), zero.stride(1))
    aligned = not (qweight.stride(0) % 16 or qweight.data_ptr() % 16 or x.data_ptr() % 16
                   or (x.shape[0] > 1 and x.stride(0) % 8))
    return strides == (1, 1, 1, 1) and aligned


def usable(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> bool:
    """Whether the CUDA kernel runs this call (else the caller's Triton path does): ``fits``, on a GPU for which
    the library is built."""
    return x.is_cuda and fits(x, qweight, scale, zero, group) and _function(x.device, "w4a16_mma") is not None


def moe_fits(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, scales: tuple, zeros: tuple, group: int) -> bool:
    """Whether int4 experts (uint8 ``w13`` [E, 2I, H / 2], ``w2`` [E, H, I / 2] as stored, their fp16 ``scales``
    and uint8 ``zeros``) are inside the MoE kernel's contract, on any device: bf16/fp16 x, H and I multiples of
    128, groups of a multiple of 128 columns (or one), unit column strides, 16-byte aligned rows."""
    if x.dim() != 2 or x.dtype not in _DTYPES or w13.dtype != torch.uint8 or w2.dtype != torch.uint8:
        return False
    hidden, inter = x.shape[1], w2.shape[2] * 2
    if hidden % CHUNK or inter % CHUNK or group <= 0 or (group % CHUNK and group < max(hidden, inter)):
        return False
    tensors = (x, w13, w2, *scales, *zeros)
    if any(t.stride(-1) != 1 for t in tensors) or any(t.dtype != torch.float16 for t in scales) \
            or any(t.dtype != torch.uint8 for t in zeros):
        return False
    rows_aligned = all(t.stride(-2) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (w13, w2))
    return rows_aligned and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0


def moe_usable(x: torch.Tensor, top_k: int, w13: torch.Tensor, w2: torch.Tensor, scales: tuple, zeros: tuple,
               group: int) -> bool:
    """Whether the CUDA kernels run these int4 experts (SiLU, no biases: the caller's to check): ``moe_fits``,
    ``moe_faster``, the Triton MoE would stream them rather than dequantize them once
    (``triton_moe.dequantized_once``), and the library is built for x's GPU."""
    return (x.is_cuda and moe_faster(x.shape[0], top_k, w13.shape[0]) and moe_fits(x, w13, w2, scales, zeros, group)
            and not dequantized_once(x, top_k, w13, w2, scales[0], zeros[0])
            and _function(x.device, "w4a16_moe") is not None)


def moe_faster(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether the MoE kernel beats the Triton tiles on such a step, as measured: at most ``MOE_MAX_MEAN_ROWS``
    pairs per expert on average (steps of up to 256 tokens at Mixtral's 8 experts and top 2, 1,024 at
    Qwen3-30B-A3B's 128 and top 8)."""
    return num_tokens * top_k <= MOE_MAX_MEAN_ROWS * num_experts


def moe_block(num_tokens: int, top_k: int, num_experts: int) -> int:
    """The layout block for such a step: the smallest of ``MOE_BLOCKS`` that holds twice the pairs an expert gets
    on average, at most ``MOE_MAX_BLOCK`` (an expert's chunks are dequantized once per block, and one that spills
    into a second block is dequantized twice).  Measured for Qwen3-30B-A3B and Mixtral at 4, 8, 16 and 64 pairs."""
    want = min(2 * num_tokens * top_k / num_experts, MOE_MAX_BLOCK)
    return next(b for b in MOE_BLOCKS if b >= want)


def prepare(device: torch.device) -> bool:
    """Build (once per machine) and load both kernels for ``device`` now, at start-up, rather than at the first
    call; whether they are ready.  The reason one is not is logged by ``cuda_build``."""
    return all([_function(device, name) is not None for name in _SIGNATURES])


def _function(device: torch.device, name: str):
    return cuda_build.load_function(name, device, _SIGNATURES[name])


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
    err = _function(x.device, "w4a16_mma")(
        x.data_ptr(), x.stride(0), x.shape[0], qweight.data_ptr(), qweight.stride(0), scale.data_ptr(),
        scale.stride(0), zero.data_ptr(), zero.stride(0), bias.data_ptr() if bias is not None else None,
        out.data_ptr(), out.stride(0), out.shape[1], k, min(group, k), int(silu_mul), _DTYPES[x.dtype],
        int(pdl_enabled(x.device)), stream)
    if err:
        raise RuntimeError(f"w4a16_mma: CUDA error {err} (silu_mul={silu_mul}, x {tuple(x.shape)})")
    return out


def experts_int4_cuda(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, hist: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor, scales: tuple, zeros: tuple, group: int,
                      round_weights: bool = False, block: int | None = None) -> torch.Tensor:
    """``triton_moe.experts_triton`` for int4 SiLU experts without biases, on the CUDA kernels (``moe_fits`` and
    a built library must hold; ``moe_usable`` says when they are the faster): routed ``weights`` (float32),
    ``ids`` and ``hist`` (``route_triton``) -> [T, H] in x's dtype.  ``block``: one of ``MOE_BLOCKS``, by default
    ``moe_block``'s."""
    num_tokens, hidden = x.shape
    top_k, num_experts, inter = ids.shape[1], w13.shape[0], w2.shape[2] * 2
    assert w13.shape == (num_experts, 2 * inter, hidden // 2) and w2.shape == (num_experts, hidden, inter // 2)
    if num_tokens == 0:
        return torch.zeros_like(x)
    block = block or moe_block(num_tokens, top_k, num_experts)
    assert block in MOE_BLOCKS, f"block {block} is not one of {MOE_BLOCKS}"
    sorted_ids, block_expert, block_rows = align_triton(ids, hist, num_experts, block)
    num_blocks = block_expert.shape[0]
    if block > MOE_BLOCKS[0]:  # the kernel's contract: past one sub-block, x comes with its columns paired
        x = permute_columns(x)
    inter_rows = x.new_empty(num_blocks * block, inter)
    per_pair = x.new_empty(num_tokens * top_k, hidden)
    layout = (sorted_ids.data_ptr(), block_expert.data_ptr(), block_rows.data_ptr(), num_blocks, block, top_k)
    _moe_gemm(x, layout, w13, scales[0], zeros[0], group, weights, inter_rows, True, round_weights)
    _moe_gemm(inter_rows, layout, w2, scales[1], zeros[1], group, weights, per_pair, False, round_weights)
    return per_pair.view(num_tokens, top_k, hidden).sum(dim=1)


def permute_columns(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of 2-D ``x`` with each 8 columns in the order the MoE kernel's mma pairs them: column
    8i + j at 8i + 2 (j % 4) + j // 4, so 0, 4, 1, 5, 2, 6, 3, 7 (the kernel's layout blocks of more than 8 slots
    read x so, and the up GEMM writes the intermediate rows so)."""
    rows, cols = x.shape
    assert cols % 8 == 0, f"{cols} columns are not a multiple of 8"
    return x.unflatten(1, (cols // 8, 2, 4)).transpose(2, 3).reshape(rows, cols)


def _moe_gemm(src, layout, w, scale, zero, group, weights, dst, up: bool, round_weights: bool) -> None:
    """One of the two grouped GEMMs (``up``: x -> the intermediate rows; else those -> the weighted pair rows)."""
    k, dev = src.shape[1], src.device
    err = _function(dev, "w4a16_moe")(
        src.data_ptr(), src.stride(0), *layout, w.data_ptr(), w.stride(0), w.stride(1), scale.data_ptr(),
        scale.stride(0), scale.stride(1), zero.data_ptr(), zero.stride(0), zero.stride(1), weights.data_ptr(),
        dst.data_ptr(), dst.stride(0), dst.shape[1], k, min(group, k), int(up), int(round_weights),
        _DTYPES[src.dtype], int(pdl_enabled(dev)), torch.cuda.current_stream(dev).cuda_stream)
    if err:
        raise RuntimeError(f"w4a16_moe: CUDA error {err} ({'up' if up else 'down'}, {tuple(src.shape)} rows)")
