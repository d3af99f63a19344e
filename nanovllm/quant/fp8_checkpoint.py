"""FP8 checkpoints, read and written: the block layout (``quant_method: "fp8"``, Qwen3-*-FP8 / DeepSeek-V3) and
compressed-tensors' (``compressed_tensors.py``), each a layout object that ``ScaleReader`` reads by.

Block layout: a quantized Linear ``X.weight`` is float8_e4m3fn [N, K] with ``X.weight_scale_inv`` float32
[ceil(N/bn), ceil(K/bk)] for ``weight_block_size`` [bn, bk]: the real weight is the float8 value times its block's
scale (the last block in each dimension may be partial).  The FP8 schemes (``fp8_schemes.py``) keep such a tensor
in float8 with its scales expanded per row (``read_quantized``: ``kernels/weight_quant.py``'s format), or
dequantize it in float32 into the model's dtype where the model keeps that parameter unquantized (``read``).  A
tensor-parallel rank reads only its rows or columns of the weight and the matching scales.  Rows carry their own
scales once read, so a rank's rows may start and end inside a block (the whole blocks are read, then cut); a
block-layout column piece that does not start on a block boundary (or ends inside a block short of the tensor's
end) is an error naming the tensor, the block and the shard.
``quantize_checkpoint`` rewrites a safetensors checkpoint in a layout (for tests and synthesis).
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open

from nanovllm.kernels import weight_quant
from nanovllm.kernels.kv_quant import FP8_DTYPE, FP8_MAX
from nanovllm.quant import fp8_weights
from nanovllm.quant.checkpoint import clamp, pad

SCALE_SUFFIX = "_scale_inv"
_FP8_DTYPES = ("F8_E4M3",)  # safetensors' dtype names of the float8 weights these layouts store


def is_float8(checkpoint, name: str) -> bool:
    """Whether tensor ``name`` of ``checkpoint`` (``checkpoint.Checkpoint``) is stored in float8."""
    return checkpoint.stored_dtype(name) in _FP8_DTYPES


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 ``weight * scale_inv``, each scale expanded over its ``block`` (partial blocks at the end cropped).
    ``scale_inv`` holds exactly the blocks ``weight`` touches, starting at its first row and column."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def is_scale_name(layout, name: str) -> bool:
    """Whether tensor ``name`` is a float8 weight's scale in a checkpoint of ``layout`` (None: no FP8 layout)."""
    return layout is not None and name.endswith(".weight" + layout.suffix)


