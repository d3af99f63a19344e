"""Executors run a prepared step: ``EagerExecutor`` calls the step function directly, ``GraphExecutor`` runs
one compiled step, replayed as a captured graph per decode bucket and per prefill token count.

Prefill and decode are the same function of ``StepInputs`` (the attention op picks its kernel when it runs),
so graph mode compiles once: the token and sequence counts are symbolic, and each decode bucket and prefill
size (``prefill_graphs.py``) is captured from that one compiled step.  A prefill no graph holds calls the
compiled step directly, at whatever size it has.  Graph and eager mode run the
same step function and compute the same thing.  After start-up the graph executor never compiles: every
call runs under ``torch.compiler.set_stance("fail_on_recompile")``, and a step loaded from the compile cache
(``saved_step.py``) raises on inputs its guards reject instead of compiling.
"""
import functools
import time

import torch
from tqdm.auto import tqdm

from nanovllm.compile.bucket_graph import BucketGraph
from nanovllm.compile.buckets import pick_bucket, split_batch
from nanovllm.compile.cache import CompileCache, cache_disabled, key_fields
from nanovllm.compile.prefill_graphs import PrefillGraphs, default_prefill_sizes
from nanovllm.compile.saved_step import compiled_step
from nanovllm.kernels.matmul_configs import triton_row_limits
from nanovllm.layers.sampler import sample
from nanovllm.logger import logger


def run_step(model, kv_caches, token_buffer, inputs):
    """The whole step, token buffer to token buffer: (tokens [B], logits [B, V]).

    Input tokens still being sampled by the previous step are read from ``token_buffer``; every sampled token
    is written back to it (see ``StepInputs``).
    """
    from_buffer = token_buffer[inputs.token_slots.clamp(min=0)]
    input_ids = torch.where(inputs.token_slots >= 0, from_buffer, inputs.input_ids)
    logits = model(input_ids, inputs, kv_caches)
    tokens = sample(logits, inputs.temperature, inputs.top_k, inputs.top_p, inputs.seeds,
                    inputs.sample_positions)
    token_buffer.index_copy_(0, inputs.out_slots, tokens)
    return tokens, logits


def make_step(model, kv_caches, token_buffer):
    """``step(inputs)``.  The model and tensors are bound arguments, not a closure: a compiled step saved to
    the compile cache then reads this process's objects when loaded (``saved_step.py``)."""
    return functools.partial(run_step, model, kv_caches, token_buffer)


class EagerExecutor:
    """Runs steps uncompiled.  ``pad_to_buckets`` pads decode batches as graph mode does (for comparisons)."""
    mode = "eager"

    def __init__(self, runner, pad_to_buckets: tuple[int, ...] | None = None):
        self.step = make_step(runner.model, runner.kv_caches, runner.token_buffer)
        self.buckets = pad_to_buckets

    def decode_plan(self, n: int) -> list[tuple[int, int, int]]:
        """(first row, live rows, padded rows) per chunk of a decode batch."""
        if not self.buckets:
            return [(0, n, n)]
        return [(start, rows, pick_bucket(rows, self.buckets)) for start, rows in split_batch(n, self.buckets)]

    def static_inputs(self, padded_rows: int):
        """The buffers a captured graph reads, for the runner to fill directly; None when there are none."""
        return None

    def prefill_plan(self, num_tokens: int):
        """((tokens, rows) to pad a prefill step of ``num_tokens`` tokens to, the buffers to fill), or (None, None):
        unpadded (one trailing padding sequence of one token), into new inputs."""
        return None, None

    def captures_every_prefill(self) -> bool:
        """Whether every prefill step runs in a prefill graph (captured where the platform can), so that start-up
        need not warm the uncaptured prefill path."""
        return False

    def decode(self, inputs, padded_rows: int):
        return self.step(inputs)

    def prefill(self, inputs):
        return self.step(inputs)


