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


def aot_compile(platform, step: functools.partial, trace_inputs) -> BoundStep:
    """Trace and lower the step now (``trace_inputs`` marked dynamic) without running it."""
    fn, bound = _unbind(step)
    # torch.compile attaches ``.aot_compile`` only under this flag, off by default in older releases
    with torch._dynamo.config.patch(enable_aot_compile=True):
        return BoundStep(platform.compile(fn, dynamic=None).aot_compile(((*bound, trace_inputs), {})), bound)


def serialize(compiled: BoundStep) -> bytes:
    """What ``load`` takes back: an ``aot_compile`` step without its bound objects."""
    with tempfile.TemporaryDirectory() as d:  # the save API takes a path (and returns bytes only in newer torch)
        path = os.path.join(d, "step.bin")
        compiled.compiled.save_compiled_function(path)
        with open(path, "rb") as f:
            return f.read()


def load(data: bytes, step: functools.partial) -> BoundStep:
    """A saved step bound to this process's objects (raises if torch cannot load it)."""
    fn, bound = _unbind(step)
    loader = torch.compiler.load_compiled_function
    kwargs = {"f_globals": fn.__globals__} if "f_globals" in inspect.signature(loader).parameters else {}
    return BoundStep(loader(io.BytesIO(data), **kwargs), bound)


def compiled_step(platform, step: functools.partial, make_trace_inputs: Callable, cache) -> tuple[BoundStep, str]:
    """The step compiled with symbolic token and sequence counts, run once on a dummy prefill, and how it was
    obtained: ``"loaded"`` (from ``cache``'s entry; no Dynamo trace), ``"aot"`` (traced now, kept in the entry)
    or ``"traced"`` (traced now, not kept: the cache is off, its entry keeps no step, or saving failed).

    Every path compiles before it meets the other tensor-parallel ranks (``liveness.meet``, once) and runs the step
    only after: a rank's first collective waits only NANOVLLM_TP_TIMEOUT_S for a peer still compiling.  Only plain
    ``torch.compile`` (this torch cannot compile ahead, or that failed) compiles inside its first run."""
    met = False

    def first_run(compiled: BoundStep, inputs, activity: str) -> None:
        nonlocal met
        if not met:
            liveness.meet(activity)
            met = True
        compiled(inputs)

    if cache.saved_step is not None:
        try:
            loaded = load(cache.saved_step, step)
            # unmarked inputs: a loaded guard rejects a dynamic-dim marking
            first_run(loaded, make_trace_inputs(), "running the loaded step")
            return loaded, "loaded"
        except liveness.PeerFailed:  # the group is broken: no step would run
            raise
        except Exception as e:  # never crash, never use a step that did not load cleanly
            logger.warning("compile cache: the saved step in %s could not be used (%s: %s); tracing it again",
                           cache.entry, type(e).__name__, _first_line(e))
            cache.drop_step()
    keep = cache.enabled and not cache.loaded  # a loaded entry without a step had it dropped: it stays without
    reason = aot_unsupported_reason()
    if reason is None:
        try:
            inputs = make_trace_inputs()
            mark_dynamic(inputs)
            compiled = aot_compile(platform, step, inputs)
            data = serialize(compiled) if keep else None  # (a step that cannot be saved is traced below)
            first_run(compiled, make_trace_inputs(), "running the compiled step")
            if keep:
                cache.store_step(data)
            return compiled, "aot" if keep else "traced"
        except liveness.PeerFailed:
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {_first_line(e)}"
    if keep:
        logger.info("compile cache: the step is not saved (%s); warm starts will trace it", reason)
    traced = trace(platform, step)
    inputs = make_trace_inputs()
    mark_dynamic(inputs)
    first_run(traced, inputs, "compiling and running the traced step")
    return traced, "traced"


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""
