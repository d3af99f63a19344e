"""A stand-in of ``torchair``, the NPU backend of ``torch.compile`` (tests only).

Sources: Ascend/torchair at commit fced884 (2026-06-01):
* ``docs/zh/ascend_ir/api/torchair/get_npu_backend.md``: ``get_npu_backend(*, compiler_config=None,
  custom_decompositions={})``; ``python/torchair/npu_fx_compiler.py``: it returns
  ``functools.partial(_npu_backend, compiler_config=..., decompositions=...)``, which runs AOTAutograd
  (``aot_module_simplified``, input mutations kept) and hands the forward graph to the compiler of the mode.
* ``python/torchair/configs/compiler_config.py``: ``CompilerConfig().mode`` is one of "max-autotune" (default),
  "reduce-overhead", "npugraph_ex"; a value outside raises ``ValueError`` (``configs/_option_base.py``).
* ``docs/zh/custom_op_graph/overview.md``: aclgraph modes need what native PyTorch graph mode needs (a Meta
  function; in-place ops functionalized, auto-functionalization supported); max-autotune (Ascend IR / GE)
  additionally needs an Ascend converter for every op (``register_fx_node_ge_converter``).
  ``_ge_concrete_graph/fx2ge_converter.py`` converts ``auto_functionalized_v2`` through the converter of the op
  it wraps.  torchair has no code for ``invoke_subgraph`` (``git grep`` finds none).
* ``docs/zh/ascend_ir/api/inference/cache_compile.md``, ``docs/zh/ascend_ir/features/advanced/compile_cache.md``
  and ``python/torchair/inference/_cache_compiler.py``: ``cache_compile(func, *, config=None, backend=None,
  dynamic=True, cache_dir=None, global_rank=None, tp_rank=None, pp_rank=None, custom_decompositions=None,
  ge_cache=False)``; ``func`` must be a method of an ``nn.Module`` (else ``ValueError``); each cached func may be
  traced by Dynamo once; guards are skipped, so a func must only ever see the inputs it was compiled for; the
  file is ``${cache_dir}/${model_info}/${func}/compiled_module`` with ``cache_dir`` defaulting to
  ``$TORCHAIR_CACHE_HOME`` or ``./.torchair_cache``; caches are not portable across CANN versions.

What the stand-in does with a graph: max-autotune checks that every non-aten op has a converter (aten ops are
assumed covered: torchair converts a large aten set, which the stand-in does not list) and that no higher-order
op other than ``auto_functionalized(_v2)`` is left, then runs the forward graph eagerly with the converted-only
ops enabled (``npu_ops.ge_running``).  reduce-overhead checks that nothing in the graph reads device values on
the host (aclgraph capture cannot) and runs the graph eagerly: the stand-in does not capture, so replays re-run.
``cache_compile`` writes a JSON marker at the documented path, cannot deserialise a compiled graph, so a warm
start traces again (it counts loads and saves), and it raises where the real one would silently misbehave: a
second trace, or a call with other input shapes than the first.
"""
import functools
import hashlib
import importlib.machinery
import json
import os
import types

import torch
import torch.utils._pytree as pytree
from torch._functorch.aot_autograd import aot_module_simplified

from . import npu_ops

MODES = ("max-autotune", "reduce-overhead", "npugraph_ex")
# Ops with an Ascend converter (beyond aten): torchair ships these two (python/torchair/ops/
# _npu_fused_infer_attention_score.py; the npu_scatter_nd_update converter under _ge_concrete_graph/ge_converter).
# And PyTorch's functional collectives: _ge_concrete_graph/ge_converter/c10d_functional/c10d_functional.py converts
# all_reduce, all_gather_into_tensor, reduce_scatter_tensor, broadcast and wait_tensor (torch >= 2.3.1).
CONVERTERS = {"air::npu_fused_infer_attention_score", "npu::npu_scatter_nd_update_",
              "_c10d_functional::all_reduce", "_c10d_functional::all_gather_into_tensor",
              "_c10d_functional::reduce_scatter_tensor", "_c10d_functional::broadcast",
              "_c10d_functional::wait_tensor"}
_HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item"}
stats = {"graphs": [], "cache_saves": 0, "cache_loads": 0, "traces": 0}


class _Option:
    def __init__(self, value):
        self.value = value


class CompilerConfig:
    """``CompilerConfig()``: ``mode`` is set with a string and read back as ``config.mode.value``."""

    def __init__(self):
        self.__dict__["mode"] = _Option("max-autotune")
        self.experimental_config = types.SimpleNamespace(keep_inference_input_mutations=True)

    def __setattr__(self, name, value):
        if name == "mode":
            if value not in MODES:
                raise ValueError(f"Value {value!r} (type: {type(value)}) not in optional list {list(MODES)!r}")
            self.__dict__["mode"] = _Option(value)
        else:
            super().__setattr__(name, value)


def _target_name(target) -> str:
    return target.name() if isinstance(target, torch._ops.OpOverload) else str(target)


def _check_ge_convertible(fx: torch.fx.GraphModule) -> None:
    for node in fx.graph.nodes:
        if node.op != "call_function" or node.target is getattr(__import__("operator"), "getitem"):
            continue
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            if target.name() not in ("auto_functionalized", "auto_functionalized_v2"):
                raise RuntimeError(f"torchair stand-in: no Ascend converter for higher-order op {target.name()}")
            target = node.args[0]
        name = _target_name(target)
        if name.split("::")[0] in ("aten", "prims") or name in CONVERTERS:
            continue
        raise RuntimeError(f"torchair stand-in: no Ascend converter for {name} (register_fx_node_ge_converter)")