class BlockLayout:
    """A ``weight_scale_inv`` per [bn, bk] block; in memory, scales per row and bk columns."""
    suffix = SCALE_SUFFIX

    def __init__(self, block: tuple[int, int] = (128, 128)):
        self.block = tuple(block)
        self.name = f"block {self.block[0]}x{self.block[1]}"
        self.row_block = self.block[0]  # a rank's rows are read widened to whole blocks (``ScaleReader``)

    def group(self, k: int) -> int:
        return self.block[1]

    def scale_piece(self, name: str, shape: tuple, scales, cut: tuple[int, int, int] | None) -> torch.Tensor:
        """The scale blocks that the piece ``cut`` (None, or ``(dim, start, stop)``) of float8 tensor ``name``
        (stored ``shape``) touches, checked against the block size; ``scales`` is the stored scales' slice."""
        expected = [-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1])]
        if list(scales.get_shape()) != expected:
            raise ValueError(f"tensor {name + self.suffix!r} has shape {tuple(scales.get_shape())}, weight_block_size "
                             f"{list(self.block)} on {name!r} of shape {tuple(shape)} needs {tuple(expected)}")
        if cut is None:
            return scales[:]
        dim, start, stop = cut
        b = self.block[dim]
        if start % b or (stop % b and stop != shape[dim]):
            raise ValueError(f"tensor {name!r}: weight_block_size {list(self.block)} does not divide this "
                             f"tensor-parallel rank's shard, {'rows' if dim == 0 else 'columns'} {start}:{stop} of "
                             f"{shape[dim]} (a shard of {stop - start}); choose a tensor_parallel_size whose shards "
                             f"are multiples of {b}")
        return scales[(slice(None),) * dim + (slice(start // b, -(-stop // b)),)]

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize(weight, scale, self.block)

    def row_scales(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return weight_quant.expand_block_scales(scale, weight.shape[0], self.block[0])

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8 weight, float32 scale_inv per block): each block scaled so that its largest magnitude is
        FP8_MAX."""
        rows, cols = weight.shape
        block = self.block
        nb, kb = -(-rows // block[0]), -(-cols // block[1])
        padded = weight.float().new_zeros(nb * block[0], kb * block[1])
        padded[:rows, :cols] = weight.float()
        amax = padded.view(nb, block[0], kb, block[1]).abs().amax(dim=(1, 3))
        scale_inv = amax.clamp(min=1e-12) / FP8_MAX
        expanded = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        return (weight.float() / expanded).to(FP8_DTYPE), scale_inv

    def quantization_config(self, skip: list[str]) -> dict:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(self.block), **({"modules_to_not_convert": skip} if skip else {})}


def prepare_model(model, names: set[str], layout) -> None:
    """Make the model's parameters ``names`` empty FP8 ones for the loader to fill in ``layout``'s scales
    (``fp8_weights.prepare_for_checkpoint``).  A module's FP8 parameters share one group: the largest
    ``layout.group`` of their (this rank's) column counts, which is the layout's own for each of them where scales
    span whole rows (a group past a parameter's columns still means one scale per row)."""
    owners = fp8_weights.quantizable(model)
    targets = names & owners.keys()
    group_of: dict[int, int] = {}
    for name in targets:
        module, attr = owners[name]
        group_of[id(module)] = max(group_of.get(id(module), 0), layout.group(getattr(module, attr).shape[-1]))
    by_group: dict[int, set[str]] = {}
    for name in targets:
        by_group.setdefault(group_of[id(owners[name][0])], set()).add(name)
    for group, members in by_group.items():
        fp8_weights.prepare_for_checkpoint(model, members, group)


class ScaleReader:
    """Reads (a rank's piece of) a float8 weight of a ``checkpoint.Checkpoint`` with its scale partner
    (``layout.suffix``) by ``layout``; ``cut`` is a rank's ``(dim, start, length)``, None: all of it."""

    def __init__(self, checkpoint, layout):
        self.checkpoint, self.layout = checkpoint, layout

    def read(self, name: str, cut: tuple[int, int, int] | None) -> torch.Tensor:
        """The float32 dequantized piece of float8 tensor ``name``, padded with zero rows past its end."""
        weight, scale, rows = self._pieces(name, clamp(cut, self.checkpoint.slice(name).get_shape()))
        return pad(self.layout.dequantize(weight, scale)[rows], cut)

    def read_quantized(self, name: str, cut: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the float8 piece, its float32 scales per row: ``weight_quant.py``'s format)."""
        weight, scale, rows = self._pieces(name, None if cut is None else (cut[0], cut[1], cut[1] + cut[2]))
        return weight[rows], self.layout.row_scales(weight, scale)[rows]

    def _pieces(self, name: str, cut: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """(float8 piece, the stored scales it needs, the rows of the piece ``cut`` asked for), checked by the
        layout; ``cut``: ``(dim, start, stop)``, a row cut widened to the layout's whole blocks of rows."""
        scale_name = name + self.layout.suffix
        if scale_name not in self.checkpoint:
            raise ValueError(f"tensor {name!r} is float8 but the checkpoint has no {scale_name!r} to scale it")
        stored = self.checkpoint.slice(name)
        shape = stored.get_shape()
        if len(shape) != 2:
            raise ValueError(f"tensor {name!r} is float8 of shape {tuple(shape)}; FP8 weights are 2-D")
        rows = slice(None)
        if cut is not None and cut[0] == 0:
            b, (_, start, stop) = self.layout.row_block, cut
            cut = (0, start // b * b, min(-(-stop // b) * b, shape[0]))
            rows = slice(start - cut[1], stop - cut[1])
        scales = self.layout.scale_piece(name, shape, self.checkpoint.slice(scale_name), cut)
        if cut is None:
            return stored[:], scales, rows
        dim, start, stop = cut
        return stored[(slice(None),) * dim + (slice(start, stop),)], scales, rows


def quantizable(name: str, tensor: torch.Tensor, skip: list[str]) -> bool:
    """A Linear weight that the FP8 layouts store in float8: 2-D ``*proj.weight`` / ``in_proj_*.weight`` (the
    hybrid models' linear-attention inputs) / ``w1|w2|w3.weight`` outside the embeddings, the LM head, MoE routers
    and the modules listed in ``skip``."""
    if tensor.ndim != 2 or not name.endswith(".weight") or any(s in name for s in skip):
        return False
    leaf = name.rsplit(".", 2)[-2]
    return leaf.endswith("proj") or leaf.startswith("in_proj_") or leaf in ("w1", "w2", "w3")


def quantize_checkpoint(model_dir, layout, skip: list[str] | None = None) -> None:
    """Rewrite the safetensors checkpoint in ``model_dir`` in place in ``layout``: every quantizable weight
    (outside ``skip``) becomes float8 with its scale tensor, and config.json gets the layout's
    ``quantization_config``."""
    from safetensors.torch import load_file, save_file
    model_dir = Path(model_dir)
    skip = list(skip or [])
    added = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        weights = load_file(str(path))
        for name in [n for n, t in weights.items() if quantizable(n, t, skip)]:
            weights[name], weights[name + layout.suffix] = layout.quantize(weights[name])
            added[name + layout.suffix] = path.name
        save_file(weights, str(path), metadata=metadata or {"format": "pt"})
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():  # a sharded checkpoint: its index names the new scale tensors too
        index = json.loads(index_path.read_text())
        index["weight_map"].update(added)
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = layout.quantization_config(skip)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def quantize_checkpoint_fp8(model_dir, block: tuple[int, int] = (128, 128),
                            modules_to_not_convert: list[str] | None = None) -> None:
    """``quantize_checkpoint`` in the block layout of ``block``, ``modules_to_not_convert`` left unquantized."""
    quantize_checkpoint(model_dir, BlockLayout(block), modules_to_not_convert)
