"""Where a checkpoint tensor goes in a model: ``Placement(model)`` maps HF names to our parameters and copies a
rank's piece into its place.  The loader and the quantization schemes (``nanovllm/quant/``) place through it.

Names are mapped as the model declares: ``checkpoint_prefixes`` (a leading prefix rewritten), ``unpacked_prefixes``
(names taken as they are), ``checkpoint_renames`` (a module renamed), ``packed_modules`` (q/k/v, gate/up copied
into their rows of the packed parameter) and ``expert_weights`` (per-expert tensors stacked into
``experts.<stacked>``).  A place (``where``) is None for the whole parameter, ``i`` for part i of a packed one, or
``(expert, half)`` for one expert of a stacked one (half None: all its rows, else 0 gate, 1 up).  A whole parameter
that the checkpoint stores in another layout (``stored_layouts``: a ``StoredLayout`` by the ending of our name, e.g.
GPT-OSS's transposed, interleaved experts) is read in that layout, cut there for a rank, then turned into ours.  A
tensor of the wrong shape is a ValueError naming it and both shapes.
"""
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.models.tensor_parallel import checkpoint_slice

_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")


@dataclass(frozen=True)
class StoredLayout:
    """A parameter the checkpoint stores otherwise: stored dim i is our dim ``dims[i]``; tensor parallelism cuts
    stored dim ``split_dim`` into equal pieces, one a rank (None: every rank reads all of it); ``to_ours`` turns a
    stored tensor (or a rank's piece) into our layout."""
    dims: tuple[int, ...]
    split_dim: int | None
    to_ours: Callable[[torch.Tensor], torch.Tensor]


