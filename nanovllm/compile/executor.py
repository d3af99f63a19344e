"""Executors run a prepared step: ``EagerExecutor`` calls the model directly, ``GraphExecutor`` replays one
captured graph per decode bucket and (where the platform compiles prefill) runs a shape-dynamic prefill graph.

Both run the same step function (model forward, then the plain sampler) so graph mode and eager mode
compute the same thing.  After start-up the graph executor never compiles: every call runs under
``torch.compiler.set_stance("fail_on_recompile")``.
"""
import dataclasses
import os
import time

import torch
from tqdm.auto import tqdm

from nanovllm.compile.bucket_graph import BucketGraph
from nanovllm.compile.buckets import pick_bucket, split_batch
from nanovllm.compile.cache import CompileCache, cache_disabled, key_fields
from nanovllm.layers.sampler import sample
from nanovllm.logger import logger


def make_step(model, kv_caches, token_buffer, is_prefill: bool):
    """The whole step, token buffer to token buffer: (tokens [B], logits [B, V]).

    Input tokens still being sampled by the previous step are read from ``token_buffer``; every sampled token
    is written back to it (see ``StepInputs``).
    """
    def step(inputs):
        from_buffer = token_buffer[inputs.token_slots.clamp(min=0)]
        input_ids = torch.where(inputs.token_slots >= 0, from_buffer, inputs.input_ids)
        logits = model(input_ids, inputs, kv_caches, is_prefill)
        tokens = sample(logits, inputs.temperature, inputs.top_k, inputs.top_p, inputs.seeds,
                        inputs.sample_positions)
        token_buffer.index_copy_(0, inputs.out_slots, tokens)
        return tokens, logits
    return step


class EagerExecutor:
    """Runs steps uncompiled.  ``pad_to_buckets`` pads decode batches as graph mode does (for comparisons)."""
    mode = "eager"

    def __init__(self, runner, pad_to_buckets: tuple[int, ...] | None = None):
        self.decode_step = make_step(runner.model, runner.kv_caches, runner.token_buffer, is_prefill=False)
        self.prefill_step = make_step(runner.model, runner.kv_caches, runner.token_buffer, is_prefill=True)
        self.buckets = pad_to_buckets

    def decode_plan(self, n: int) -> list[tuple[int, int, int]]:
        """(first row, live rows, padded rows) per chunk of a decode batch."""
        if not self.buckets:
            return [(0, n, n)]
        return [(start, rows, pick_bucket(rows, self.buckets)) for start, rows in split_batch(n, self.buckets)]

    def static_inputs(self, padded_rows: int):
        """The buffers a captured graph reads, for the runner to fill directly; None when there are none."""
        return None

    def decode(self, inputs, padded_rows: int):
        return self.decode_step(inputs)

    def prefill(self, inputs):
        return self.prefill_step(inputs)


class GraphExecutor(EagerExecutor):
    """Graph mode.  Decode is traced and lowered by the platform's compiler, then captured once per bucket.

    Two decode compile policies (``NANOVLLM_DECODE_COMPILE``):
    * ``shared`` (default): one compile whose batch dimension is symbolic, captured as a separate graph for
      every bucket.  Buckets are at least 2 rows, since the compiler specialises a size of 1.
    * ``per_bucket``: one static-shape compile per bucket (``dynamic=False``), each then captured.
    On an H100 the static compile of Qwen3-0.6B took ~30 s per bucket (~7 min for the 14 default buckets)
    against ~56 s for the shared compile, so the shared one is the default; whether static shapes decode any
    faster has not been measured yet (docs/PERFORMANCE.md).
    """
    mode = "graph"

    def __init__(self, runner):
        super().__init__(runner)
        platform = runner.platform
        self.policy = os.environ.get("NANOVLLM_DECODE_COMPILE", "shared")
        if self.policy not in ("shared", "per_bucket"):
            raise ValueError(f"NANOVLLM_DECODE_COMPILE must be 'shared' or 'per_bucket', got {self.policy!r}")
        self.buckets = runner.config.graph_batch_sizes
        # Every bucket may be one more compiled entry of the same step code object, and each LLM in the
        # process adds its own; raise Dynamo's limits by that much so none of them silently falls back to eager.
        entries = len(self.buckets) + 4
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8) + entries
        torch._dynamo.config.accumulated_recompile_limit += entries
        static = self.policy == "per_bucket"
        compiled_decode = platform.compile(self.decode_step, dynamic=False if static else None)
        # Prefill is one shape-dynamic graph where the platform says it pays (see Platform.compile_prefill).
        self.compiled_prefill = platform.compile(self.prefill_step, dynamic=True) if platform.compile_prefill else None
        self.graphs: dict[int, BucketGraph] = {}
        start = time.perf_counter()
        pool = platform.graph_pool()
        sizes = sorted({self.padded_rows(b) for b in self.buckets}, reverse=True)
        bar = tqdm(sizes, desc="Compiling decode buckets", dynamic_ncols=True)
        self.cache = CompileCache(key_fields(runner))
        with self.cache.activate(), torch.inference_mode():
            for size in bar:  # largest first, so smaller graphs reuse the pool's memory
                inputs = runner.prepare_decode([], size)
                if not static and not self.graphs:
                    _mark_batch_dynamic(inputs)
                graph = BucketGraph(size, compiled_decode, inputs, platform)
                graph.compile()
                graph.capture(pool)
                self.graphs[size] = graph
                logger.info("decode bucket %d compiled and captured in %.1fs", size, graph.compile_seconds)
            bar.close()
            if self.compiled_prefill is not None:
                t = time.perf_counter()
                self.compiled_prefill(runner.dummy_prefill_inputs())
                platform.synchronize()
                logger.info("prefill graph (dynamic token count) compiled in %.1fs", time.perf_counter() - t)
        self.compile_seconds = time.perf_counter() - start
        logger.info("graph mode ready (%s decode compile): %d decode graphs, prefill %s, in %.1fs (compile cache %s)",
                    self.policy, len(self.graphs), "compiled" if self.compiled_prefill else "eager",
                    self.compile_seconds, "off" if cache_disabled() else "hit" if self.cache.hit else "miss, saved")

    def static_inputs(self, padded_rows: int):
        graph = self.graphs[padded_rows]
        return graph.static_inputs if graph.graph is not None else None

    def padded_rows(self, bucket: int) -> int:
        return bucket if self.policy == "per_bucket" else max(bucket, 2)

    def decode_plan(self, n: int) -> list[tuple[int, int, int]]:
        return [(start, rows, self.padded_rows(padded)) for start, rows, padded in super().decode_plan(n)]

    @torch.inference_mode()
    def decode(self, inputs, padded_rows: int):
        with torch.compiler.set_stance("fail_on_recompile"):
            return self.graphs[padded_rows].run(inputs)

    @torch.inference_mode()
    def prefill(self, inputs):
        if self.compiled_prefill is None:
            return self.prefill_step(inputs)
        with torch.compiler.set_stance("fail_on_recompile"):
            return self.compiled_prefill(inputs)


def _mark_batch_dynamic(inputs) -> None:
    """Make dimension 0 (batch rows; rows + 1 for ``cu_seqlens_q``) of every decode input symbolic."""
    for f in dataclasses.fields(inputs):
        torch._dynamo.mark_dynamic(getattr(inputs, f.name), 0)
