"""Which tiles the Triton fused MoE (``triton_moe.py``) takes for a step: chosen by the mean number of rows each
expert gets, ``T * top_k / E``, since that, not the token count alone, says how full a block of ``block_m`` rows is.

``BY_ROWS_PER_EXPERT`` maps that mean to a tile set: small tiles while experts get few rows (decode), larger ones
as they fill; FP8 experts take a wider column tile at decode sizes (``FP8_DECODE``).  Int4 experts take the bf16
tiles, and past ``INT4_DEQUANTIZE_ROWS`` the bf16 kernels on experts dequantized once.  The thresholds come from
timing the candidate tile sets on real MoE shapes (``benchmarks/moe_kernel.py``; the measurements are in
docs/PERFORMANCE.md).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # rows per block
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    swap: bool | None = None  # the weight tile is the MMA's A operand (triton_moe_tiles.py); None: the kernel's rule


BY_ROWS_PER_EXPERT = (  # (at most this many rows per expert on average, config), ascending; the last serves all
    (16, MoeConfig(16, 32, 128)),
    (64, MoeConfig(64, 64, 64, num_warps=4, num_stages=4)),
    (float("inf"), MoeConfig(64, 128, 64, num_warps=8, num_stages=4)),
)
# FP8 experts (half the bytes per tile) while experts get at most 16 rows: a wider column tile
FP8_DECODE = MoeConfig(16, 64, 128)
W8A8_BY_ROWS = (  # the W8A8 kernels (triton_moe_w8a8.py): block_k is 128, the up GEMM's block_n 128
    (16, MoeConfig(16, 128, 128, num_warps=4, num_stages=3)),
    (float("inf"), MoeConfig(32, 128, 128, num_warps=4, num_stages=4)),
)


# int4 experts: where experts get more rows than this on average, a step dequantizes them once into x's dtype and
# runs the bf16 kernels, since the int4 kernels dequantize each weight tile again for every block of rows
INT4_DEQUANTIZE_ROWS = 256


def int4_dequantize_once(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether a step of ``num_tokens`` tokens dequantizes its int4 experts once (``INT4_DEQUANTIZE_ROWS``)."""
    return num_tokens * top_k / num_experts > INT4_DEQUANTIZE_ROWS


def choose(num_tokens: int, top_k: int, num_experts: int, fp8: bool = False, w8a8: bool = False) -> MoeConfig:
    """The tiles for a step of ``num_tokens`` tokens routed to ``top_k`` of ``num_experts`` experts each (``fp8``:
    FP8 experts; ``w8a8``: in the W8A8 kernels)."""
    rows = num_tokens * top_k / num_experts
    if w8a8:
        return next(cfg for limit, cfg in W8A8_BY_ROWS if rows <= limit)
    if fp8 and rows <= BY_ROWS_PER_EXPERT[0][0]:
        return FP8_DECODE
    return next(cfg for limit, cfg in BY_ROWS_PER_EXPERT if rows <= limit)
