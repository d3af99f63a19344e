"""The paged KV cache: how many blocks it gets, and its tensors.

Layout (shared by every attention implementation, ``nanovllm/kernels/reference.py``): per layer one K and one V
tensor ``[num_blocks, num_kv_heads, block_size, head_dim]``, separate tensors, never views of one buffer (Inductor
updates a mutated graph input in place only when it is not a view of a larger base); heads and size per layer where
a model gives them (``layer_kv_shapes()``, Gemma 4), a layer given None keeping a 0-block cache (KV sharing).
Linear-attention layers keep state pools instead (``KVCacheSpec.states``), taken first; sliding-window layers a
pool of blocks of their own (``plan_window_pool``), sized with the full one in the same budget.

Sizing: a fixed ``num_kvcache_blocks``; else, where the platform measures memory, what is left of
``gpu_memory_utilization`` after the weights and the peak of a probe step (the largest prefill and the sampler at
full batch), the probe's temporary cache counted as free; else ``DEFAULT_KV_BYTES``. When that is short of one
sequence of ``max_model_len`` tokens (the count agreed by every rank of a tensor-parallel group), garbage is
collected (an engine dropped in a reference cycle holds memory until then) and memory measured again, on every rank;
if it is still short, the error names the other live engines of the process (``register_engine``) and their bytes.
"""
import gc
import math
import weakref
from typing import Callable

import torch

from nanovllm.engine.window_blocks import pool_size, window_bound
from nanovllm.logger import logger

DEFAULT_KV_BYTES = 1 << 30  # where memory cannot be measured (CPU)


