"""Which decode matmuls run the Triton skinny kernel, and with which launch parameters.

The table is data measured on the GPU, not guessed: ``benchmarks/matmul_sweep.py`` times every candidate
configuration of ``triton_matmul.py`` against cuBLAS for each weight shape of a model and each decode bucket,
and writes ``matmul_tuned.json`` (beside this file) with the winners.  Entries are keyed by the GPU's compute
capability, then by ``"N_OUT,K,silu"`` (an FP8 weight's: ``",fp8:GROUP"`` added, from ``matmul_sweep --fp8``);
each holds ``[max_m, config or null]`` pairs in ascending ``max_m`` (null: cuBLAS won; FP8: dequantize + cuBLAS).
A shape, batch or GPU without an entry runs cuBLAS (``F.linear``), as does every fp32
matmul (so fp32 results stay those of torch) and everything when ``KernelOptions.triton_matmul`` is off
(``NANOVLLM_MATMUL=cublas``).  ``KernelOptions.matmul_table`` (``NANOVLLM_MATMUL_TABLE``) names another table.
Only the CUDA implementation of ``nanovllm::linear`` (``cuda.py``) asks ``choose``, and for an FP8 weight
``choose_fp8`` (a shape without FP8 rows: ``fp8_config``'s tiles by row count, measured on the H100).
"""
import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanovllm.kernels.options import current_options

