"""Owns the model, its KV cache and the device: turns a scheduled batch into ``StepInputs`` and tokens.

Steps go to an executor (``nanovllm/compile/executor.py``): eager, or graph mode with one compiled step
captured per decode batch-size bucket and per prefill token count.  Decode rows are padded up to the bucket
in both modes.  A prefill gets a trailing padding sequence (slot -1, context 0): of one token, or in graph
mode of as many tokens as pad the step to its prefill graph's size (``prepare_prefill``).  So the compiled
step never meets a size of 1 (which the compiler would specialise on and recompile for).  Block tables are
always ``max_blocks_per_seq`` wide, a static shape.

A step is ``launch``-ed (queued on the device; its tokens land in the device token buffer and are copied
to pinned host memory in the background) and later ``collect``-ed, so the engine can schedule and prepare
the next step while this one runs.
"""
import time

import numpy as np
import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.decode_inputs import DecodeInputBuilder
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import PENDING_TOKEN
from nanovllm.engine.step_inputs import StepInputs
from nanovllm.layers.sampler import sample
from nanovllm.logger import logger
from nanovllm.models.loader import load_weights
from nanovllm.models.registry import resolve_model_class
from nanovllm.platforms.base import Platform

_CPU_DEFAULT_KV_BYTES = 1 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, platform: Platform):
        # Start-up seconds per phase, for the "ready" log line and benchmarks/init_profile.py.
        self.init_phases: dict[str, float] = {}
        clock = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.init_phases[name] = round(now - clock, 2)
            clock = now

        self.config = config
        self.platform = platform
        self.device = platform.device
        hf = config.hf_config
        self.dtype = platform.resolve_dtype(config.dtype, hf.get("torch_dtype") or hf.get("dtype"))
        model_cls = resolve_model_class(hf)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_cls(hf)
        finally:
            torch.set_default_dtype(previous)
        phase("build_model")
        load_weights(self.model, config.model)
        self.model.eval().requires_grad_(False)
        phase("load_weights")
        self.vocab_size = self.model.args.vocab_size
        self.block_size = config.kvcache_block_size
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        # One row per running sequence for its newest sampled token, plus a scratch row (see StepInputs).
        self.scratch_slot = config.max_num_seqs
        self.token_buffer = torch.zeros(config.max_num_seqs + 1, dtype=torch.int64, device=self.device)
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        pin = self.device.type == "cuda"
        # Host buffers and decode staging sets go round a ring one longer than the engine's pipeline depth: a
        # launch reuses the ones of the launch ``ring`` before it, whose step the engine has collected by then.
        self._ring = config.pipeline_depth + 1
        self._host_tokens = [torch.zeros(config.max_num_seqs + 1, dtype=torch.int64, pin_memory=pin)
                             for _ in range(self._ring)]
        self._launches = 0
        self.num_blocks = self._size_kv_cache()
        self._allocate_kv_cache(self.num_blocks)
        phase("size_kv_cache")
        self.decode_builder = DecodeInputBuilder(self.device, self.block_size, self.max_blocks_per_seq,
                                                 self.scratch_slot)
        self.decode_prepare_time = 0.0  # host seconds spent building decode inputs (a statistic)
        self.executor = self._make_executor()
        self.mode = self.executor.mode
        phase("compile_and_capture" if self.mode == "graph" else "executor")
        if self.platform.supports_graph_capture and not self.executor.captures_every_prefill():
            self._warm_largest_prefill()
            phase("warm_largest_prefill")

    def _make_executor(self):
        from nanovllm.compile.executor import EagerExecutor, GraphExecutor
        if self.config.enforce_eager:
            return EagerExecutor(self)
        if not self.model.graph_capturable:
            logger.warning("%s runs eagerly: %s", type(self.model).__name__, self.model.not_capturable_reason)
            return EagerExecutor(self)
        return GraphExecutor(self)

    # ---- KV cache -------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        a = self.model.args
        return 2 * a.num_layers * a.num_kv_heads * a.head_dim * self.block_size * self.dtype.itemsize

    def _size_kv_cache(self) -> int:
        cfg = self.config
        if cfg.num_kvcache_blocks is not None:
            num_blocks = cfg.num_kvcache_blocks
        else:
            budget = self._measure_kv_budget()
            if budget is None:
                budget = _CPU_DEFAULT_KV_BYTES
            num_blocks = max(0, budget // self.kv_bytes_per_block())
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, but one sequence of "
                f"max_model_len={cfg.max_model_len} needs {self.max_blocks_per_seq}; lower max_model_len, raise "
                f"num_kvcache_blocks or gpu_memory_utilization")
        return num_blocks

    def _measure_kv_budget(self) -> int | None:
        """Run the largest prefill and sampler once and size the cache from what memory is left."""
        if not self.platform.supports_graph_capture:
            return None
        cfg = self.config
        self.platform.reset_peak_memory()
        seq_len = min(cfg.max_model_len, cfg.max_num_batched_tokens)
        num_seqs = max(1, min(cfg.max_num_seqs, cfg.max_num_batched_tokens // seq_len))
        blocks_each = -(-seq_len // self.block_size)
        self._allocate_kv_cache(num_seqs * blocks_each)
        tables = np.arange(num_seqs * blocks_each, dtype=np.int32).reshape(num_seqs, blocks_each)
        tokens = np.zeros(num_seqs * seq_len, dtype=np.int64)
        positions = np.tile(np.arange(seq_len), num_seqs)
        slots = (tables[:, :, None] * self.block_size + np.arange(self.block_size)).reshape(num_seqs, -1)[:, :seq_len]
        inputs = self._make_inputs(tokens, positions, slots.reshape(-1), tables,
                                   np.full(num_seqs, seq_len), np.arange(0, num_seqs * seq_len + 1, seq_len),
                                   np.arange(1, num_seqs + 1) * seq_len - 1, sampling=None)
        with torch.inference_mode():
            self.model(inputs.input_ids, inputs, self.kv_caches)
            logits = torch.zeros(cfg.max_num_seqs, self.vocab_size, device=self.device)
            z = torch.zeros(cfg.max_num_seqs, device=self.device)
            sample(logits, z + 1, z.long() + 5, z + 0.5, z.long(), z.long(), filtered=True)
        self.platform.synchronize()
        del self.kv_caches
        return self.platform.available_kv_bytes(cfg.gpu_memory_utilization)

    def _warm_largest_prefill(self) -> None:
        """Run the largest prefill step once (all padding: nothing is written), so that its activation memory
        sits in the caching allocator before the first generate.  Otherwise the first real prefill allocates
        it from the device: 5 allocations, about 30 ms, in the first timed run of bench.py on an H100."""
        cfg = self.config
        real = cfg.max_step_tokens
        tokens, rows = real + 1, min(cfg.max_num_seqs, real) + 1  # plus the trailing padding sequence
        with torch.inference_mode():
            self.executor.prefill(self.dummy_prefill_inputs(tokens, rows))
        self.platform.synchronize()

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        """One separate tensor per layer for K and one for V.

        They must not be views of one shared buffer: the compiled step mutates them through the KV store, and
        Inductor can update a mutated graph input in place only when it is not a view of a larger base;
        otherwise it clones the whole base and copies it back on every step.
        """
        a = self.model.args
        shape = (num_blocks, a.num_kv_heads, self.block_size, a.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(a.num_layers)]

    # ---- inputs ---------------------------------------------------------------------------------------
    @torch.inference_mode()  # inputs are always inference tensors, so compiled guards see one kind
    def _make_inputs(self, tokens, positions, slots, tables, context_lens, cu_seqlens, logits_indices,
                     sampling, out_slots=None, packed: bool = False, target: StepInputs | None = None) -> StepInputs:
        """Step inputs on the device from host arrays, or copied into ``target`` (a graph's static inputs, packed
        alike).  ``packed`` (real prefill steps) stages them in one pinned buffer: one asynchronous copy.
        Separate pageable copies would each make the host wait for the device to finish the step before (about
        10 ms per prefill step on an H100), so the host could not prepare and queue the next step while this
        one runs."""
        n = len(context_lens)
        if out_slots is None:
            out_slots = np.full(n, self.scratch_slot)
        if sampling is None:
            sampling = (np.zeros(n, np.float32), np.full(n, -1), np.ones(n, np.float32), np.zeros(n), np.zeros(n))
        temperature, top_k, top_p, seeds, sample_positions = sampling

        def t(x, dtype):
            return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)

        host = StepInputs(
            input_ids=t(tokens, torch.int64), token_slots=t(np.full(len(tokens), -1), torch.int64),
            positions=t(positions, torch.int64), slot_mapping=t(slots, torch.int64),
            block_tables=t(tables, torch.int32), context_lens=t(context_lens, torch.int32),
            cu_seqlens_q=t(cu_seqlens, torch.int32), logits_indices=t(logits_indices, torch.int64),
            temperature=t(temperature, torch.float32), top_k=t(top_k, torch.int64), top_p=t(top_p, torch.float32),
            seeds=t(seeds, torch.int64), sample_positions=t(sample_positions, torch.int64),
            out_slots=t(out_slots, torch.int64))
        if packed:
            host = host.packed_copy(pin_memory=self.device.type == "cuda")
        if target is not None:
            host.copy_into(target)
            return target
        return host if self.device.type == "cpu" else host.to(self.device)

    def _sampling_arrays(self, seqs, rows: int):
        temperature = np.zeros(rows, np.float32)
        top_k = np.full(rows, -1, np.int64)
        top_p = np.ones(rows, np.float32)
        seeds = np.zeros(rows, np.int64)
        positions = np.zeros(rows, np.int64)
        for i, seq in enumerate(seqs):
            p = seq.params
            temperature[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
            seeds[i], positions[i] = seq.seed, len(seq)
        return temperature, top_k, top_p, seeds, positions

    def _block_table_array(self, seqs, rows: int, width: int) -> np.ndarray:
        tables = np.zeros((rows, width), np.int32)
        for i, seq in enumerate(seqs):
            tables[i, :len(seq.block_table)] = seq.block_table
        return tables

    def prepare_prefill(self, batch: ScheduledBatch, shape: tuple[int, int] | None = None,
                        target: StepInputs | None = None) -> StepInputs:
        """Inputs of a prefill step, padded to ``shape`` = (tokens, rows) of a prefill graph
        (``compile/prefill_graphs.py``) and written into ``target``, its static inputs, when given.  Without a
        shape the step gets one trailing padding sequence of one token.  The tokens past the real ones form one
        padding sequence of context 0 (slot -1: nothing is stored); further padding rows hold no tokens."""
        bs = self.block_size
        tokens, positions, slots, cu = [], [], [], [0]
        seqs = batch.seqs
        for seq, n in zip(seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            pos = np.arange(start, start + n)
            chunk = np.asarray(seq.token_ids[start:start + n])
            assert (chunk != PENDING_TOKEN).all(), "a prefill chunk must not contain an unresolved token"
            tokens.append(chunk)
            positions.append(pos)
            table = np.asarray(seq.block_table, dtype=np.int64)
            slots.append(table[pos // bs] * bs + pos % bs)
            cu.append(cu[-1] + n)
        num_tokens, rows = shape or (cu[-1] + 1, len(seqs) + 1)
        assert num_tokens >= cu[-1] and rows > len(seqs), "the padded shape must hold the step and a padding row"
        pad = num_tokens - cu[-1]
        tokens.append(np.zeros(pad, np.int64))
        positions.append(np.zeros(pad, np.int64))
        slots.append(np.full(pad, -1, np.int64))
        cu = np.asarray(cu + [num_tokens] * (rows - len(seqs)))
        out_slots = np.full(rows, self.scratch_slot)
        for i, seq in enumerate(seqs):
            if batch.samples(i):
                out_slots[i] = seq.token_slot
        context = [s.num_computed_tokens + n for s, n in zip(seqs, batch.num_new_tokens)] + [0] * (rows - len(seqs))
        return self._make_inputs(np.concatenate(tokens), np.concatenate(positions), np.concatenate(slots),
                                 self._block_table_array(seqs, rows, self.max_blocks_per_seq), np.asarray(context), cu,
                                 cu[1:] - 1, self._sampling_arrays(seqs, rows), out_slots, packed=True, target=target)

    def dummy_prefill_inputs(self, tokens: int = 7, rows: int = 3, packed: bool = False) -> StepInputs:
        """A prefill of ``tokens`` tokens in ``rows`` sequences (the last of one token) that writes nothing (every
        slot -1).  Each sequence is a whole prompt (context = its tokens, positions from 0), as the attention
        kernel requires, and reads KV block 0 only; a sequence is at most ``max_model_len`` tokens long if
        ``tokens <= rows * max_model_len``.  The step is first traced on the default 7 tokens in 3 sequences:
        token and sequence counts differ, so the compiler gives them separate symbols."""
        assert 2 <= rows <= tokens
        cu = np.append(np.linspace(0, tokens - 1, rows).astype(np.int64), tokens)
        lengths = np.diff(cu)
        positions = np.arange(tokens) - np.repeat(cu[:-1], lengths)
        assert lengths.max() <= self.config.max_model_len, "dummy sequences longer than max_model_len"
        return self._make_inputs(np.zeros(tokens, np.int64), positions, np.full(tokens, -1),
                                 np.zeros((rows, self.max_blocks_per_seq), np.int32), lengths, cu, cu[1:] - 1, None,
                                 packed=packed)

    def prepare_decode(self, seqs: list, rows: int, target: StepInputs | None = None, slot=(0, 0)) -> StepInputs:
        """One token per sequence, padded to ``rows``: padded rows get slot -1 and context length 0."""
        return self.decode_builder.build(seqs, rows, target, slot)

    # ---- token slots ----------------------------------------------------------------------------------
    def _assign_slot(self, seq) -> None:
        if seq.token_slot is None:
            if not self._free_slots:
                raise RuntimeError(f"more than max_num_seqs={self.config.max_num_seqs} sequences hold token slots")
            seq.token_slot = self._free_slots.pop()

    def release_slot(self, seq) -> None:
        """Give a finished or preempted sequence's token slot back (steps already queued may still write it)."""
        if seq.token_slot is not None:
            self._free_slots.append(seq.token_slot)
            seq.token_slot = None

    # ---- execution ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch):
        """Queue the step on the device; returns a handle for ``collect``.  Its tokens also stay on the device."""
        turn = self._launches % self._ring
        host = self._host_tokens[turn]
        self._launches += 1
        filtered = any(s.params.needs_filter for s in batch.seqs)
        for seq in batch.seqs:
            self._assign_slot(seq)
        if batch.is_prefill:
            inputs = self.prepare_prefill(batch, *self.executor.prefill_plan(sum(batch.num_new_tokens)))
            tokens, logits = self.executor.prefill(inputs)
            self._emit(tokens, logits, inputs, len(batch.seqs), filtered, host, 0)
        else:
            for chunk, (start, rows, padded) in enumerate(self.executor.decode_plan(len(batch.seqs))):
                t = time.perf_counter()
                inputs = self.prepare_decode(batch.seqs[start:start + rows], padded,
                                             self.executor.static_inputs(padded), slot=(chunk, turn))
                self.decode_prepare_time += time.perf_counter() - t
                tokens, logits = self.executor.decode(inputs, padded)
                self._emit(tokens, logits, inputs, rows, filtered, host, start)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return host, len(batch.seqs), event

    @staticmethod
    def collect(handle) -> list[int]:
        """Wait for a launched step and return its sampled tokens, one per scheduled sequence."""
        host, n, event = handle
        if event is not None:
            event.synchronize()
        return host[:n].tolist()

    def _emit(self, tokens, logits, inputs: StepInputs, rows: int, filtered: bool, host, offset: int) -> None:
        """Copy live rows' tokens to ``host`` in the background; batches with top-k/top-p re-draw them first."""
        if filtered:
            tokens = sample(logits[:rows], inputs.temperature[:rows], inputs.top_k[:rows], inputs.top_p[:rows],
                            inputs.seeds[:rows], inputs.sample_positions[:rows], filtered=True)
            self.token_buffer.index_copy_(0, inputs.out_slots[:rows], tokens)
        host[offset:offset + rows].copy_(tokens[:rows], non_blocking=True)
