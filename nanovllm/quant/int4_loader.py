"""A GPTQ or AWQ checkpoint's int4 Linears, read into a model (``int4_schemes.Int4Checkpoint.load`` calls ``load``).

Every checkpoint Linear ``X`` stored as ``X.qweight``, ``X.qzeros``, ``X.scales`` (and ``X.g_idx``) is converted to
the in-memory int4 format (``int4_formats.py``: rows are output features) and placed through the loader's own name
mapping of ``X.weight``: q/k/v into qkv and gate/up into gate_up at their row offsets, which apply to qweight,
scale and zero rows alike, and per-expert Linears into their expert's slice of the stacked experts (gate or up
rows of ``gate_up_proj``, all of ``down_proj``).  A parameter stays int4 (``int4_weights.py``) where every
checkpoint part of it is int4 with one act order, routed experts only with none (GPTQ's desc_act permutes each
expert's columns its own way) and both stacks of a layer's experts or neither; any other is dequantized into the
model's dtype.  Tensor parallelism: a column-parallel rank (gate/up, experts' too) takes its rows; a row-parallel
one (down, experts' too) its columns, i.e. qweight bytes and scale/zero groups, so its columns must start and end
on group boundaries or lie inside one group (else a ValueError naming the layer, the group and the shard).
GPTQ's desc_act is refused with more than one rank.
"""
import torch
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.kernels import int4_quant
from nanovllm.quant import int4_formats, int4_weights
from nanovllm.quant.checkpoint import Checkpoint

SUFFIX = ".qweight"


def load(model: nn.Module, tensors: Checkpoint, scheme: dict, filled: dict[str, set], placement) -> None:
    """Place the checkpoint's int4 Linears into ``model`` (``scheme``: ``int4_checkpoint.int4_fields``' dict),
    recording each part placed in ``filled`` as the loader does; ``placement``: ``models/placement.Placement``."""
    if scheme["desc_act"] and distributed.current().size > 1:
        raise ValueError(f"quantization_config.desc_act=True (GPTQ act order) is not supported with "
                         f"tensor_parallel_size={distributed.current().size}: a rank's input columns would be "
                         f"permuted across shards; use tensor_parallel_size=1 or a checkpoint without desc_act")
    bases = sorted(n[:-len(SUFFIX)] for n in tensors.names() if n.endswith(SUFFIX))
    held = _held_in_int4(model, tensors, bases, placement, scheme["group"])
    int4_weights.prepare_for_checkpoint(model, held, scheme["group"])
    params = dict(model.named_parameters(remove_duplicate=False))
    dequantized = set()
    for base in bases:
        target, where = placement.target(base + ".weight")
        if target not in params:
            continue
        qweight, scale, zero, perm = _convert(tensors, base, scheme)
        if target in held:
            _place_int4(model, base, target, where, (qweight, scale, zero, perm), scheme["group"], placement)
        else:
            weight = int4_quant.dequantize(qweight, scale, zero, int4_formats.group_width(
                scheme["group"], qweight.shape[1] * 2), torch.float32)
            if perm is not None:  # back to the stored column order
                weight = torch.empty_like(weight).index_copy_(1, perm.long(), weight)
            cut = placement.cut(target, where, _local_shape(placement, target, where, params[target]))
            if cut is not None:
                weight = weight.narrow(cut[0], cut[1], cut[2])
            placement.copy(base + ".weight", target, where, weight, params[target])
            dequantized.add(target)
        filled.setdefault(target, set()).add(where)
    model.int4_scheme = dict(method=scheme["method"], group=scheme["group"], dequantized=sorted(dequantized))


def _held_in_int4(model: nn.Module, tensors: Checkpoint, bases: list[str], placement, group: int) -> set[str]:
    """Our parameters that stay int4: ones ``int4_weights`` may hold, every checkpoint part of which is int4 and
    whose parts share one act order (their ``g_idx``; experts' must be the plain one), a layer's experts whole."""
    weights = [base + ".weight" for base in bases]  # the int4 Linears, as the loader names a plain one's weight
    parts = placement.places([n for n in tensors.names() if n.endswith(".weight")] + weights)
    int4 = placement.places(weights)
    orders: dict[str, list] = {}
    for base, weight in zip(bases, weights):
        orders.setdefault(placement.target(weight)[0], []).append(tensors.get(base + ".g_idx"))
    candidates = int4_weights.quantizable(model)
    held = {t for t, got in int4.items() if t in candidates and got == parts[t] and _one_order(orders[t])
            and (candidates[t][1] == "weight" or all(_plain_order(g, group) for g in orders[t]))}
    modules: dict[int, list[str]] = {}
    for name, (module, _) in candidates.items():
        modules.setdefault(id(module), []).append(name)
    return {t for t in held if all(n in held for n in modules[id(candidates[t][0])])}


