"""The paged KV cache: how many blocks it gets, and its tensors.

Layout (shared by every attention implementation, ``nanovllm/kernels/reference.py``): per layer one K and one V
tensor ``[num_blocks, num_kv_heads, block_size, head_dim]``, separate tensors, never views of one buffer (Inductor
updates a mutated graph input in place only when it is not a view of a larger base).

Sizing: a fixed ``num_kvcache_blocks``; else, where the platform measures memory, what is left of
``gpu_memory_utilization`` after the weights and the peak of a probe step (the largest prefill and the sampler at
full batch), the probe's temporary cache counted as free; else ``DEFAULT_KV_BYTES``. When that is short of one
sequence of ``max_model_len`` tokens (the count agreed by every rank of a tensor-parallel group), garbage is
collected (an engine dropped in a reference cycle holds memory until then) and memory measured again, on every rank;
if it is still short, the error names the other live engines of the process (``register_engine``) and what they
hold.
"""
import gc
import weakref
from typing import Callable

import torch

DEFAULT_KV_BYTES = 1 << 30  # where memory cannot be measured (CPU)


class KVCacheSpec:
    """The shape of one engine's cache: layers, KV heads, head size, block size and dtype."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.dtype = block_size, dtype

    @classmethod
    def of_model(cls, model, block_size: int, dtype: torch.dtype) -> "KVCacheSpec":
        """The cache a built model (``nanovllm.models.build_model``) needs: its layers, this rank's KV heads (under
        tensor parallelism) and head size."""
        a = model.args
        return cls(a.num_layers, model.model.layers[0].self_attn.num_kv_heads, a.head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.block_size * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    def allocate(self, num_blocks: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed (K, V) tensors per layer."""
        shape = (num_blocks, self.num_kv_heads, self.block_size, self.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=device),
                 torch.zeros(shape, dtype=self.dtype, device=device)) for _ in range(self.num_layers)]


_ENGINES: "weakref.WeakSet" = weakref.WeakSet()  # live engines' runners, for the error when memory is short


def register_engine(runner) -> None:
    """Note a live engine's runner (``device`` and ``device_bytes()``), weakly: a dropped engine leaves the set."""
    _ENGINES.add(runner)


def held_by_engines(device: torch.device) -> tuple[int, int]:
    """(live engines that hold memory on ``device``, the bytes they hold)."""
    held = [n for n in (e.device_bytes() for e in list(_ENGINES) if e.device == device) if n]
    return len(held), sum(held)


def _measure(platform, utilization: float, probe: Callable[[], list]) -> int:
    """Bytes the cache may take: the platform's answer after the probe step, plus the probe's temporary cache."""
    platform.reset_peak_memory()
    temporary = probe()
    platform.synchronize()
    return platform.available_kv_bytes(utilization) + sum(t.numel() * t.element_size() for kv in temporary for t in kv)


def plan_num_blocks(spec: KVCacheSpec, *, fixed: int | None, utilization: float, platform,
                    max_blocks_per_seq: int, max_model_len: int, probe: Callable[[], list],
                    agree: Callable[[int], int] = lambda n: n, draft: KVCacheSpec | None = None) -> int:
    """The number of KV blocks to allocate.  ``probe`` runs the step at its most memory-hungry shape with a
    temporary cache and returns that cache (a list of (K, V)); it is only called where the platform measures
    memory.  ``agree`` turns a rank's count into the group's (the smallest, under tensor parallelism), on every
    path: whether to collect garbage and probe again is decided on the agreed count, so every rank runs the same
    probes and collectives and raises alike, and a rank that failed to build is seen here by all.  ``draft``: a
    draft model's cache of as many blocks (``drafter.py``), sized in the same budget."""
    per_block = spec.bytes_per_block + (draft.bytes_per_block if draft is not None else 0)

    def measured() -> int:
        return agree(max(0, _measure(platform, utilization, probe) // per_block))

    if fixed is not None:
        num_blocks = agree(fixed)
    elif platform.measures_memory:
        num_blocks = measured()
        if num_blocks < max_blocks_per_seq:  # every rank alike (agreed): collect, maybe a dropped engine, and retry
            gc.collect()
            num_blocks = measured()
    else:
        num_blocks = agree(DEFAULT_KV_BYTES // per_block)
    if num_blocks < max_blocks_per_seq:
        problem = (f"the KV cache holds {num_blocks} blocks of {spec.block_size} tokens, but one sequence of "
                   f"max_model_len={max_model_len} needs {max_blocks_per_seq}")
        if draft is not None:
            problem += f" (the draft model's cache takes {draft.bytes_per_block} of each block's {per_block} bytes)"
        engines, held = held_by_engines(platform.device)
        if engines:
            raise ValueError(
                f"{problem}: {engines} other engine(s) of this process still hold {held / 2**30:.2f} GiB on "
                f"{platform.device}; close them (LLM.close()) or drop every reference to them first")
        raise ValueError(f"{problem}; lower max_model_len, raise num_kvcache_blocks or gpu_memory_utilization")
    return num_blocks