class GraphExecutor(EagerExecutor):
    """Graph mode: one compile of the step with symbolic token and sequence counts, first traced on a small
    prefill (so the two counts get separate symbols), then captured once per prefill size and once per decode
    bucket, each kind largest first, in one shared memory pool.  Buckets are at least 2 rows, since the compiler
    specialises a size of 1.
    A bucket that would need a second compile fails start-up instead of compiling silently.
    """
    mode = "graph"

    def __init__(self, runner):
        super().__init__(runner)
        platform = runner.platform
        self.buckets = runner.config.graph_batch_sizes
        # Each LLM in the process adds one compiled entry of the same step code object; raise Dynamo's
        # limits so none of them silently falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8) + 4
        torch._dynamo.config.accumulated_recompile_limit += 4
        self.graphs: dict[int, BucketGraph] = {}
        start = time.perf_counter()
        pool = platform.graph_pool()
        sizes = sorted({self.padded_rows(b) for b in self.buckets}, reverse=True)
        self.cache = CompileCache(key_fields(runner))
        with self.cache.activate(), torch.inference_mode():
            t = time.perf_counter()
            self.compiled, self.step_origin = compiled_step(platform, self.step, runner.dummy_prefill_inputs,
                                                            self.cache)
            platform.synchronize()
            self.trace_seconds = time.perf_counter() - t
            logger.info("step %s (symbolic token and sequence counts) in %.1fs", _ORIGINS[self.step_origin],
                        self.trace_seconds)
            with torch.compiler.set_stance("fail_on_recompile"):
                self.prefill_graphs = PrefillGraphs(runner, self.compiled, self._prefill_sizes(runner), pool)
                for size in tqdm(sizes, desc="Capturing decode buckets", dynamic_ncols=True):
                    graph = BucketGraph(size, self.compiled, runner.prepare_decode([], size), platform)
                    graph.compile()
                    graph.capture(pool)  # largest first, so smaller graphs reuse the pool's memory
                    self.graphs[size] = graph
                if not self.captures_every_prefill():
                    self._compile_prefill_matmuls(runner)
        self.compile_seconds = time.perf_counter() - start
        logger.info("graph mode ready: one compiled step, %d decode graphs, prefill graphs of %s tokens, in %.1fs "
                    "(compile cache %s)", len(self.graphs), list(self.prefill_graphs.sizes) or "no",
                    self.compile_seconds,
                    "off" if cache_disabled() else "hit" if self.cache.hit else "miss, saved")

    @staticmethod
    def _prefill_sizes(runner) -> tuple[int, ...]:
        cfg = runner.config
        if cfg.prefill_graph_sizes is not None:
            return cfg.prefill_graph_sizes
        if not runner.platform.supports_graph_capture:  # padding without a capture only costs
            return ()
        return default_prefill_sizes(cfg.max_num_seqs, cfg.max_step_tokens)

    def captures_every_prefill(self) -> bool:
        return self.prefill_graphs.cover_every_step

    def prefill_plan(self, num_tokens: int):
        shape = self.prefill_graphs.shape_for(num_tokens)
        if shape is None:
            return None, None
        graph = self.prefill_graphs.graphs[shape[0]]
        return shape, graph.static_inputs if graph.graph is not None else None

    def _compile_prefill_matmuls(self, runner) -> None:
        """Run the step once at each row count where a Triton matmul config ends, so that a prefill of that
        many tokens or sequences finds its kernels compiled.  The decode graphs only compiled the configs of
        their bucket sizes; a config first met inside generate would compile there (0.4-0.6 s each, seen with
        --bs 32, whose prefills have up to 33 sequences).  Nothing is written: every slot is -1."""
        limit = min(runner.config.max_num_batched_tokens, runner.config.max_num_seqs + 1)
        for rows in triton_row_limits(runner.device):  # each >= 2: the smallest bucket is padded to 2
            self.compiled(runner.dummy_prefill_inputs(rows, rows))
            if rows >= limit:
                break

    def static_inputs(self, padded_rows: int):
        graph = self.graphs[padded_rows]
        return graph.static_inputs if graph.graph is not None else None

    @staticmethod
    def padded_rows(bucket: int) -> int:
        return max(bucket, 2)

    def decode_plan(self, n: int) -> list[tuple[int, int, int]]:
        return [(start, rows, self.padded_rows(padded)) for start, rows, padded in super().decode_plan(n)]

    @torch.inference_mode()
    def decode(self, inputs, padded_rows: int):
        with torch.compiler.set_stance("fail_on_recompile"):
            return self.graphs[padded_rows].run(inputs)

    @torch.inference_mode()
    def prefill(self, inputs):
        with torch.compiler.set_stance("fail_on_recompile"):
            graph = self.prefill_graphs.graph_for(inputs)
            return graph.run(inputs) if graph is not None else self.compiled(inputs)


_ORIGINS = {"loaded": "loaded from the compile cache, not traced", "aot": "traced, compiled and saved",
            "traced": "traced and compiled"}