def _plain_order(g_idx: torch.Tensor | None, group: int) -> bool:
    """Whether ``g_idx`` (None: absent) puts column k in group k // group, i.e. permutes nothing."""
    if g_idx is None:
        return True
    k = g_idx.shape[0]
    return torch.equal(g_idx.to(torch.int64), torch.arange(k) // int4_formats.group_width(group, k))


def _one_order(g_idx: list) -> bool:
    first = g_idx[0]
    return all((g is None and first is None) or (g is not None and first is not None and torch.equal(g, first))
               for g in g_idx)


def _convert(tensors: Checkpoint, base: str, scheme: dict):
    """(qweight uint8 [N, K/2], scale, zero, perm or None) of checkpoint Linear ``base``, in our format."""
    qweight, qzeros, scales = (tensors.get(f"{base}.{s}") for s in ("qweight", "qzeros", "scales"))
    missing = [f"{base}.{s}" for s, t in (("qzeros", qzeros), ("scales", scales)) if t is None]
    if missing:
        raise ValueError(f"checkpoint Linear {base!r} has a qweight but lacks {missing}")
    try:
        if scheme["method"] == "awq":
            return (*int4_formats.awq_to_int4(qweight, qzeros, scales, scheme["group"]), None)
        return int4_formats.gptq_to_int4(qweight, qzeros, scales, tensors.get(base + ".g_idx"), scheme["group"],
                                         scheme["v2"])
    except ValueError as e:
        raise ValueError(f"checkpoint Linear {base!r}: {e}") from e


def _local_shape(placement, target: str, where, param: torch.Tensor) -> tuple:
    """The shape (in float columns) of this rank's piece of checkpoint part ``where`` of ``target``."""
    shape = tuple(param.shape[:-1]) + (param.shape[-1] * (2 if param.dtype == torch.uint8 else 1),)
    return placement.local_shape(target, where, shape)


def _place_int4(model: nn.Module, base: str, target: str, where, weight: tuple, group: int, placement) -> None:
    """This rank's piece of one converted Linear into int4 parameter ``target``: qweight, scale and zero rows."""
    module, _, attr = target.rpartition(".")
    module = model.get_submodule(module)
    param = getattr(module, attr)
    qweight, scale, zero, perm = weight
    k = qweight.shape[1] * 2
    cut = placement.cut(target, where, _local_shape(placement, target, where, param))
    if cut is not None and cut[0] == 0:
        qweight, scale, zero = (t.narrow(0, cut[1], cut[2]) for t in (qweight, scale, zero))
    elif cut is not None:
        start, stop = cut[1], cut[1] + cut[2]
        width = int4_formats.group_width(group, k)
        inside_one = start // width == (stop - 1) // width
        if not inside_one and (start % width or (stop % width and stop != k)):
            raise ValueError(f"layer {base!r}: int4 group_size {group} does not divide this tensor-parallel rank's "
                             f"shard, input columns {start}:{stop} of {k} (a shard of {stop - start}); choose a "
                             f"tensor_parallel_size whose shards are multiples of {width}")
        first = start // width
        qweight = qweight[:, start // 2:stop // 2]
        scale, zero = (t[:, first:first + _scale_count(start, stop, width)] for t in (scale, zero))
    name = base + ".weight"
    placement.copy(name, target, where, qweight, param)
    placement.copy(name + "_scale", target, where, scale, getattr(module, f"{attr}_scale"))
    placement.copy(name + "_zero", target, where, zero, getattr(module, f"{attr}_zero"))
    if perm is not None:  # a projection's: experts with an act order are not held in int4
        module.weight_perm = perm.to(param.device)


def _scale_count(start: int, stop: int, width: int) -> int:
    """The groups of ``width`` columns that columns ``start:stop`` touch."""
    return (stop - 1) // width - start // width + 1
