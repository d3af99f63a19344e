"""Executors run a prepared step: ``EagerExecutor`` calls the step function directly, ``GraphExecutor`` runs
one compiled step, replayed as a captured graph per decode bucket and per prefill token count.

An executor sees only an ``ExecutorSpec``: the step function (``nanovllm.step.make_step``), the platform, the
shapes it must serve and builders of dummy inputs.  Prefill and decode are the same function of ``StepInputs``
(the attention op picks its kernel when it runs), so graph mode compiles once: the token and sequence counts are
symbolic, and each decode bucket and prefill size (``prefill_graphs.py``) is captured from that one compiled
step.  A prefill no graph holds calls the compiled step directly, at whatever size it has.  After start-up the
graph executor compiles only the logprobs variant of the step, lazily (``logprob_graphs.py``): every call runs
under ``torch.compiler.set_stance("fail_on_recompile")``, and a step loaded from the compile cache
(``saved_step.py``) raises on inputs its guards reject instead of compiling.

``decode`` and ``prefill`` take ``logprobs``: whether to run the variant (``ExecutorSpec.logprob_step``) that also
returns the step's logprobs.  Both return (tokens, logits, None or (values, ids)) (``nanovllm/step/function.py``).
"""
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from nanovllm.compile.bucket_graph import BucketGraph
from nanovllm.compile.buckets import pick_bucket, split_batch
from nanovllm.compile.cache import CompileCache, cache_disabled
from nanovllm.compile.logprob_graphs import LogprobGraphs
from nanovllm.compile.prefill_graphs import PrefillGraphs, default_prefill_sizes
from nanovllm.compile.saved_step import compiled_step
from nanovllm.kernels.matmul_configs import triton_row_limits
from nanovllm.logger import logger
from nanovllm.step import StepInputs


@dataclass(frozen=True)
class ExecutorSpec:
    step: Callable  # make_step(model, kv_caches, token_buffer): StepInputs -> (tokens, logits)
    logprob_step: Callable  # make_step(..., logprobs=True): StepInputs -> (tokens, logits, values, ids)
    platform: object  # nanovllm.platforms.base.Platform
    graph_batch_sizes: tuple[int, ...]
    prefill_graph_sizes: tuple[int, ...] | None  # None: the platform's default
    max_num_seqs: int
    max_step_tokens: int  # the most tokens a prefill step holds
    dummy_prefill: Callable[..., StepInputs]  # (tokens, rows, packed=False): an all-padding prefill
    decode_inputs: Callable[[int], StepInputs]  # rows -> all-padding decode inputs of that many rows
    cache_key: dict  # compile/cache.py key_fields


class EagerExecutor:
    """Runs steps uncompiled.  Decode batches are not padded."""
    mode = "eager"

    def __init__(self, spec: ExecutorSpec):
        self.step, self.logprob_step = spec.step, spec.logprob_step
        self.buckets: tuple[int, ...] | None = None

    def decode_plan(self, n: int) -> list[tuple[int, int, int]]:
        """(first row, live rows, padded rows) per chunk of a decode batch."""
        if not self.buckets:
            return [(0, n, n)]
        return [(start, rows, pick_bucket(rows, self.buckets)) for start, rows in split_batch(n, self.buckets)]

    def static_inputs(self, padded_rows: int, logprobs: bool = False) -> StepInputs | None:
        """The buffers the captured graph of this decode step reads (the logprobs variant's with ``logprobs``),
        for the runner to fill directly; None when there are none."""
        return None

    def prefill_plan(self, num_tokens: int):
        """((tokens, rows) to pad a prefill step of ``num_tokens`` tokens to, the buffers to fill), or (None, None):
        unpadded (one trailing padding sequence of one token), into new inputs."""
        return None, None

    def captures_every_prefill(self) -> bool:
        """Whether every prefill step runs in a prefill graph, so that start-up need not warm the other path."""
        return False

    def logprob_graph_sizes(self) -> list[int]:
        """The decode buckets whose logprobs variant has been built so far."""
        return []

    def describe(self) -> dict:
        return {"mode": self.mode, "prefill_graph_sizes": [], "compile_cache": None, "step_origin": None,
                "logprob_graph_sizes": []}

    def build_logprob_graphs(self) -> None:
        """Build the logprobs variant of every decode bucket now, rather than when first asked for."""

    def decode(self, inputs: StepInputs, padded_rows: int, logprobs: bool = False):
        return step_outputs((self.logprob_step if logprobs else self.step)(inputs))

    def prefill(self, inputs: StepInputs, logprobs: bool = False):
        return step_outputs((self.logprob_step if logprobs else self.step)(inputs))


