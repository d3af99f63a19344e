"""Sampling penalties and token masks for CUDA: the Triton implementation of ``nanovllm::process_logits``.

``process_logits_triton`` computes what ``logits.process_logits_reference`` computes (the module doc there holds
the contract), equal to it bit for bit: the division is correctly rounded and the frequency product is rounded on
its own, as torch's are, and a bf16 result is rounded to nearest even by hand (``triton_rope_store._round``; the
interpreter's cast truncates).  One program per (row, BLOCK tokens); a program reads its row's state once and
loads the completion counts and prompt flags only when the row has a penalty, the bitmask only when its mask is
on, so a row with neither costs one read and one write of its logits.  The grid depends only on (B, V): a launch
can be captured in a graph.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.triton_rope_store import _round
from nanovllm.kernels.triton_sampler import _mul

BLOCK = 1024  # vocabulary ids per program
NUM_WARPS = 4


@triton.jit
def _process_logits_kernel(logits_ptr, out_ptr, slots_ptr, params_ptr, bitmask_ptr, counts_ptr, seen_ptr,
                           stride_logits, stride_out, stride_bitmask, stride_counts, stride_seen, V,
                           BLOCK: tl.constexpr, PTX: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < V
    state = tl.load(slots_ptr + row).to(tl.int64)
    mask_on = tl.load(params_ptr + state * 4)
    rep = tl.load(params_ptr + state * 4 + 1)
    freq = tl.load(params_ptr + state * 4 + 2)
    pres = tl.load(params_ptr + state * 4 + 3)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_logits + cols, mask=valid, other=0.0).to(tl.float32)
    if (rep != 1.0) | (freq != 0.0) | (pres != 0.0):
        count = tl.load(counts_ptr + state * stride_counts + cols, mask=valid, other=0)
        seen = tl.load(seen_ptr + state * stride_seen + cols, mask=valid, other=0)
        present = count > 0
        # a repetition penalty of 1 divides and multiplies by 1: exact, so no test of rep is needed here
        scaled = tl.where(x > 0, tl.math.div_rn(x, tl.broadcast_to(rep, [BLOCK])), x * rep)
        x = tl.where((seen != 0) | present, scaled, x)
        x = x - _mul(tl.broadcast_to(freq, [BLOCK]), count.to(tl.float32), PTX) - tl.where(present, pres, 0.0)
    if mask_on != 0.0:
        # the 32 lanes of one word read the same address: one load a warp
        word = tl.load(bitmask_ptr + state * stride_bitmask + cols // 32, mask=valid, other=0)
        x = tl.where(((word >> (cols % 32)) & 1) != 0, x, float("-inf"))
    out = _round(x, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty)  # the rounding done, the cast is exact
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, out, mask=valid)


def process_logits_triton(logits: torch.Tensor, slots: torch.Tensor, params: torch.Tensor, bitmask: torch.Tensor,
                          counts: torch.Tensor, seen: torch.Tensor, block: int = BLOCK,
                          num_warps: int = NUM_WARPS) -> torch.Tensor:
    """logits [B, V] (fp32 / bf16 / fp16) with each row's penalties and mask applied -> a new [B, V] tensor."""
    assert logits.dim() == 2 and block % 32 == 0
    batch, vocab = logits.shape
    out = torch.empty(batch, vocab, dtype=logits.dtype, device=logits.device)
    if batch == 0 or vocab == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    params = params.float().contiguous()
    bitmask, counts = bitmask.contiguous(), counts.contiguous()
    seen = seen.contiguous().view(torch.uint8)
    _process_logits_kernel[(batch, triton.cdiv(vocab, block))](
        logits, out, slots.contiguous(), params, bitmask, counts, seen, logits.stride(0), out.stride(0),
        bitmask.stride(0), counts.stride(0), seen.stride(0), vocab, BLOCK=block,
        PTX=logits.is_cuda and torch.version.hip is None, num_warps=num_warps)
    return out
