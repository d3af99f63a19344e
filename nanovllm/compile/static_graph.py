"""``StaticGraphExecutor``: graph mode for platforms whose compiler takes static shapes only
(``Platform.static_shapes``: the NPU, where torchair compiles one graph per input shape).

Each decode bucket is its own compiled function, traced once at its shape (``dynamic=False``, ``fullgraph=True``)
through ``Platform.compile_static``, largest first, all at start-up; afterwards each is only ever called with its
bucket's shapes, under ``torch.compiler.set_stance("fail_on_recompile")``.  Prefill runs eagerly (its token count
varies, and a static graph per count would be one compile per prompt length), so ``prefill_graph_sizes`` must be
unset or empty.

The step's bound objects (``make_step``: model, KV cache, token buffer) are gathered into one ``StepModule`` with
one method per bucket, each with a code object of its own: torchair's compile cache (``cache_compile``) caches a
method of an ``nn.Module``, traced once, and Dynamo keeps its compiled entries per code object.  The compiler's
own artifacts go to the compile-cache entry's ``platform/`` directory (``CompileCache.platform_dir``), under
nanovllm's key, lock and checksums.  A variant of a bucket (``nanovllm.step.STEPS``) is compiled the first time
a batch of that bucket asks for it, into a ``StepModule`` of its own (``variant_graphs.StaticVariantGraphs``).
"""
import functools
import time
import types

import torch
from tqdm.auto import tqdm

from nanovllm.compile.base import Executor, ExecutorSpec, step_outputs
from nanovllm.compile.bucket_graph import BucketGraph
from nanovllm.compile.cache import CompileCache, cache_disabled
from nanovllm.compile.variant_graphs import StaticVariantGraphs
from nanovllm.logger import logger


def _call_bound(self, inputs):
    return self.fn(*self.bound, inputs)


class StepModule(torch.nn.Module):
    """``step``'s function and bound objects as one module; ``add_method(name)`` adds ``name(inputs)``."""

    def __init__(self, step: functools.partial):
        super().__init__()
        self.fn, self.bound = step.func, step.args
        self.method_names: list[str] = []
        for i, obj in enumerate(step.args):
            if isinstance(obj, torch.nn.Module):
                self.add_module(f"bound{i}", obj)

    def add_method(self, name: str):
        code = _call_bound.__code__.replace(co_name=name)  # a code object of its own: Dynamo caches per code
        function = types.FunctionType(code, _call_bound.__globals__, name)
        function.__qualname__ = f"StepModule.{name}"
        method = types.MethodType(function, self)
        object.__setattr__(self, name, method)
        self.method_names.append(name)
        return method

    def release(self) -> None:
        """Drop the added methods (each refers back to the module) and the bound objects."""
        for name in self.method_names:
            self.__dict__.pop(name, None)
        self.method_names.clear()
        self._modules.clear()
        self.bound = ()


class StaticGraphExecutor(Executor):
    mode = "graph"

    def __init__(self, spec: ExecutorSpec):
        super().__init__(spec)
        platform = spec.platform
        if spec.prefill_graph_sizes:
            raise ValueError(f"prefill_graph_sizes={list(spec.prefill_graph_sizes)}: the {platform.name} platform "
                             f"compiles static decode buckets only and runs prefill eagerly; leave it unset or []")
        self.buckets = spec.graph_batch_sizes
        self.module = StepModule(spec.step)
        self.graphs: dict[int, BucketGraph] = {}
        start = time.perf_counter()
        self.cache = CompileCache(spec.cache_key)
        self.variant_graphs = {name: StaticVariantGraphs(spec, name, StepModule(step), self.cache.root)
                               for name, step in spec.variants.items()}
        with self.cache.activate(), torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True):
            for size in tqdm(sorted(set(self.buckets), reverse=True), desc="Compiling decode buckets",
                             dynamic_ncols=True):
                self.module.add_method(f"decode_{size}")
                cache_dir = None if cache_disabled() else self.cache.platform_dir
                compiled = platform.compile_static(self.module, f"decode_{size}", cache_dir)
                graph = BucketGraph(size, compiled, spec.decode_inputs(size), platform)
                graph.compile()  # the first call traces and compiles; every later call runs under fail_on_recompile
                self.graphs[size] = graph
        self.compile_seconds = time.perf_counter() - start
        logger.info("graph mode ready: %d static decode graphs (%s compiler), prefill eager, in %.1fs (compile cache "
                    "%s)", len(self.graphs), platform.name, self.compile_seconds, self._cache_state())

    def _cache_state(self) -> str:
        return "off" if cache_disabled() else "hit" if self.cache.hit else "miss"

    def describe(self) -> dict:
        return {"mode": self.mode, "prefill_graph_sizes": [], "compile_cache": self._cache_state(),
                "step_origin": "static",
                "variant_graph_sizes": self.built_variant_graphs()}

    @torch.inference_mode()
    def run_decode(self, inputs, padded_rows: int, variant: str | None = None):
        graph = self.graphs[padded_rows] if variant is None else self.variant_graphs[variant].graph(padded_rows)
        with torch.compiler.set_stance("fail_on_recompile"):
            return step_outputs(graph.run(inputs))

    def run_prefill(self, inputs, variant: str | None = None):  # eagerly (module docstring)
        return step_outputs(self.step_of(variant)(inputs))

    def close(self) -> None:
        super().close()
        self.graphs.clear()
        for graphs in self.variant_graphs.values():
            graphs.close()
        self.module.release()
