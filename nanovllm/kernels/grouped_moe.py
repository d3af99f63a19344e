"""bf16 experts as two grouped GEMMs (``torch._grouped_mm``, CUTLASS's grouped GEMM on sm90): the (token, k)
pairs sorted by expert, x's rows gathered in that order, the gate/up GEMM, the activation (``triton_moe_tiles.
_activate``, in float32 on the GEMM's rounded output), the down GEMM, each pair's router weight and the sum over top-k
-> [T, H] in x's dtype.  Static shapes and no host sync (a step replays in a CUDA graph).

``experts_triton`` sends experts here (``grouped_usable``) where they are not quantized (or were dequantized once),
have no biases, run on sm90 and are wide and busy enough (``GROUPED_FROM``): prefill of Mixtral-class experts, where
they beat the Triton tiles (docs/PERFORMANCE.md); narrow experts (Qwen3-30B-A3B's 768) stay on the tiles.
``w13`` [E, 2I, H] holds the gate rows then the up rows; ``w2`` [E, H, I].
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_common import device_capability
from nanovllm.kernels.triton_moe_tiles import ACTIVATION_CODES, _activate

# (intermediate size at least, mean pairs per expert at least) from which the grouped GEMMs win, the H200 lab's
# crossovers: from 512 rows at 6,400-16,384 columns (not at 4,096 or 2,560), from 1,024 at 2,560-4,096 (not at 768)
GROUPED_FROM = ((6400, 512), (2560, 1024))


def grouped_usable(x: torch.Tensor, top_k: int, w13: torch.Tensor, w2: torch.Tensor, biased: bool) -> bool:
    """Whether ``experts_grouped`` runs these experts: bf16 weights and x (so not quantized) on an sm90 GPU (where
    the crossovers were measured and torch's grouped GEMM needs no host copy), without biases, ``w2`` not a
    transposed view, H and I multiples of 8 (the GEMM's 16-byte rows), and ``GROUPED_FROM``'s width and rows."""
    if not (x.is_cuda and x.dtype == w13.dtype == w2.dtype == torch.bfloat16 and not biased
            and w2.stride(2) == 1 and w2.shape[1] % 8 == 0 and w2.shape[2] % 8 == 0
            and device_capability(x.device)[0] == 9):
        return False
    mean_rows = x.shape[0] * top_k / w13.shape[0]
    return any(w2.shape[2] >= inter and mean_rows >= rows for inter, rows in GROUPED_FROM)


@triton.jit
def _activation_kernel(h_ptr, out_ptr, I, stride_h, stride_o, alpha, limit, ACTIVATION: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + I + cols, mask=mask, other=0.0).to(tl.float32)
    out = _activate(gate, up, alpha, limit, ACTIVATION)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def experts_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, hist: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor, activation: str = "silu", swiglu_alpha: float = 1.702,
                    swiglu_limit: float = 7.0, round_weights: bool = False) -> torch.Tensor:
    """``experts_triton``'s contract for unquantized experts without biases (``route_triton``'s ``weights`` float32
    [T, top_k], ``ids`` int32 [T, top_k] and ``hist`` [chunks, E]); ``round_weights``: each weight rounded to x's
    dtype before the product, as the twin's."""
    num_tokens, top_k = ids.shape
    inter_size = w13.shape[1] // 2
    order = torch.argsort(ids.flatten(), stable=True)  # pair indices, sorted by expert
    offsets = hist.sum(dim=0).cumsum(dim=0).to(torch.int32)  # each expert's end row among the sorted pairs
    rows = x.index_select(0, order // top_k)
    h = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offsets)
    act = h.new_empty(h.shape[0], inter_size)
    block = min(1024, triton.next_power_of_2(inter_size))
    _activation_kernel[(h.shape[0], triton.cdiv(inter_size, block))](
        h, act, inter_size, h.stride(0), act.stride(0), float(swiglu_alpha), float(swiglu_limit),
        ACTIVATION=ACTIVATION_CODES[activation], BLOCK=block)
    down = torch._grouped_mm(act, w2.transpose(1, 2), offs=offsets)
    w = weights.flatten().index_select(0, order)
    if round_weights:
        w = w.to(x.dtype).float()
    per_pair = torch.empty_like(down)
    per_pair[order] = (down.float() * w[:, None]).to(x.dtype)
    return per_pair.view(num_tokens, top_k, -1).sum(dim=1)