class KVCacheSpec:
    """The shape of one engine's cache: layers, KV heads, head size, block size and dtype; for a hybrid model
    (``cache_layout``) also, per linear-attention layer, the shapes of its state pools, which hold
    ``num_state_slots`` rows (set before the cache is sized; ``grow_states`` may add snapshot slots once the
    budget is measured) in ``state_dtype`` (the recurrent
    state always in float32); for a model with sliding windows (``windows``, per layer) the window pool's W and
    bounds, once ``plan_window_pool`` gave them one; ``shapes``: per layer (KV heads, head size), or None where the
    layer keeps no cache (default: ``num_kv_heads`` and ``head_dim`` in every layer)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 states: list | None = None, state_dtype: torch.dtype | None = None, windows: list | None = None,
                 shapes: list | None = None):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.shapes = list(shapes) if shapes is not None else [(num_kv_heads, head_dim)] * num_layers
        self.block_size, self.dtype = block_size, dtype
        self.states = states or [None] * num_layers  # per layer: None (paged KV) or (conv shape, ssm shape)
        self.state_dtype = state_dtype or dtype
        self.num_state_slots = 0
        self.grow_states = None  # a hybrid model's: (measured budget, agree) -> more state slots (hybrid_state.py)
        self.windows = windows or [0] * num_layers  # per layer: its sliding window W (0: full attention)
        self.window = 0  # the window pool's W (0: none, every attention layer's blocks in the full pool)
        self.window_bound = self.window_kept = 0  # window blocks running sequences may hold; more kept for hits
        self.free_full_blocks = 0  # full blocks where they cost nothing (every attention layer windowed)
        # a pool that may run out (``pressured``): its blocks are the full ones' times window_need / full_need (a
        # sequence's window and step blocks over its blocks at max_model_len), at least those of one sequence
        self.pressured, self.window_need, self.full_need, self.step_blocks = False, 0, 1, 0

    @classmethod
    def of_model(cls, model, block_size: int, dtype: torch.dtype) -> "KVCacheSpec":
        """The cache a built model (``nanovllm.models.build_model``) needs: its layers, this rank's KV heads (under
        tensor parallelism) and head size, a hybrid model's state pools, and the windows of a model that declares
        them (``layer_windows()``, per layer; its sliding layers read ``StepInputs.kv_tables``)."""
        a = model.args
        layout = getattr(model, "cache_layout", None)
        # a model whose sliding layers take their tables from ``StepInputs.kv_tables`` says so with its windows
        windows = model.layer_windows() if hasattr(model, "layer_windows") else None  # (every decoder's do)
        if layout is None:
            shapes = model.layer_kv_shapes() if hasattr(model, "layer_kv_shapes") else None
            return cls(a.num_layers, model.model.layers[0].self_attn.num_kv_heads, a.head_dim, block_size, dtype,
                       windows=windows, shapes=shapes)
        attn = model.attention_layer()
        return cls(a.num_layers, attn.num_kv_heads, attn.head_dim, block_size, dtype, layout(),
                   model.model.embed_tokens.weight.dtype, windows)

    def plan_window_pool(self, config, rows_per_sequence: int = 1) -> None:
        """Give the sliding-window layers a pool of their own (of W the largest window), sized never to run out
        while sequences run (``window_blocks.window_bound``; a verify step has ``rows_per_sequence`` rows a sequence),
        with as many blocks again as ``max_num_seqs`` windows take kept for prefix hits; none where no window is
        shorter than ``max_model_len``.  Where a budget ``plan_num_blocks`` sizes holds no more full blocks with it
        than without, the pool may run out instead (``pressured``, ``num_window_blocks``), or, if that saves nothing
        either, is dropped (a fixed count keeps it)."""
        windows = [w for w, s in zip(self.windows, self.states) if s is None and w]
        if not windows or max(windows) >= config.max_model_len:
            return
        self.window = w = max(windows)
        seqs, rows = config.max_num_seqs, rows_per_sequence
        self.window_bound = window_bound(w, self.block_size, seqs, max(config.max_step_tokens, seqs * rows), rows - 1)
        self.window_kept = seqs * (-(-(w - 1) // self.block_size) + 1)
        self.window_need = -(-(w - 1 + rows - 1) // self.block_size) + 2
        self.full_need = -(-config.max_model_len // self.block_size)
        self.step_blocks = -(-max(config.max_step_tokens, seqs * rows) // self.block_size)
        # every attention layer windowed (Mistral): a full block holds no KV, only a table entry, so as many as
        # every running sequence at max_model_len needs, and as many again for prefix hits
        self.free_full_blocks = 2 * seqs * -(-config.max_model_len // self.block_size)

    def in_window_pool(self, layer: int) -> bool:
        return bool(self.window and self.windows[layer]) and self.states[layer] is None

    def num_window_blocks(self, num_blocks: int) -> int:
        """Blocks of the window pool (its null block included) beside ``num_blocks`` full ones; 0 without one."""
        if not self.window:
            return 0
        if self.pressured:  # full and window pools run out together for sequences of max_model_len
            share = -(-num_blocks * self.window_need // self.full_need)
            return min(max(share, self.window_need + self.step_blocks), self.window_bound) + 1
        return pool_size(self.window_bound, self.window_kept, num_blocks)

    def _pool_layers(self, window: bool) -> list[int]:
        """The layers with blocks in the window pool (``window``) or in the full one."""
        return [i for i, s in enumerate(self.states)
                if s is None and self.shapes[i] is not None and self.in_window_pool(i) == window]

    @property
    def attention_layers(self) -> int:
        """Layers with blocks in the full pool."""
        return len(self._pool_layers(False))

    def _block_bytes(self, layers: list[int]) -> int:
        return 2 * sum(h * d for h, d in (self.shapes[i] for i in layers)) * self.block_size * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self._block_bytes(self._pool_layers(False))

    @property
    def window_layers(self) -> int:
        """Layers with blocks in the window pool."""
        return len(self._pool_layers(True))

    @property
    def bytes_per_window_block(self) -> int:
        return self._block_bytes(self._pool_layers(True))

    def blocks_within(self, budget: int, extra: int = 0, pooled: bool = True) -> int:
        """The most full blocks (each with ``extra`` bytes more: a draft model's) that fit in ``budget`` bytes beside
        their window pool, or with none (``pooled`` False: every attention layer's blocks in the full pool)."""
        per_block = self.bytes_per_block + extra
        if not self.window or not pooled:
            return max(0, budget // (per_block + (self.bytes_per_window_block if self.window else 0)))
        if self.pressured:  # the most that fit (the bytes grow with the count): a binary search
            low, high = 0, budget // per_block if per_block else self.free_full_blocks
            while low < high:
                mid = (low + high + 1) // 2
                fits = mid * per_block + self.num_window_blocks(mid) * self.bytes_per_window_block <= budget
                low, high = (mid, high) if fits else (low, mid - 1)
            return low
        window, fixed = self.bytes_per_window_block, (self.window_kept + 1) * self.bytes_per_window_block
        n = (budget - fixed) // (per_block + window)  # while the pool grows with the full one (pool_size)
        if n >= self.window_bound:
            if per_block == 0:  # no layer in the full pool: its blocks cost nothing once the window pool fits
                return max(self.window_bound, self.free_full_blocks)
            n = max(self.window_bound, (budget - fixed - self.window_bound * window) // per_block)
        return max(0, n)

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    @property
    def bytes_per_state_slot(self) -> int:
        """One slot of every state pool: a sequence's convolution and recurrent states in all layers."""
        return sum(math.prod(conv) * self.state_dtype.itemsize + math.prod(ssm) * 4
                   for conv, ssm in (s for s in self.states if s is not None))

    @property
    def state_bytes(self) -> int:
        return self.num_state_slots * self.bytes_per_state_slot

    def allocate(self, num_blocks: int, device, num_window_blocks: int | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed (K, V) tensors per attention layer, of ``num_blocks`` blocks, or in the window pool
        ``num_window_blocks`` (default: ``num_window_blocks(num_blocks)``; none for a layer without a cache);
        zeroed (convolution, recurrent) state pools per linear one."""
        window = self.num_window_blocks(num_blocks) if num_window_blocks is None else num_window_blocks
        out = []
        for i, state in enumerate(self.states):
            if state is None:
                heads, dim = self.shapes[i] or (self.num_kv_heads, self.head_dim)
                blocks = 0 if self.shapes[i] is None else window if self.in_window_pool(i) else num_blocks
                shape = (blocks, heads, self.block_size, dim)
                out.append((torch.zeros(shape, dtype=self.dtype, device=device),
                            torch.zeros(shape, dtype=self.dtype, device=device)))
            else:
                n = self.num_state_slots
                out.append((torch.zeros((n, *state[0]), dtype=self.state_dtype, device=device),
                            torch.zeros((n, *state[1]), dtype=torch.float32, device=device)))
        return out


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
    extra = draft.bytes_per_block if draft is not None else 0

    def counted(budget: int) -> int:  # full blocks in ``budget``, in one size on every rank (agreed)
        spec.pressured = False
        pooled = agree(spec.blocks_within(budget, extra))
        unpooled = agree(spec.blocks_within(budget, extra, pooled=False)) if spec.window else 0
        if spec.window and unpooled >= pooled:  # a pool that never runs out saves nothing: one that may
            spec.pressured = True
            pooled = agree(spec.blocks_within(budget, extra))
            if unpooled >= pooled:  # still nothing saved (a window near max_model_len): every layer in the full pool
                spec.window, spec.pressured = 0, False
                return unpooled
        return pooled

    def measured() -> int:  # what the state pools (hybrid models: maybe grown into the budget) leave to the blocks
        budget = _measure(platform, utilization, probe)
        if spec.grow_states is not None:
            spec.grow_states(budget, agree)
        return counted(budget - spec.state_bytes)

    if fixed is not None:
        num_blocks = agree(fixed)
    elif platform.measures_memory:
        num_blocks = measured()
        if num_blocks < max_blocks_per_seq:  # every rank alike (agreed): collect, maybe a dropped engine, and retry
            gc.collect()
            num_blocks = measured()
    else:
        num_blocks = counted(DEFAULT_KV_BYTES)
    per_block = spec.bytes_per_block + extra
    if num_blocks < max_blocks_per_seq:
        problem = (f"the KV cache holds {num_blocks} blocks of {spec.block_size} tokens, but one sequence of "
                   f"max_model_len={max_model_len} needs {max_blocks_per_seq}")
        if spec.state_bytes:
            problem += (f" (the linear-attention states of {spec.num_state_slots} slots take "
                        f"{spec.state_bytes / 2**30:.2f} GiB first; lower max_num_seqs to free some)")
        if draft is not None:
            problem += f" (the draft model's cache takes {draft.bytes_per_block} of each block's {per_block} bytes)"
        if spec.window:
            problem += (f" (the sliding-window layers' pool of {spec.num_window_blocks(num_blocks)} blocks takes "
                        f"{spec.num_window_blocks(num_blocks) * spec.bytes_per_window_block / 2**30:.2f} GiB; "
                        f"lower max_num_seqs to shrink it)")
        engines, held = held_by_engines(platform.device)
        if engines:
            raise ValueError(
                f"{problem}: {engines} other engine(s) of this process still hold {held / 2**30:.2f} GiB on "
                f"{platform.device}; close them (LLM.close()) or drop every reference to them first")
        raise ValueError(f"{problem}; lower max_model_len, raise num_kvcache_blocks or gpu_memory_utilization")
    if spec.window:
        bs, window_blocks = spec.block_size, spec.num_window_blocks(num_blocks)
        sizing = (f"may run out: {spec.window_need} a sequence to {spec.full_need} full ones, the scheduler "
                  f"preempts for them; never-run-out needs {spec.window_bound} + {spec.window_kept} kept"
                  if spec.pressured else f"never runs out: at most {min(spec.window_bound, num_blocks)} held by "
                  f"running sequences, the rest kept for prefix hits")
        logger.info("KV cache: %d full-attention layers hold %d tokens (%d blocks); %d sliding layers (window %d) "
                    "%d tokens (%d blocks; the window pool %s)", spec.attention_layers, num_blocks * bs, num_blocks,
                    spec.window_layers, spec.window, (window_blocks - 1) * bs, window_blocks - 1, sizing)
    return num_blocks
