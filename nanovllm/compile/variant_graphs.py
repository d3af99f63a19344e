"""A variant of the step in graph mode (``ExecutorSpec.variants``, ``nanovllm.step.STEPS``), built lazily: only
once a batch asks for it.

The plain step's graphs stay as they are, so a request that asks for no variant pays nothing; a decode batch that
does replays the variant's graph of its bucket instead.  Each variant graph has its own all-padding static inputs,
so building one never runs the step on a live batch.

* ``VariantGraphs`` (``GraphExecutor``): the variant compiled once with symbolic counts, the first time a step asks
  for it, then captured per decode bucket when that bucket first does, in the executor's memory pool.  Prefill
  steps of the variant call the compiled variant directly, uncaptured.
* ``StaticVariantGraphs`` (``StaticGraphExecutor``): one static compile per decode bucket, as a method of its own
  (``decode_<variant>_<size>``) of a ``StepModule`` of the variant.

A variant's compile-cache entries are keyed as the plain step's plus ``step=<variant>`` (and, for static compiles,
the bucket), so they never collide with the plain step's entry or another variant's.
"""
import torch

from nanovllm.compile.bucket_graph import BucketGraph
from nanovllm.compile.cache import CompileCache, cache_disabled
from nanovllm.compile.saved_step import compiled_step
from nanovllm.logger import logger


def variant_key(cache_key: dict, name: str, **extra) -> dict:
    """The compile-cache key fields of variant ``name``: the plain step's plus ``step=name``."""
    return {**cache_key, "step": name, **extra}


class VariantGraphs:
    def __init__(self, spec, name: str, pool, padded_rows, cache_root):
        """``spec``: the executor's ``ExecutorSpec``; ``name``: a key of ``spec.variants``; ``pool``: its graph
        memory pool; ``padded_rows(bucket)``: the rows a bucket's graph has; ``cache_root``: the directory of the
        plain step's cache entry."""
        self.spec, self.name, self.pool, self.padded_rows, self.cache_root = spec, name, pool, padded_rows, cache_root
        self.compiled = None
        self.step_origin: str | None = None
        self.cache: CompileCache | None = None
        self.graphs: dict[int, BucketGraph] = {}

    def compiled_step(self):
        """The variant compiled with symbolic token and sequence counts (compiled on the first call)."""
        if self.compiled is None:
            self.cache = CompileCache(variant_key(self.spec.cache_key, self.name), self.cache_root)
            with self.cache.activate(), torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True):
                self.compiled, self.step_origin = compiled_step(self.spec.platform, self.spec.variants[self.name],
                                                                self.spec.dummy_prefill, self.cache)
            logger.info("%s step variant %s (compile cache %s)", self.name, self.step_origin,
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
        """Compile the variant and capture every bucket now (``python -m nanovllm.precompile --variants``)."""
        for bucket in sorted({self.padded_rows(b) for b in buckets}, reverse=True):
            self.graph(bucket)

    def close(self) -> None:
        """Drop the variant's graphs and compiled step."""
        self.graphs.clear()
        self.compiled = self.spec = None


class StaticVariantGraphs:
    def __init__(self, spec, name: str, module, cache_root):
        """``spec``: the executor's ``ExecutorSpec``; ``module``: a ``StepModule`` of ``spec.variants[name]``;
        ``cache_root``: the directory of the plain step's cache entry."""
        self.spec, self.name, self.module, self.cache_root = spec, name, module, cache_root
        self.graphs: dict[int, BucketGraph] = {}
        self.caches: dict[int, CompileCache] = {}

    def graph(self, size: int) -> BucketGraph:
        """The variant's static graph of the bucket of ``size`` rows (compiled on the first call)."""
        graph = self.graphs.get(size)
        if graph is None:
            spec, name = self.spec, f"decode_{self.name}_{size}"
            cache = self.caches[size] = CompileCache(variant_key(spec.cache_key, self.name, bucket=size),
                                                     self.cache_root)
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