TABLE_PATH = Path(__file__).with_name("matmul_tuned.json")


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    swap: bool = False
    num_warps: int = 4
    num_stages: int = 4

    def fits(self, m: int, n_out: int, k: int) -> bool:
        """Whether this config can run the shape (K must split evenly into whole BLOCK_K steps)."""
        return k % (self.split_k * self.block_k) == 0

    def scales_per_tile(self, k: int, group: int) -> bool:
        """Whether an FP8 weight's scale changes inside one split's K range (``group`` columns per scale), so
        that every K-tile's product is scaled on its own rather than the split's sum once."""
        return group < k and group % (k // self.split_k) != 0

    def fits_fp8(self, k: int, group: int) -> bool:
        """Whether this config can run an FP8 weight of K columns in groups of ``group``: ``fits``, and no K-tile
        straddles two groups (BLOCK_K divides the group) where the scale changes inside a split."""
        return k % (self.split_k * self.block_k) == 0 and (not self.scales_per_tile(k, group)
                                                           or group % self.block_k == 0)


def table_key(n_out: int, k: int, silu_mul: bool, group: int | None = None) -> str:
    """A shape's key; an FP8 weight's (``group`` columns per scale) adds ``fp8:G`` (G: the group, at most K)."""
    key = f"{n_out},{k},{int(silu_mul)}"
    return key if group is None else f"{key},fp8:{min(group, k)}"


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    raw = json.loads(p.read_text())
    return {arch: {key: [(max_m, MatmulConfig(**cfg) if cfg else None) for max_m, cfg in rows]
                   for key, rows in shapes.items()}
            for arch, shapes in raw.get("arch", {}).items()}


def _arch(device: torch.device) -> str:
    """The compute capability as the table keys it ("9.0")."""
    from nanovllm.kernels.triton_common import device_capability  # triton: present wherever CUDA is
    return "%d.%d" % device_capability(device)


def _table(device: torch.device) -> dict:
    """This GPU's part of the table in force: ``{"N_OUT,K,silu": [(max_m, config or None), ...]}``."""
    return _load(current_options().matmul_table or str(TABLE_PATH)).get(_arch(device), {})


def choose(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool) -> MatmulConfig | None:
    """The Triton config for ``x @ weight.T`` (CUDA tensors) on this GPU, or None for cuBLAS."""
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or not current_options().triton_matmul:
        return None
    m, k = x.shape
    n_out = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    cfg = _row(_table(x.device).get(table_key(n_out, k, silu_mul), ()), m)
    return cfg if cfg is not None and cfg.fits(m, n_out, k) else None


def _row(rows, m: int) -> MatmulConfig | None:
    """The config of the first of a table's ``(max_m, config or None)`` rows that takes ``m`` rows, or None."""
    return next((cfg for max_m, cfg in rows if m <= max_m), None)


def triton_row_limits(device: torch.device) -> list[int]:
    """Every row count at which some shape's Triton config of this GPU's table ends (ascending): running each
    once compiles every config a step of at most that many rows can pick."""
    options = current_options()
    if device.type != "cuda" or not options.triton_matmul or options.reference_kernels:
        return []
    return sorted({max_m for rows in _table(device).values() for max_m, cfg in rows if cfg is not None})


# Past this many rows an FP8 projection dequantizes its weight once and runs cuBLAS: measured on the H100 (the
# FP8 weights table of docs/PERFORMANCE.md), the kernel below loses to that from 64-128 rows on Qwen3-0.6B shapes.
FP8_TRITON_MAX_M = 64
_FP8_MAX_SPLIT = 8


# (max_m, tile) in ascending max_m, the fastest measured at M = 1, 16 and 64 on Qwen3-0.6B and -8B shapes; the last
# also serves a larger M (fp8_config, asked directly).  Split K and BLOCK_K are chosen per shape (fp8_config).
_FP8_TILES = ((16, MatmulConfig(16, 64, 128, num_warps=4, num_stages=4)),
              (32, MatmulConfig(32, 64, 128, num_warps=4, num_stages=4)),
              (FP8_TRITON_MAX_M, MatmulConfig(64, 64, 128, num_warps=4, num_stages=4)))


def choose_fp8(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool, group: int) -> MatmulConfig | None:
    """The Triton config for ``x @ dequantize(weight).T`` with an FP8 ``weight`` in groups of ``group`` columns
    (``weight_quant.py``), or None: dequantize once and run cuBLAS.  A shape the table measured in FP8
    (``table_key`` with the group; ``matmul_sweep --fp8``) takes its rows; any other, ``fp8_config`` up to
    ``FP8_TRITON_MAX_M`` rows.  fp32, no fitting config or ``KernelOptions.triton_matmul`` off: None."""
    if x.dtype not in (torch.bfloat16, torch.float16) or not current_options().triton_matmul:
        return None
    m, k = x.shape
    n_out = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    rows = _table(x.device).get(table_key(n_out, k, silu_mul, group)) if x.is_cuda else None
    if rows is not None:  # measured for this shape: the row's tiles, or dequantize + cuBLAS (null, or past them)
        cfg = _row(rows, m)
        return cfg if cfg is not None and cfg.fits_fp8(k, group) else None
    if m > FP8_TRITON_MAX_M:
        return None
    from nanovllm.kernels.triton_common import _num_sms  # triton: present wherever this kernel runs
    return fp8_config(m, n_out, k, group, _num_sms(x.device))


def fp8_config(m: int, n_out: int, k: int, group: int, num_sms: int) -> MatmulConfig | None:
    """The FP8 kernel's config for ``m`` rows of an ``[n_out, k]`` output in groups of ``group``, or None if none
    fits K: the measured tile by M; split K, up to ``_FP8_MAX_SPLIT`` ways, while a decode-sized output has fewer
    blocks than ``num_sms``; the largest BLOCK_K (128, 64, 32, 16) that fits K and the group."""
    tile = next((t for max_m, t in _FP8_TILES if m <= max_m), _FP8_TILES[-1][1])
    blocks = -(-n_out // tile.block_n) * -(-m // tile.block_m)
    split = 1
    if m <= 64:
        while blocks * split < num_sms and split < _FP8_MAX_SPLIT:
            split *= 2
    for block_k in (b for b in (128, 64, 32, 16) if b <= tile.block_k):
        for s in (split >> i for i in range(split.bit_length())):  # split, split / 2, ..., 1
            cfg = replace(tile, block_k=block_k, split_k=s)
            if cfg.fits_fp8(k, group):
                return cfg
    return None
