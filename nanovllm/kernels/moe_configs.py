"""Which form and tile sizes the Triton fused MoE (``triton_moe.py``) takes for a step of T tokens.

Two forms:

* ``gather``: one program per (token, k) pair and column tile, a GEMV over that pair's expert; no routing
  layout at all (3 launches: routing, up, down with the top-k sum fused).  Each pair reads its expert's weights
  (L2 serves repeats), which wins when pairs rarely share an expert: decode batches of a few sequences.
* ``grouped``: pairs sorted by expert into ``block_m``-row blocks (``triton_moe_align.py``), then a grouped GEMM
  per block that reads each expert tile once per block (5 launches: routing, align, up, down, top-k sum).

``benchmarks/moe_kernel.py`` times both forms and several tiles at T = 1, 16, 64, 256 on Qwen3-30B-A3B's shape
(E 128, top-8, H 2048, I 768).  On an H100 the grouped form with 16 x 32 x 128 tiles was the fastest at all four,
and the gather form slower than every grouped tile (docs/PERFORMANCE.md has the table); so the grouped form serves
every size and the gather form is only taken when ``gather_max_tokens`` asks for it (it
has not been timed on other shapes, e.g. Mixtral's 8 large experts).  Above 256 tokens the tiles are the peers'
untimed defaults (larger ``block_m`` for prefill).
"""
from dataclasses import dataclass

GATHER_MAX_TOKENS = 0  # T at or below: the gather form (it lost at every T measured)


@dataclass(frozen=True)
class MoeConfig:
    form: str  # "gather" or "grouped"
    block_m: int  # rows per block (grouped); 1 for gather
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


GATHER = MoeConfig("gather", 1, 32, 128)
GROUPED_BY_TOKENS = (  # (max T, config), ascending; the last serves every larger T
    (256, MoeConfig("grouped", 16, 32, 128)),
    (512, MoeConfig("grouped", 32, 64, 64)),
    (2048, MoeConfig("grouped", 64, 64, 64, num_warps=4, num_stages=4)),
    (1 << 62, MoeConfig("grouped", 64, 128, 64, num_warps=8, num_stages=4)),
)


def choose(num_tokens: int, gather_max_tokens: int = GATHER_MAX_TOKENS) -> MoeConfig:
    """The form and tiles for a step of ``num_tokens`` tokens."""
    if num_tokens <= gather_max_tokens:
        return GATHER
    for max_tokens, cfg in GROUPED_BY_TOKENS:
        if num_tokens <= max_tokens:
            return cfg
    raise AssertionError("the last entry serves every size")