class Placement:
    def __init__(self, model: nn.Module):
        self.model = model
        self.args = getattr(model, "args", None)

    def params(self) -> dict[str, torch.Tensor]:
        """The parameters a checkpoint fills, by our name (not a tied LM head: ``tie_lm_head`` fills it)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        if getattr(self.args, "tie_word_embeddings", False):
            params.pop("lm_head.weight", None)
        return params

    def layout(self, target: str, where) -> StoredLayout | None:
        """The stored layout of the whole parameter ``target`` where the model declares one (else None)."""
        if where is None:
            for ending, layout in getattr(self.model, "stored_layouts", {}).items():
                if target.endswith(ending):
                    return layout
        return None

    def target(self, name: str) -> tuple[str, object]:
        """HF tensor name -> (our parameter name, where in it the tensor goes)."""
        model = self.model
        for old, new in getattr(model, "checkpoint_prefixes", {}).items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        for old, new in getattr(model, "checkpoint_renames", {}).items():
            name = name.replace(f".{old}.", f".{new}.")
        if name.startswith(getattr(model, "unpacked_prefixes", ())):
            return name, None
        m = _EXPERT.match(name)
        experts = getattr(model, "expert_weights", {})
        if m and m["part"] in experts:
            stacked, half = experts[m["part"]]
            return f"{m['prefix']}.{stacked}", (int(m["expert"]), half)
        for packed_name, parts in getattr(model, "packed_modules", {}).items():
            for i, part in enumerate(parts):
                if f".{part}." in name:
                    return name.replace(f".{part}.", f".{packed_name}."), i
        return name, None

    def places(self, names) -> dict[str, set]:
        """Our parameter -> the places (``target``'s ``where``) that the checkpoint tensors ``names`` fill in it."""
        out: dict[str, set] = {}
        for name in names:
            target, where = self.target(name)
            out.setdefault(target, set()).add(where)
        return out

    def checkpoint_name(self, name: str) -> str:
        """Our name -> the checkpoint's (renames and prefixes undone; the newest naming), for error messages."""
        for old, new in getattr(self.model, "checkpoint_renames", {}).items():
            name = name.replace(f".{new}.", f".{old}.")
        for old, new in getattr(self.model, "checkpoint_prefixes", {}).items():
            if name.startswith(new):
                return old + name[len(new):]
        return name

    def packed_sizes(self, target: str, rows: int) -> list[int]:
        """The rows of each part of packed parameter ``target`` of (this rank's) ``rows`` (q/k/v sizes from the
        attention, gate/up halves; a model with its own layout answers through its ``packed_sizes``)."""
        own = getattr(self.model, "packed_sizes", None)
        if own is not None:
            return own(target, rows)
        a = self.args
        if ".qkv_proj." in target:
            kv = (rows - a.head_dim * a.num_heads // distributed.current().size) // 2
            return [rows - 2 * kv, kv, kv]
        if ".gate_up_proj." in target:
            return [rows // 2] * 2
        raise AssertionError(f"unknown packed parameter {target}")

    def local_shape(self, target: str, where, shape: tuple) -> tuple:
        """The shape of this rank's piece of checkpoint part ``where`` of a parameter of (this rank's) ``shape``,
        in the checkpoint tensor's layout (a packed int4 parameter: ``shape`` in float columns)."""
        if where is None:
            layout = self.layout(target, where)
            return tuple(shape) if layout is None else tuple(shape[d] for d in layout.dims)
        if isinstance(where, tuple):  # one expert: its gate or up rows, or all its rows
            local = tuple(shape[1:])
            return local if where[1] is None else (local[0] // 2,) + local[1:]
        return (self.packed_sizes(target, shape[0])[where],) + tuple(shape[1:])

    def cut(self, target: str, where, local_shape: tuple) -> tuple[int, int, int] | None:
        """(dim, start, length) of the checkpoint tensor this rank's piece reads, or None: all of it."""
        layout = self.layout(target, where)
        if layout is None:
            return checkpoint_slice(target, where, local_shape, self.args)
        tp = distributed.current()
        if tp.size == 1 or layout.split_dim is None:
            return None
        length = local_shape[layout.split_dim]
        return layout.split_dim, tp.rank * length, length

    @torch.no_grad()
    def copy(self, name: str, target: str, where, tensor: torch.Tensor, param: torch.Tensor) -> None:
        """Copy checkpoint tensor ``name`` (this rank's piece) into its place ``where`` in ``param``."""
        if where is None:
            dst = param
            layout = self.layout(target, where)
            if layout is not None:
                stored = tuple(param.shape[d] for d in layout.dims)
                if tuple(tensor.shape) != stored:
                    raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {stored}")
                tensor = layout.to_ours(tensor)
        elif isinstance(where, tuple):
            expert, half = where
            if expert >= param.shape[0]:
                raise ValueError(f"tensor {name!r} is for expert {expert}, the model has {param.shape[0]} experts")
            dst = param[expert]
            if half is not None:
                rows = dst.shape[0] // 2
                dst = dst[half * rows:(half + 1) * rows]
        else:
            sizes = self.packed_sizes(target, param.shape[0])
            start = sum(sizes[:where])
            dst = param[start:start + sizes[where]]
        if tuple(tensor.shape) != tuple(dst.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(dst.shape)}")
        dst.copy_(tensor.to(param.dtype))

    def missing_parts(self, target: str, param: torch.Tensor, got: set) -> list[str]:
        """The checkpoint tensors (our names) that would fill what ``got`` left empty of parameter ``target``."""
        prefix, leaf = target.rsplit(".", 1)
        experts = getattr(self.model, "expert_weights", {})
        if prefix.endswith(".experts") and any(stacked == leaf for stacked, _ in experts.values()):
            return [f"{prefix}.{e}.{part}.weight" for e in range(param.shape[0])
                    for part, (stacked, half) in experts.items() if stacked == leaf and (e, half) not in got]
        for packed_name, parts in getattr(self.model, "packed_modules", {}).items():
            if f".{packed_name}." in target:
                return [target.replace(f".{packed_name}.", f".{p}.") for i, p in enumerate(parts) if i not in got]
        return [target]
