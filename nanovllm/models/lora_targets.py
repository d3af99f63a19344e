"""What a model tells the LoRA pool (``lora/pool.py``) about the projections PEFT adapters target in a layer.

A model serving adapters has ``lora_targets()``: per layer, a list of ``Target(linear, parts, column, scale)``:
``linear`` holds the slot buffers; ``parts`` its PEFT modules in the order they are packed in it (one for an unpacked
projection); ``column``: tensor parallelism splits its outputs (else its inputs: row-parallel); ``scale``: a factor
the model folded into the weight after loading (MiniCPM's residual scale on o/down), so an adapter's product gets it
too.  ``Part(module, size, span, offset)``: the PEFT module name, the unsplit projection's (in, out) features, this
rank's [lo, hi) of its outputs (column) or inputs (row), and where they start in ``linear``'s own outputs.
``attention`` and ``mlp`` describe the usual layouts: q/k/v packed (``qkv_proj``) or separate (``q_proj``, ``k_proj``,
``v_proj``; a missing one, such as a KV-shared layer's k/v, is left out) with ``o_proj``; gate/up packed with down.
"""
from typing import NamedTuple

from torch import nn

import nanovllm.distributed as distributed
from nanovllm.models import tensor_parallel as tp


class Part(NamedTuple):
    module: str
    size: tuple[int, int]
    span: tuple[int, int]
    offset: int


class Target(NamedTuple):
    linear: nn.Linear
    parts: list[Part]
    column: bool
    scale: float = 1.0


def _rank_span(local: int) -> tuple[int, int]:
    rank = distributed.current().rank
    return rank * local, (rank + 1) * local


def column(linear: nn.Linear, parts: list[tuple[str, int, tuple[int, int]]]) -> Target:
    """A column-parallel projection packing ``parts`` (module, unsplit output features, this rank's [lo, hi) of
    them), one after another in its outputs."""
    out, offset = [], 0
    for module, total, (lo, hi) in parts:
        out.append(Part(module, (linear.in_features, total), (lo, hi), offset))
        offset += hi - lo
    return Target(linear, out, True)


def row(linear: nn.Linear, module: str) -> Target:
    """A row-parallel projection: each rank holds an equal slice of the inputs, in rank order."""
    local = linear.in_features
    total = local * distributed.current().size
    return Target(linear, [Part(module, (total, linear.out_features), _rank_span(local), 0)], False)


def attention(attn: nn.Module, kv_heads: int) -> list[Target]:
    """q/k/v and o of ``attn`` (``head_dim``, this rank's ``q_size`` and ``kv_size``); ``kv_heads``: the unsplit
    count (a rank holds ``tp.kv_heads``' slice of them, replicated where there are fewer than ranks)."""
    d = attn.head_dim
    q = ("q_proj", attn.q_size * distributed.current().size, _rank_span(attn.q_size))
    first = tp.kv_heads(kv_heads)[1] * d
    kv = (first, first + attn.kv_size)
    k, v = ("k_proj", kv_heads * d, kv), ("v_proj", kv_heads * d, kv)
    o = row(attn.o_proj, "o_proj")
    if hasattr(attn, "qkv_proj"):
        return [column(attn.qkv_proj, [q, k, v]), o]
    own = ((getattr(attn, part[0], None), part) for part in (q, k, v))
    return [column(linear, [part]) for linear, part in own if linear is not None] + [o]


def mlp(block: nn.Module) -> list[Target]:
    """gate/up (packed ``gate_up_proj``) and down of a dense MLP; a ``ValueError`` for another block (experts)."""
    gate_up, down = getattr(block, "gate_up_proj", None), getattr(block, "down_proj", None)
    if not (isinstance(gate_up, nn.Linear) and isinstance(down, nn.Linear)):
        raise ValueError(f"LoRA adapters run on dense MLPs only, not on a {type(block).__name__}")
    span = _rank_span(down.in_features)
    total = down.in_features * distributed.current().size
    return [column(gate_up, [("gate_proj", total, span), ("up_proj", total, span)]), row(down, "down_proj")]
