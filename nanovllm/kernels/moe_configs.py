"""Which tiles the Triton fused MoE (``triton_moe.py``) takes for a step: chosen by the mean number of rows each
expert gets, ``T * top_k / E``, since that, not the token count alone, says how full a block of ``block_m`` rows is.

Each way experts run (a mode: ``bf16``, ``fp8`` weight-only, ``w8a8``, ``int4``, ``mxfp4``) has buckets of that
mean, each with a tile set.  Measured tables come first: ``benchmarks/moe_kernel.py --write-table`` times the
candidates on a GPU and writes the winners to ``moe_tuned.json`` beside this file (``KernelOptions.moe_table``,
``NANOVLLM_MOE_TABLE``, names another), keyed by compute capability, then ``"E,I,H"`` (experts, intermediate,
hidden), then mode, with ``int4_once_rows``: past that mean, int4 and MXFP4 experts are dequantized once into the
bf16 kernels (null: never).  A GPU or shape without an entry, and the CPU, take ``DEFAULTS`` and
``INT4_DEQUANTIZE_ROWS``.
"""
import functools
import math
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nanovllm.kernels.options import current_options

TABLE_PATH = Path(__file__).with_name("moe_tuned.json")


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # rows per block
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    swap: bool | None = None  # the weight tile is the MMA's A operand (triton_moe_tiles.py); None: the kernel's rule
    down: "MoeConfig | None" = None  # the down GEMM's own tiles (the same block_m: both read one layout); None: these

    def __post_init__(self):
        if self.down is not None and (self.down.block_m != self.block_m or self.down.down is not None):
            raise ValueError(f"down tiles {self.down} need block_m {self.block_m} and no down of their own")

    @property
    def down_tiles(self) -> "MoeConfig":
        """The tiles the down GEMM runs with."""
        return self.down or self

    def launch(self, swap_below: int = 0) -> dict:
        """A GEMM's launch keywords from these tiles (block_n apart): ``swap`` None swaps below ``swap_below`` rows."""
        swap = self.block_m < swap_below if self.swap is None else self.swap
        return dict(SWAP=swap, num_warps=self.num_warps, num_stages=self.num_stages)

    @classmethod
    def from_json(cls, raw: dict) -> "MoeConfig":
        """A config as ``entry_json`` stores it (``down`` nested, or null or absent)."""
        down = raw.get("down")
        return cls(**dict(raw, down=None if down is None else cls(**down)))


BY_ROWS_PER_EXPERT = (  # (at most this many rows per expert on average, config), ascending; the last serves all
    (16, MoeConfig(16, 32, 128)),
    (64, MoeConfig(64, 64, 64, num_warps=4, num_stages=4)),
    (float("inf"), MoeConfig(64, 128, 64, num_warps=8, num_stages=4)),
)
DEFAULTS = {  # per mode; FP8 experts (half the bytes per tile) take a wider column tile at decode sizes
    "bf16": BY_ROWS_PER_EXPERT,
    "int4": BY_ROWS_PER_EXPERT,
    "mxfp4": BY_ROWS_PER_EXPERT,
    "fp8": ((16, MoeConfig(16, 64, 128)),) + BY_ROWS_PER_EXPERT[1:],
    # block_k 128, the up GEMM's block_n 128 (one activation group); an H100's best at Qwen3-30B-A3B's shape
    "w8a8": ((16, MoeConfig(32, 64, 128, num_warps=8, num_stages=4, down=MoeConfig(32, 64, 128, num_stages=4))),
             (float("inf"), MoeConfig(64, 256, 128, num_warps=8, swap=True,
                                      down=MoeConfig(64, 256, 128, num_warps=8, swap=False)))),
}
MODES = tuple(DEFAULTS)
# int4 experts: where experts get more rows than this on average, a step dequantizes them once into x's dtype and
# runs the bf16 kernels, since the int4 kernels dequantize each weight tile again for every block of rows
INT4_DEQUANTIZE_ROWS = 256


def table_key(num_experts: int, inter: int, hidden: int) -> str:
    return f"{num_experts},{inter},{hidden}"


@functools.lru_cache(maxsize=None)
def load(path: str) -> dict:
    """The table at ``path`` as written (``{}`` if there is none): ``{"arch": {cc: {key: entry}}}``."""
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


def table_path() -> str:
    return current_options().moe_table or str(TABLE_PATH)


def tuned(arch: str | None, num_experts: int, inter: int, hidden: int) -> dict:
    """The table's entry for this shape on a GPU of compute capability ``arch`` ("9.0"; None: no GPU) ->
    ``{mode: ((max_rows, MoeConfig), ...), "int4_once_rows": rows or None}``, empty if it has none."""
    return {} if arch is None else _tuned(table_path(), arch, table_key(num_experts, inter, hidden))


@functools.lru_cache(maxsize=None)
def _tuned(path: str, arch: str, key: str) -> dict:
    raw = load(path).get("arch", {}).get(arch, {}).get(key, {})
    entry = {mode: tuple((float("inf") if limit is None else limit, MoeConfig.from_json(cfg))
                         for limit, cfg in raw[mode]) for mode in MODES if raw.get(mode)}
    if "int4_once_rows" in raw:
        entry["int4_once_rows"] = raw["int4_once_rows"]
    return entry


def entry_json(buckets, once_rows=None) -> dict:
    """A tuned entry as the table stores it (``buckets``: per mode, ``(max_rows, MoeConfig)`` ascending)."""
    out = {mode: [[None if limit == float("inf") else limit, asdict(cfg)] for limit, cfg in rows]
           for mode, rows in buckets.items()}
    return dict(out, int4_once_rows=once_rows) if "int4" in buckets else out


def choose(num_tokens: int, top_k: int, num_experts: int, mode: str = "bf16", entry: dict | None = None) -> MoeConfig:
    """The tiles for a step of ``num_tokens`` tokens routed to ``top_k`` of ``num_experts`` experts each, run as
    ``mode``; ``entry``: the measured table's for this shape and GPU (``tuned``), else ``DEFAULTS``."""
    rows = num_tokens * top_k / num_experts
    buckets = (entry or {}).get(mode) or DEFAULTS[mode]
    return next((cfg for limit, cfg in buckets if rows <= limit), buckets[-1][1])


def int4_dequantize_once(num_tokens: int, top_k: int, num_experts: int, entry: dict | None = None) -> bool:
    """Whether a step of ``num_tokens`` tokens dequantizes its int4 experts once: past the entry's
    ``int4_once_rows`` (None: never), else ``INT4_DEQUANTIZE_ROWS``, rows per expert."""
    limit = (entry or {}).get("int4_once_rows", INT4_DEQUANTIZE_ROWS)
    return limit is not None and num_tokens * top_k / num_experts > limit


def group_block_k(block_k: int, group: int, k: int) -> int | None:
    """The K tile over ``k`` columns of a weight quantized per ``group`` (FP8 or int4): ``block_k`` where every
    tile lies inside one group, else the largest power of two dividing both; None where that is below
    ``tl.dot``'s 16."""
    if group >= k or group % block_k == 0:
        return block_k
    tile = math.gcd(block_k, group)
    return tile if tile >= 16 else None


def group_supported(group: int, hidden: int, inter: int) -> bool:
    """Whether the kernels take quantized (FP8 or int4) experts of this ``group`` (else the twin must): some tile
    fits both GEMMs."""
    return group > 0 and all(group_block_k(16, group, k) for k in (hidden, inter))