class GraphExecutor(EagerExecutor):
    """Graph mode: one compile of the step with symbolic token and sequence counts, first traced on a small
    prefill (so the two counts get separate symbols), then captured once per prefill size and once per decode
    bucket, each kind largest first, in one shared memory pool.  Buckets are at least 2 rows, since the compiler
    specialises a size of 1.  A bucket that would need a second compile fails start-up instead of compiling.
    """
    mode = "graph"

    def __init__(self, spec: ExecutorSpec):
        super().__init__(spec)
        platform = spec.platform
        self.spec = spec
        self.buckets = spec.graph_batch_sizes
        # Each LLM in the process adds one compiled entry of the same step code object; raise Dynamo's
        # limits so none of them silently falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8) + 4
        torch._dynamo.config.accumulated_recompile_limit += 4
        self.graphs: dict[int, BucketGraph] = {}
        start = time.perf_counter()
        pool = platform.graph_pool()
        sizes = sorted({self.padded_rows(b) for b in self.buckets}, reverse=True)
        self.cache = CompileCache(spec.cache_key)
        self.logprob_graphs = LogprobGraphs(spec, pool, self.padded_rows, self.cache.root)
        # Floats read by the traced code (norm eps, rope factors) stay constants: when a second engine in the
        # process has other values, Dynamo would otherwise turn them into graph inputs on recompiling, which
        # nested compile regions cannot take.  Sizes are made symbolic explicitly (``saved_step.mark_dynamic``).
        with self.cache.activate(), torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True):
            t = time.perf_counter()
            self.compiled, self.step_origin = compiled_step(platform, self.step, spec.dummy_prefill, self.cache)
            platform.synchronize()
            logger.info("step %s (symbolic token and sequence counts) in %.1fs", _ORIGINS[self.step_origin],
                        time.perf_counter() - t)
            with torch.compiler.set_stance("fail_on_recompile"):
                self.prefill_graphs = PrefillGraphs(self.compiled, self._prefill_sizes(), spec, pool)
                for size in tqdm(sizes, desc="Capturing decode buckets", dynamic_ncols=True):
                    graph = BucketGraph(size, self.compiled, spec.decode_inputs(size), platform)
                    graph.compile()
                    graph.capture(pool)  # largest first, so smaller graphs reuse the pool's memory
                    self.graphs[size] = graph
                if not self.captures_every_prefill():
                    self._compile_prefill_matmuls()
        self.compile_seconds = time.perf_counter() - start
        logger.info("graph mode ready: one compiled step, %d decode graphs, prefill graphs of %s tokens, in %.1fs "
                    "(compile cache %s)", len(self.graphs), list(self.prefill_graphs.sizes) or "no",
                    self.compile_seconds, self._cache_state())

    def _cache_state(self) -> str:
        return "off" if cache_disabled() else "hit" if self.cache.hit else "miss"

    def describe(self) -> dict:
        return {"mode": self.mode, "prefill_graph_sizes": list(self.prefill_graphs.sizes),
                "compile_cache": self._cache_state(), "step_origin": self.step_origin,
                "logprob_graph_sizes": self.logprob_graph_sizes()}

    def logprob_graph_sizes(self) -> list[int]:
        return sorted(self.logprob_graphs.graphs)

    def build_logprob_graphs(self) -> None:
        self.logprob_graphs.build_all(self.buckets)

    def _prefill_sizes(self) -> tuple[int, ...]:
        spec = self.spec
        if spec.prefill_graph_sizes is not None:
            return spec.prefill_graph_sizes
        if not spec.platform.supports_graph_capture:  # padding without a capture only costs
            return ()
        return default_prefill_sizes(spec.max_num_seqs, spec.max_step_tokens)

    def captures_every_prefill(self) -> bool:
        return self.prefill_graphs.cover_every_step

    def prefill_plan(self, num_tokens: int):
        shape = self.prefill_graphs.shape_for(num_tokens)
        if shape is None:
            return None, None
        graph = self.prefill_graphs.graphs[shape[0]]
        return shape, graph.static_inputs if graph.graph is not None else None

    def _compile_prefill_matmuls(self) -> None:
        """Run the step once at each row count where a Triton matmul config ends, so that a prefill of that
        many tokens or sequences finds its kernels compiled (the decode graphs only compiled the configs of their
        bucket sizes).  Nothing is written: every slot is -1."""
        limit = min(self.spec.max_step_tokens, self.spec.max_num_seqs + 1)
        for rows in triton_row_limits(self.spec.platform.device):  # each >= 2: the smallest bucket is padded to 2
            self.compiled(self.spec.dummy_prefill(rows, rows))
            if rows >= limit:
                break

    def _graph(self, padded_rows: int, logprobs: bool) -> BucketGraph:
        return self.logprob_graphs.graph(padded_rows) if logprobs else self.graphs[padded_rows]

    def static_inputs(self, padded_rows: int, logprobs: bool = False) -> StepInputs | None:
        graph = self._graph(padded_rows, logprobs)
        return graph.static_inputs if graph.graph is not None else None

    @staticmethod
    def padded_rows(bucket: int) -> int:
        return max(bucket, 2)

    def decode_plan(self, n: int) -> list[tuple[int, int, int]]:
        return [(start, rows, self.padded_rows(padded)) for start, rows, padded in super().decode_plan(n)]

    @torch.inference_mode()
    def decode(self, inputs: StepInputs, padded_rows: int, logprobs: bool = False):
        graph = self._graph(padded_rows, logprobs)  # the variant's is built here, before the stance
        with torch.compiler.set_stance("fail_on_recompile"):
            return step_outputs(graph.run(inputs))

    @torch.inference_mode()
    def prefill(self, inputs: StepInputs, logprobs: bool = False):
        if logprobs:  # uncaptured, at the size the runner padded to
            compiled = self.logprob_graphs.compiled_step()
            with torch.compiler.set_stance("fail_on_recompile"):
                return step_outputs(compiled(inputs))
        with torch.compiler.set_stance("fail_on_recompile"):
            graph = self.prefill_graphs.graph_for(inputs)
            return step_outputs(graph.run(inputs) if graph is not None else self.compiled(inputs))


