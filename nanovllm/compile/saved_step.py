"""The compiled step, saved in the compile-cache entry so that a warm start skips Dynamo tracing.

Graph mode compiles one step function with symbolic token and sequence counts.  PyTorch's AOT precompile API
(``aot_compile``, ``save_compiled_function``, ``torch.compiler.load_compiled_function``) writes the Dynamo output
itself (guards, bytecode, the bundled AOTAutograd/Inductor graph) to the entry; the next start loads it untraced.

Binding: the step is ``functools.partial(run_step, model, kv_caches, token_buffer, ...)`` (``step.make_step``).
What is compiled is ``run_step`` with every bound object as an explicit argument, so the saved function holds no
module and no tensor of the process that saved it: each call reads parameters, KV tensors and buffers from this
process's objects, and its guards check their shapes, dtypes, strides and devices.  Any number of bound objects works.

Safety: the file sits under the entry's key (torch version and source hash included) and is checksummed in its
manifest (``CompileCache``).  A loaded step that cannot be used (API missing, unpickling or guard failure on the
first call) is dropped with one warning and the step is traced.  A loaded step never recompiles: a later call
whose inputs fail its guards raises.
"""
import dataclasses
import functools
import inspect
import io
import os
import tempfile
from typing import Callable

import torch

from nanovllm.distributed import liveness
from nanovllm.logger import logger


class BoundStep:
    """A compiled ``run_step`` called with this process's bound objects (model, KV cache, buffers)."""

    def __init__(self, compiled: Callable, bound_args: tuple):
        self.compiled = compiled
        self.bound_args = bound_args

    def __call__(self, inputs):
        return self.compiled(*self.bound_args, inputs)


def mark_dynamic(inputs) -> None:
    """Make dimension 0 (tokens, sequences, or sequences + 1 for ``cu_seqlens_q``) of every input symbolic."""
    for f in dataclasses.fields(inputs):
        torch._dynamo.mark_dynamic(getattr(inputs, f.name), 0)


def aot_unsupported_reason() -> str | None:
    """Why this torch cannot save a compiled step, or None when it can."""
    if not callable(getattr(torch.compiler, "load_compiled_function", None)):
        return f"torch {torch.__version__} has no torch.compiler.load_compiled_function"
    if not hasattr(torch._dynamo.config, "enable_aot_compile"):
        return f"torch {torch.__version__} has no torch._dynamo.config.enable_aot_compile"
    return None


def _unbind(step: functools.partial) -> tuple[Callable, tuple]:
    # Bound objects become explicit arguments: a closure would be pickled by value (stale copies of the weights).
    assert isinstance(step, functools.partial) and not step.keywords, "make_step returns partial(run_step, *objs)"
    return step.func, step.args


def trace(platform, step: functools.partial) -> BoundStep:
    """The step under plain ``torch.compile``: Dynamo traces it on its first call (the pre-AOT path)."""
    fn, bound = _unbind(step)
    return BoundStep(platform.compile(fn, dynamic=None), bound)


def aot_compile(platform, step: functools.partial, trace_inputs) -> tuple[BoundStep, bytes]:
    """Trace and lower the step now (``trace_inputs`` marked dynamic); returns it and its serialized form."""
    fn, bound = _unbind(step)
    # torch.compile attaches ``.aot_compile`` only under this flag, off by default in older releases
    with torch._dynamo.config.patch(enable_aot_compile=True):
        compiled = platform.compile(fn, dynamic=None).aot_compile(((*bound, trace_inputs), {}))
    with tempfile.TemporaryDirectory() as d:  # the save API takes a path (and returns bytes only in newer torch)
        path = os.path.join(d, "step.bin")
        compiled.save_compiled_function(path)
        with open(path, "rb") as f:
            data = f.read()
    return BoundStep(compiled, bound), data


def load(data: bytes, step: functools.partial) -> BoundStep:
    """A saved step bound to this process's objects (raises if torch cannot load it)."""
    fn, bound = _unbind(step)
    loader = torch.compiler.load_compiled_function
    kwargs = {"f_globals": fn.__globals__} if "f_globals" in inspect.signature(loader).parameters else {}
    return BoundStep(loader(io.BytesIO(data), **kwargs), bound)


def compiled_step(platform, step: functools.partial, make_trace_inputs: Callable, cache) -> tuple[BoundStep, str]:
    """The step compiled with symbolic token and sequence counts, run once on a dummy prefill, and how it was
    obtained: ``"loaded"`` (from ``cache``'s entry; no Dynamo trace), ``"aot"`` (traced now, kept in the entry)
    or ``"traced"`` (plain ``torch.compile``: the cache is off, the API is missing, or it failed)."""
    if cache.saved_step is not None:
        try:
            loaded = load(cache.saved_step, step)
            liveness.meet("running the loaded step")  # its collectives wait only NANOVLLM_TP_TIMEOUT_S for a peer
            loaded(make_trace_inputs())  # unmarked inputs: a loaded guard rejects a dynamic-dim marking
            return loaded, "loaded"
        except liveness.PeerFailed:  # the group is broken: no step would run
            raise
        except Exception as e:  # never crash, never use a step that did not load cleanly
            logger.warning("compile cache: the saved step in %s could not be used (%s: %s); tracing it again",
                           cache.entry, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            cache.drop_step()
    elif cache.enabled and not cache.loaded:
        reason = aot_unsupported_reason()
        if reason is None:
            try:
                inputs = make_trace_inputs()
                mark_dynamic(inputs)
                compiled, data = aot_compile(platform, step, inputs)
                liveness.meet("running the compiled step")  # a peer may still be compiling
                compiled(make_trace_inputs())
                cache.store_step(data)
                return compiled, "aot"
            except liveness.PeerFailed:
                raise
            except Exception as e:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logger.info("compile cache: the step is not saved (%s); warm starts will trace it", reason)
    traced = trace(platform, step)
    inputs = make_trace_inputs()
    mark_dynamic(inputs)
    traced(inputs)
    return traced, "traced"
