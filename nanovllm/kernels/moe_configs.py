"""Which tiles the Triton fused MoE (``triton_moe.py``) takes for a step: chosen by the mean number of rows each
expert gets, ``T * top_k / E``, since that, not the token count alone, says how full a block of ``block_m`` rows is.

``benchmarks/moe_kernel.py`` times five tile sets on Qwen3-30B-A3B's experts (E 128, top-8, H 2048, I 768) and on
Mixtral-8x7B's (E 8, top-2, H 4096, I 14336) at T = 1 to 4096 (docs/PERFORMANCE.md has the tables).  On an H100:
up to 16 rows per expert the 16 x 32 x 128 tiles were the fastest, or within 6% of it, on both shapes; at 64 rows
per expert the 64 x 64 x 64 tiles (Mixtral at T = 256: 1.05 ms against 2.01 ms for the small tiles; Qwen3 at
T = 1024); beyond, 64 x 128 x 64.  A gather form (one GEMV per token and expert, no sorted layout) lost to the
grouped GEMM at every size on both shapes and was removed.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # rows per block
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


BY_ROWS_PER_EXPERT = (  # (at most this many rows per expert on average, config), ascending; the last serves all
    (16, MoeConfig(16, 32, 128)),
    (64, MoeConfig(64, 64, 64, num_warps=4, num_stages=4)),
    (float("inf"), MoeConfig(64, 128, 64, num_warps=8, num_stages=4)),
)


def choose(num_tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    """The tiles for a step of ``num_tokens`` tokens routed to ``top_k`` of ``num_experts`` experts each."""
    rows = num_tokens * top_k / num_experts
    return next(cfg for limit, cfg in BY_ROWS_PER_EXPERT if rows <= limit)
