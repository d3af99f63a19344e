"""Traced implementations: for an opaque registered op of nanovllm and a device type, a function of ops a graph
compiler converts, which Dynamo traces in place of the op while compiling (never in eager calls).  A platform whose
compiler lowers only ops it knows registers them (the NPU platform, for torchair's Ascend IR mode).

One registry for every op of the ``nanovllm`` namespace, keyed by the op's name inside it: the step's ops
(``kernels/ops.py``) and the tensor-parallel collectives (``distributed/collectives.py``) look them up here.
"""
from typing import Callable

import torch

_TRACED: dict[tuple[str, str], Callable] = {}  # (op name, device type) -> its traced implementation


def register(name: str, device_type: str, fn: Callable | None) -> None:
    """Make ``fn`` (the signature of the op ``nanovllm::<name>``) what Dynamo traces for the op on ``device_type``
    tensors; ``None`` removes it.  Callers check ``name`` against their own ops."""
    if fn is None:
        _TRACED.pop((name, device_type), None)
    else:
        _TRACED[(name, device_type)] = fn


@torch._dynamo.assume_constant_result  # read while tracing, no guard: registering never recompiles other graphs
def has(name: str, device_type: str) -> bool:
    return (name, device_type) in _TRACED


def lookup(name: str, device: torch.device) -> Callable | None:
    """The traced implementation of ``nanovllm::<name>`` for ``device`` while Dynamo compiles, else None."""
    if torch.compiler.is_compiling() and has(name, device.type):
        return _TRACED[(name, device.type)]
    return None