def step_outputs(out: tuple) -> tuple:
    """(tokens, logits, None or (values, ids)) of a plain or logprobs step's outputs."""
    return (*out, None) if len(out) == 2 else (out[0], out[1], (out[2], out[3]))


def make_executor(spec: ExecutorSpec, *, enforce_eager: bool, capturable: bool, not_capturable_reason: str = ""):
    """The executor for a model: graph mode unless eager is forced, the model cannot be captured (logged) or the
    platform runs eagerly by default (MPS); one static graph per bucket where the platform needs static shapes."""
    platform = spec.platform
    if enforce_eager:
        return EagerExecutor(spec)
    if not capturable:
        logger.warning("the model runs eagerly: %s", not_capturable_reason)
        return EagerExecutor(spec)
    if not platform.compiles_by_default:
        logger.info("the %s platform runs eagerly by default (nanovllm/platforms/%s.py says why and how to compile)",
                    platform.name, platform.name)
        return EagerExecutor(spec)
    if platform.static_shapes:
        from nanovllm.compile.static_executor import StaticGraphExecutor  # it builds on this module
        return StaticGraphExecutor(spec)
    return GraphExecutor(spec)


_ORIGINS = {"loaded": "loaded from the compile cache, not traced", "aot": "traced, compiled and saved",
            "traced": "traced and compiled"}
