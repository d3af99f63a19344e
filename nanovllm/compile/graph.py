"""``GraphExecutor``: one compiled step, replayed as a captured graph per decode bucket and per prefill size.

Prefill and decode are the same function of ``StepInputs`` (the attention op picks its kernel when it runs), so
graph mode compiles once: the token and sequence counts are symbolic, and each decode bucket and prefill size
(``prefill_graphs.py``) is captured from that one compiled step.  A prefill no graph holds calls the compiled step
directly, at whatever size it has.  Decode parts are padded to their bucket (at least 2 rows, since the compiler
specialises a size of 1) and built straight into the captured graph's static inputs.  After start-up only the
variants of the step are compiled, lazily (``variant_graphs.py``): every call runs under
``torch.compiler.set_stance("fail_on_recompile")``, and a step loaded from the compile cache (``saved_step.py``)
raises on inputs its guards reject instead of compiling.
"""
import time

import torch
from tqdm.auto import tqdm

from nanovllm import envs
from nanovllm.compile.base import Executor, ExecutorSpec, step_outputs
from nanovllm.compile.bucket_graph import BucketGraph
from nanovllm.compile.cache import CompileCache, cache_disabled
from nanovllm.compile.variant_graphs import VariantGraphs
from nanovllm.compile.prefill_graphs import PrefillGraphs, default_prefill_sizes
from nanovllm.compile.saved_step import compiled_step
from nanovllm.kernels.matmul_configs import triton_row_limits
from nanovllm.logger import logger
from nanovllm.step import StepInputs


class GraphExecutor(Executor):
    """One compile of the step with symbolic token and sequence counts, first traced on a small prefill (so the two
    counts get separate symbols), then captured once per prefill size and once per decode bucket, each kind largest
    first, in one shared memory pool.  A bucket that would need a second compile fails start-up instead of
    compiling."""
    mode = "graph"

    def __init__(self, spec: ExecutorSpec):
        super().__init__(spec)
        platform = spec.platform
        self.spec = spec
        self.buckets = spec.graph_batch_sizes
        # Each LLM in the process adds one compiled entry of the same step code object; raise Dynamo's
        # limits so none of them silently falls back to eager.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 8) + 4
        dynamo.accumulated_recompile_limit += 4
        envs.note_process_setting("torch._dynamo.config.recompile_limit", dynamo.recompile_limit)
        envs.note_process_setting("torch._dynamo.config.accumulated_recompile_limit",
                                  dynamo.accumulated_recompile_limit)
        self.graphs: dict[int, BucketGraph] = {}
        start = time.perf_counter()
        pool = platform.graph_pool()
        sizes = sorted({self.padded_rows(b) for b in self.buckets}, reverse=True)
        self.cache = CompileCache(spec.cache_key)
        self.variant_graphs = {name: VariantGraphs(spec, name, pool, self.padded_rows, self.cache.root)
                               for name in spec.variants}
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
                "variant_graph_sizes": self.built_variant_graphs()}

    def _prefill_sizes(self) -> tuple[int, ...]:
        spec = self.spec
        if spec.prefill_graph_sizes is not None:
            return spec.prefill_graph_sizes
        if not spec.platform.supports_graph_capture:  # padding without a capture only costs
            return ()
        return default_prefill_sizes(spec.max_num_seqs, spec.max_step_tokens)

    def captures_every_prefill(self) -> bool:
        return self.prefill_graphs.cover_every_step

    def prefill_shape(self, num_tokens: int):
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

    def _graph(self, padded_rows: int, variant: str | None) -> BucketGraph:
        return self.graphs[padded_rows] if variant is None else self.variant_graphs[variant].graph(padded_rows)

    def static_inputs(self, padded_rows: int, variant: str | None = None) -> StepInputs | None:
        graph = self._graph(padded_rows, variant)  # (builds the variant's graph the first time)
        return graph.static_inputs if graph.graph is not None else None

    @staticmethod
    def padded_rows(bucket: int) -> int:
        return max(bucket, 2)

    @torch.inference_mode()
    def run_decode(self, inputs: StepInputs, padded_rows: int, variant: str | None = None) -> tuple:
        graph = self._graph(padded_rows, variant)  # the variant's is built here, before the stance
        with torch.compiler.set_stance("fail_on_recompile"):
            return step_outputs(graph.run(inputs))

    @torch.inference_mode()
    def run_prefill(self, inputs: StepInputs, variant: str | None = None) -> tuple:
        if variant is not None:  # uncaptured, at the size the runner padded to
            compiled = self.variant_graphs[variant].compiled_step()
            with torch.compiler.set_stance("fail_on_recompile"):
                return step_outputs(compiled(inputs))
        with torch.compiler.set_stance("fail_on_recompile"):
            graph = self.prefill_graphs.graph_for(inputs)
            return step_outputs(graph.run(inputs) if graph is not None else self.compiled(inputs))

    def close(self) -> None:
        super().close()
        self.graphs.clear()
        self.prefill_graphs.graphs.clear()
        for graphs in self.variant_graphs.values():
            graphs.close()
        self.compiled = self.spec = None


_ORIGINS = {"loaded": "loaded from the compile cache, not traced", "aot": "traced, compiled and saved",
            "traced": "traced and compiled"}
