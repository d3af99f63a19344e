"""MXFP4 experts in a model: which parameters hold MXFP4, how their module holds them, reading a checkpoint's.

Held in MXFP4 are the stacked routed experts a model's ``quant_targets`` lists (``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I], both or neither; projections, embeddings, router, norms and biases stay in the model's
dtype).  A held parameter ``P`` becomes the uint8 ``blocks`` [E, R, C/2] of ``kernels/mxfp4_quant.py``, its module
gains the uint8 buffer ``P_scale`` [E, R, C/32], ``quant_group`` 32 and ``weight_format`` ``held.MXFP4``; ours are
gate rows then up rows, as the plain parameters (the checkpoint interleaves them: ``mxfp4_checkpoint.py``).

Tensor parallelism: a rank reads its run of the checkpoint's interleaved gate/up rows (2I / ranks of them, then
de-interleaved, as the plain loader cuts the plain columns) and its whole blocks of the down columns (I / ranks
must be a multiple of 32, else a ValueError naming the layer).  ``model.mxfp4_scheme`` records it for ``describe``.
"""
import torch
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.kernels import mxfp4_quant
from nanovllm.quant import held, mxfp4_checkpoint
from nanovllm.quant.checkpoint import Checkpoint


def experts(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Our parameter name -> (module, attribute) of every stacked-expert parameter that may be held in MXFP4."""
    return {n: (m, a) for n, (m, a, _) in model.quant_targets().items() if a in mxfp4_checkpoint.PROJECTIONS}


def hold(module: nn.Module, attr: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """Make ``module``'s parameter ``attr`` the MXFP4 weight (``blocks``, its ``scales``)."""
    setattr(module, attr, nn.Parameter(blocks, requires_grad=False))
    module.register_buffer(f"{attr}_scale", scales, persistent=False)
    module.quant_group, module.weight_format = mxfp4_quant.BLOCK, held.MXFP4


def _check_columns(name: str, k: int) -> None:
    if k % mxfp4_quant.BLOCK:
        raise ValueError(f"{name!r}: MXFP4 experts need a multiple of {mxfp4_quant.BLOCK} input columns on each "
                         f"rank, got {k} (choose a tensor_parallel_size that keeps whole blocks)")


def deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows (dim 1) 0, 2, 4, ... (gate) then 1, 3, ... (up)."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


def load(model: nn.Module, checkpoint: Checkpoint, placement, filled: dict[str, set]) -> None:
    """Read the checkpoint's MXFP4 experts into ``model`` (held as the module docstring says), recording each
    parameter filled in ``filled``; ``placement``: ``models/placement.Placement`` (maps the names)."""
    targets = experts(model)
    tp = distributed.current()
    count = 0
    for base in mxfp4_checkpoint.bases(checkpoint.names()):
        target, where = placement.target(base)
        if target not in targets or where is not None:
            continue
        module, attr = targets[target]
        old = getattr(module, attr)
        rows, k = old.shape[1], old.shape[2]  # this rank's
        names = mxfp4_checkpoint.stored_names(base)
        missing = [n for n in names if n not in checkpoint]
        if missing:
            raise ValueError(f"checkpoint has {names[0]!r} but lacks {missing}")
        stored = [checkpoint.slice(n) for n in names]
        _check_columns(base, k)
        if attr == "gate_up_proj":  # rows split, interleaved
            pieces = [deinterleave_rows(s[:, tp.rank * rows:(tp.rank + 1) * rows]) for s in stored]
        else:  # input columns split: whole blocks
            groups = k // mxfp4_quant.BLOCK
            pieces = [stored[0][:, :rows, tp.rank * groups:(tp.rank + 1) * groups],
                      stored[1][:, :rows, tp.rank * groups:(tp.rank + 1) * groups]]
        blocks, scales = pieces[0].flatten(-2), pieces[1]
        want = (old.shape[0], rows, k // 2), (old.shape[0], rows, k // mxfp4_quant.BLOCK)
        if (tuple(blocks.shape), tuple(scales.shape)) != want:
            raise ValueError(f"tensors {names} have shapes {tuple(stored[0].get_shape())}, "
                             f"{tuple(stored[1].get_shape())}; the model expects this rank's piece as {want}")
        hold(module, attr, blocks.to(old.device).contiguous(), scales.to(old.device).contiguous())
        filled.setdefault(target, set()).add(None)
        count += 1
    _both_or_neither(targets)
    model.mxfp4_scheme = dict(count=count)


def _both_or_neither(targets: dict) -> None:
    """A ValueError where a module holds one expert stack in MXFP4 and the other plain."""
    for name, (module, attr) in targets.items():
        if held.format_of(module) is held.MXFP4 and not hasattr(module, f"{attr}_scale"):
            raise ValueError(f"{name!r} is plain but its module's other expert stack is MXFP4: a checkpoint stores a "
                             f"layer's gate_up_proj and down_proj both in MXFP4 or neither")


@torch.no_grad()
def draw_held(name: str, module: nn.Module, attr: str, draw, device: torch.device) -> None:
    """Dummy MXFP4 experts for the meta stack ``attr`` [E, R, C] of ``module``: each expert's values ``draw((R,
    C))``, quantized and held on ``device``, so no stack is ever whole in 16 bits."""
    num, rows, cols = getattr(module, attr).shape
    _check_columns(name, cols)
    blocks = torch.empty((num, rows, cols // 2), dtype=torch.uint8, device=device)
    scales = torch.empty((num, rows, cols // mxfp4_quant.BLOCK), dtype=torch.uint8, device=device)
    for e in range(num):
        blocks[e], scales[e] = mxfp4_quant.quantize(draw((rows, cols)))
    hold(module, attr, blocks, scales)


@torch.no_grad()
def quantize_online(model: nn.Module, device: torch.device | None = None) -> None:
    """Quantize every stacked-expert parameter of the loaded ``model`` to MXFP4 in place (dummy weights of an MXFP4
    config; those ``draw_held`` made are held already); with ``device`` each is quantized there and held where it
    was."""
    count = 0
    for name, (module, attr) in experts(model).items():
        count += 1
        if hasattr(module, f"{attr}_scale"):
            continue
        weight = getattr(module, attr)
        _check_columns(name, weight.shape[-1])
        blocks, scales = mxfp4_quant.quantize(weight.to(device or weight.device))
        hold(module, attr, blocks.to(weight.device), scales.to(weight.device))
    model.mxfp4_scheme = dict(count=count)


def describe(model: nn.Module) -> str | None:
    """``"MXFP4 experts (N of M expert stacks)"``, or None where nothing is held in MXFP4."""
    if getattr(model, "mxfp4_scheme", None) is None:
        return None
    stacks = experts(model)
    count = sum(held.format_of(m) is held.MXFP4 for m, _ in stacks.values())
    return f"MXFP4 experts ({count} of {len(stacks)} expert stacks)"
