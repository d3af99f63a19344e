"""The logprobs variant of the step in graph mode, built lazily: only once a batch asks for logprobs.

The variant is ``ExecutorSpec.logprob_step`` (the step plus fixed-size logprobs, static shapes per bucket).  The plain
step's graphs stay as they are, so a request without logprobs pays nothing; a decode batch with logprobs replays the
variant's graph of its bucket instead.  Each variant graph has its own all-padding static inputs, so building one never
runs the step on a live batch.

* ``LogprobGraphs`` (``GraphExecutor``): the variant compiled once with symbolic counts, the first time any step asks
  for logprobs, then captured per decode bucket when that bucket first does, in the executor's memory pool.  Prefill
  steps with logprobs call the compiled variant directly, uncaptured.
* ``StaticLogprobGraphs`` (``StaticGraphExecutor``): one static compile per decode bucket, as a method of its own
  (``decode_logprobs_<size>``) of a ``StepModule`` of the variant.

The variant's compile-cache entries are keyed as the plain step's plus ``step="logprobs"`` (and, for static compiles,
the bucket), so they never collide with the plain step's entry.
"""
import torch

from nanovllm.compile.bucket_graph import BucketGraph
from nanovllm.compile.cache import CompileCache, cache_disabled
from nanovllm.compile.saved_step import compiled_step
from nanovllm.logger import logger


def variant_key(cache_key: dict, **extra) -> dict:
    """The compile-cache key fields of the logprobs variant: the plain step's plus ``step="logprobs"``."""
    return {**cache_key, "step": "logprobs", **extra}


class LogprobGraphs:
    def __init__(self, spec, pool, padded_rows, cache_root):
        """``spec``: the executor's ``ExecutorSpec``; ``pool``: its graph memory pool; ``padded_rows(bucket)``:
        the rows a bucket's graph has; ``cache_root``: the directory of the plain step's cache entry."""
        self.spec, self.pool, self.padded_rows, self.cache_root = spec, pool, padded_rows, cache_root
        self.compiled = None
        self.step_origin: str | None = None
        self.cache: CompileCache | None = None
        self.graphs: dict[int, BucketGraph] = {}

    def compiled_step(self):
        """The variant compiled with symbolic token and sequence counts (compiled on the first call)."""
        if self.compiled is None:
            self.cache = CompileCache(variant_key(self.spec.cache_key), self.cache_root)
            with self.cache.activate(), torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True):
                self.compiled, self.step_origin = compiled_step(self.spec.platform, self.spec.logprob_step,
                                                                self.spec.dummy_prefill, self.cache)
            logger.info("logprobs step variant %s (compile cache %s)", self.step_origin,
                        "off" if cache_disabled() else "hit" if self.cache.hit else "miss")
        return self.compiled

    def graph(self, size: int) -> BucketGraph:
        """The variant's graph of the decode bucket of ``size`` padded rows (captured on the first call)."""
        graph = self.graphs.get(size)
        if graph is None:
            compiled = self.compiled_step()
            with torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True), \
                    torch.compiler.set_stance("fail_on_recompile"):
                graph = BucketGraph(size, compiled, self.spec.decode_inputs(size), self.spec.platform)
                graph.compile()
                graph.capture(self.pool)
            self.graphs[size] = graph
        return graph

    def build_all(self, buckets) -> None:
        """Compile the variant and capture every bucket now (``python -m nanovllm.precompile --logprobs``)."""
        for bucket in sorted({self.padded_rows(b) for b in buckets}, reverse=True):
            self.graph(bucket)

    def close(self) -> None:
        """Drop the variant's graphs and compiled step."""
        self.graphs.clear()
        self.compiled = self.spec = None


class StaticLogprobGraphs:
    def __init__(self, spec, module, cache_root):
        """``spec``: the executor's ``ExecutorSpec``; ``module``: a ``StepModule`` of ``spec.logprob_step``;
        ``cache_root``: the directory of the plain step's cache entry."""
        self.spec, self.module, self.cache_root = spec, module, cache_root
        self.graphs: dict[int, BucketGraph] = {}
        self.caches: dict[int, CompileCache] = {}

    def graph(self, size: int) -> BucketGraph:
        """The variant's static graph of the bucket of ``size`` rows (compiled on the first call)."""
        graph = self.graphs.get(size)
        if graph is None:
            spec, name = self.spec, f"decode_logprobs_{size}"
            cache = self.caches[size] = CompileCache(variant_key(spec.cache_key, bucket=size), self.cache_root)
            with cache.activate(), torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True):
                self.module.add_method(name)
                compiled = spec.platform.compile_static(self.module, name,
                                                        None if cache_disabled() else cache.platform_dir)
                graph = BucketGraph(size, compiled, spec.decode_inputs(size), spec.platform)
                graph.compile()
            self.graphs[size] = graph
        return graph

    def build_all(self, buckets) -> None:
        for bucket in sorted(set(buckets), reverse=True):
            self.graph(bucket)

    def close(self) -> None:
        """Drop the variant's graphs and its module's hold on the model."""
        self.graphs.clear()
        self.module.release()
        self.spec = None
