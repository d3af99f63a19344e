"""Which decode matmuls run the Triton skinny kernel, and with which launch parameters.

The table is data measured on the GPU, not guessed: ``benchmarks/matmul_sweep.py`` times every candidate
configuration of ``triton_matmul.py`` against cuBLAS for each weight shape of a model and each decode bucket,
and writes ``matmul_tuned.json`` (beside this file) with the winners.  Entries are keyed by the GPU's compute
capability, then by ``"N_OUT,K,silu"``; each holds ``[max_m, config or null]`` pairs in ascending ``max_m``
(null: cuBLAS won).  A shape, batch or GPU without an entry runs cuBLAS (``F.linear``), as does every fp32
matmul (so fp32 results stay those of torch) and anything when ``NANOVLLM_MATMUL=cublas``.
``NANOVLLM_MATMUL_TABLE=path`` reads another table.
"""
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

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


def table_key(n_out: int, k: int, silu_mul: bool) -> str:
    return f"{n_out},{k},{int(silu_mul)}"


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


def choose(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool) -> MatmulConfig | None:
    """The Triton config for ``x @ weight.T`` on this GPU, or None for cuBLAS."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return None
    if os.environ.get("NANOVLLM_MATMUL", "auto") == "cublas":
        return None
    m, k = x.shape
    n_out = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    rows = _load(os.environ.get("NANOVLLM_MATMUL_TABLE") or str(TABLE_PATH)).get(_arch(x.device), {}).get(
        table_key(n_out, k, silu_mul), ())
    for max_m, cfg in rows:
        if m <= max_m:
            return cfg if cfg is not None and cfg.fits(m, n_out, k) else None
    return None


def triton_row_limits(device: torch.device) -> list[int]:
    """Every row count at which some shape's Triton config of this GPU's table ends (ascending): running each
    once compiles every config a step of at most that many rows can pick."""
    if device.type != "cuda" or os.environ.get("NANOVLLM_MATMUL", "auto") == "cublas":
        return []
    table = _load(os.environ.get("NANOVLLM_MATMUL_TABLE") or str(TABLE_PATH)).get(_arch(device), {})
    return sorted({max_m for rows in table.values() for max_m, cfg in rows if cfg is not None})