def _check_aclgraph_capturable(fx: torch.fx.GraphModule) -> None:
    for node in fx.graph.nodes:
        if node.op != "call_function":
            continue
        name = _target_name(node.target)
        if name in _HOST_READS:
            raise RuntimeError(f"torchair stand-in: {name} reads device memory on the host; aclgraph cannot capture")
        if name.startswith("air::"):
            raise RuntimeError(f"torchair stand-in: {name} runs in max-autotune mode only")


def _npu_backend(gm, example_inputs, compiler_config=None, decompositions=None):
    config = compiler_config or CompilerConfig()
    mode = config.mode.value
    if any(isinstance(d, torch.SymInt) for t in example_inputs if isinstance(t, torch.Tensor) for d in t.shape):
        raise RuntimeError("torchair stand-in: nanovllm compiles NPU graphs with dynamic=False; got symbolic shapes")
    stats["traces"] += 1

    def fw_compiler(fx, inputs):
        if mode == "max-autotune":
            _check_ge_convertible(fx)
        else:
            _check_aclgraph_capturable(fx)
        stats["graphs"].append({"mode": mode, "ops": [_target_name(n.target) for n in fx.graph.nodes
                                                      if n.op == "call_function"]})

        def run(*args):
            npu_ops.ge_running[0] = mode == "max-autotune"
            try:
                return fx(*args)
            finally:
                npu_ops.ge_running[0] = False
        run._boxed_call = False
        return run
    return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler, decompositions=decompositions or {},
                                 keep_inference_input_mutations=True)


def get_npu_backend(*, compiler_config: CompilerConfig = None, custom_decompositions: dict = {}):  # noqa: B006
    return functools.partial(_npu_backend, compiler_config=compiler_config or CompilerConfig(),
                             decompositions=dict(custom_decompositions))


def _shapes(args) -> list:
    return [(tuple(t.shape), t.dtype, t.device) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]


class _Cached:
    def __init__(self, func, config, dynamic, cache_bin, decompositions):
        self.func, self.cache_bin = func, cache_bin
        backend = get_npu_backend(compiler_config=config, custom_decompositions=decompositions or {})
        self.traces_before = None
        self.compiled = torch.compile(func, backend=backend, fullgraph=True, dynamic=dynamic)
        self.shapes = None
        self.loaded = os.path.exists(cache_bin)

    def __call__(self, *args, **kwargs):
        shapes = _shapes((args, kwargs))
        if self.shapes is None:
            self.shapes, before = shapes, stats["traces"]
            out = self.compiled(*args, **kwargs)
            if stats["traces"] - before > 1:
                raise RuntimeError(f"torchair stand-in: {self.func.__name__} was traced twice; cache_compile "
                                   f"requires one Dynamo trace per func")
            if self.loaded:
                stats["cache_loads"] += 1
            else:
                os.makedirs(os.path.dirname(self.cache_bin), exist_ok=True)
                with open(self.cache_bin, "w") as f:
                    json.dump({"func": self.func.__qualname__, "shapes": repr(shapes)}, f)
                stats["cache_saves"] += 1
            return out
        if shapes != self.shapes:
            raise RuntimeError(f"torchair stand-in: {self.func.__name__} compiled for {self.shapes} got {shapes}; "
                               f"cache_compile skips guards, so each func must see one input signature")
        return self.compiled(*args, **kwargs)


def cache_compile(func, *, config=None, backend=None, dynamic=True, cache_dir=None, global_rank=None, tp_rank=None,
                  pp_rank=None, custom_decompositions=None, ge_cache=False, **kwargs):
    if config is not None and backend is not None and backend.keywords.get("compiler_config") is not config:
        raise ValueError("config in current backend is different from the config during cache generation.")
    if config is None and backend is not None:
        config = backend.keywords.get("compiler_config")
    if not isinstance(func, types.MethodType):
        raise ValueError(f"Only method can be cached now, got {func}")
    if not isinstance(func.__self__, torch.nn.Module):
        raise ValueError(f"Only torch.nn.Module method can be cached now, got {func}")
    config = config or CompilerConfig()
    root = cache_dir or os.getenv("TORCHAIR_CACHE_HOME", os.path.join(os.getcwd(), ".torchair_cache"))
    md5 = hashlib.md5((str(func.__self__) + config.mode.value).encode()).hexdigest()
    tags = [type(func.__self__).__name__, "dynamic" if dynamic else "static"]
    tags += ["aclgraphcache"] if config.mode.value != "max-autotune" else []
    cache_bin = os.path.join(root, "_".join(tags + [md5]), func.__name__, "compiled_module")
    return _Cached(func, config, dynamic, os.path.realpath(cache_bin), custom_decompositions)


def make_torchair() -> types.ModuleType:
    mod = types.ModuleType("torchair")
    mod.__spec__ = importlib.machinery.ModuleSpec("torchair", None)
    mod.__version__ = "0.0.standin"
    mod.CompilerConfig = CompilerConfig
    mod.get_npu_backend = get_npu_backend
    mod.ops = types.ModuleType("torchair.ops")
    mod.ops.npu_fused_infer_attention_score = lambda *a, **k: torch.ops.air.npu_fused_infer_attention_score(*a, **k)
    mod.inference = types.ModuleType("torchair.inference")
    mod.inference.cache_compile = cache_compile
    return mod
