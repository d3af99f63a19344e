"""Block-FP8 checkpoints (``quant_method: "fp8"``, the Qwen3-*-FP8 / DeepSeek-V3 layout), read and written.

A quantized Linear ``X.weight`` is float8_e4m3fn [N, K] with ``X.weight_scale_inv`` float32 [ceil(N/bn), ceil(K/bk)]
for ``weight_block_size`` [bn, bk]: the real weight is the float8 value times its block's scale (the last block in
each dimension may be partial).  The loader keeps such a tensor in float8 with its scales expanded per row
(``read_quantized``: ``kernels/weight_quant.py``'s format), or dequantizes it in float32 into the model's dtype
where the model keeps that parameter unquantized (``read``).  A tensor-parallel rank reads
only its rows or columns of the weight and the matching blocks of the scale; a rank's piece that does not start on a
block boundary (or ends inside a block short of the tensor's end) is an error naming the tensor, the block and the
shard.  ``quantize_checkpoint_fp8`` rewrites a safetensors checkpoint in this layout (for tests and synthesis).
"""
import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nanovllm.config import quantization_config
from nanovllm.kernels import weight_quant
from nanovllm.kernels.kv_quant import FP8_DTYPE, FP8_MAX

SCALE_SUFFIX = "_scale_inv"
_FP8_DTYPES = ("F8_E4M3",)  # safetensors' dtype names of the float8 weights this format stores


def is_float8(f, name: str) -> bool:
    """Whether tensor ``name`` of the open safetensors file ``f`` is stored in float8."""
    return f.get_slice(name).get_dtype() in _FP8_DTYPES


def block_size(hf_config: dict) -> tuple[int, int] | None:
    """``weight_block_size`` of an fp8 checkpoint (validated by ``config.check_quantization``), else None."""
    quant = quantization_config(hf_config)
    if not quant or quant.get("quant_method") != "fp8":
        return None
    return tuple(quant["weight_block_size"])


def describe(hf_config: dict) -> str | None:
    """The start-up line's quantization of a block-FP8 checkpoint none of whose weights stayed float8, else None."""
    block = block_size(hf_config)
    return None if block is None else f"fp8 checkpoint (block {block[0]}x{block[1]}), dequantized at load"


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 ``weight * scale_inv``, each scale expanded over its ``block`` (partial blocks at the end cropped).
    ``scale_inv`` holds exactly the blocks ``weight`` touches, starting at its first row and column."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


class ScaleReader:
    """Finds each float8 weight's ``weight_scale_inv`` partner in any file of the checkpoint and dequantizes
    (a rank's piece of) the weight; use as a context manager (it keeps the files it opened open until exit)."""

    def __init__(self, files: list[str], block: tuple[int, int] | None):
        self.block = block
        self.files = files
        self.where: dict[str, str] | None = None  # scale name -> its file, found at the first float8 tensor
        self._stack = ExitStack()
        self._open: dict[str, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def read(self, f, name: str, cut: tuple[int, int, int] | None) -> torch.Tensor:
        """The float32 dequantized piece of float8 tensor ``name`` (of open file ``f``): all of it (``cut`` None)
        or ``(dim, start, stop)``, stop within the tensor."""
        return dequantize(*self._pieces(f, name, cut), self.block)

    def read_quantized(self, f, name: str, cut: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the float8 piece, float32 scales per row and ``block[1]`` columns: ``weight_quant.py``'s format)."""
        weight, scale_inv = self._pieces(f, name, cut)
        return weight, weight_quant.expand_block_scales(scale_inv, weight.shape[0], self.block[0])

    def _pieces(self, f, name: str, cut: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8 piece, the scale blocks it touches), checked against the block size."""
        scale_name = name + SCALE_SUFFIX
        if self.where is None:
            self.where = self._scan()
        if scale_name not in self.where:
            raise ValueError(f"tensor {name!r} is float8 but the checkpoint has no {scale_name!r} to scale it")
        if self.block is None:
            raise ValueError(f"tensor {name!r} is float8 but config.json has no fp8 quantization_config "
                             f"(weight_block_size) to read its scales by")
        stored = f.get_slice(name)
        shape = stored.get_shape()
        if len(shape) != 2:
            raise ValueError(f"tensor {name!r} is float8 of shape {tuple(shape)}; block-FP8 weights are 2-D")
        scales = self._file(self.where[scale_name]).get_slice(scale_name)
        expected = [-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1])]
        if list(scales.get_shape()) != expected:
            raise ValueError(f"tensor {scale_name!r} has shape {tuple(scales.get_shape())}, weight_block_size "
                             f"{list(self.block)} on {name!r} of shape {tuple(shape)} needs {tuple(expected)}")
        if cut is None:
            return stored[:], scales[:]
        dim, start, stop = cut
        b = self.block[dim]
        if start % b or (stop % b and stop != shape[dim]):
            raise ValueError(f"tensor {name!r}: weight_block_size {list(self.block)} does not divide this "
                             f"tensor-parallel rank's shard, {'rows' if dim == 0 else 'columns'} {start}:{stop} of "
                             f"{shape[dim]} (a shard of {stop - start}); choose a tensor_parallel_size whose shards "
                             f"are multiples of {b}")
        index = (slice(None),) * dim
        return stored[index + (slice(start, stop),)], scales[index + (slice(start // b, -(-stop // b)),)]

    def _scan(self) -> dict[str, str]:
        where = {}
        for path in self.files:  # headers only: the tensors stay on disk
            try:
                with safe_open(path, framework="pt") as f:
                    where.update((name, path) for name in f.keys() if name.endswith(SCALE_SUFFIX))
            except SafetensorError as e:
                raise ValueError(f"safetensors file {path!r} is truncated or corrupt ({e}); copy or download it "
                                 f"again") from e
        return where

    def _file(self, path: str):
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._open[path]


def _quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale_inv per block): each block scaled so that its largest magnitude is FP8_MAX."""
    rows, cols = weight.shape
    nb, kb = -(-rows // block[0]), -(-cols // block[1])
    padded = weight.float().new_zeros(nb * block[0], kb * block[1])
    padded[:rows, :cols] = weight.float()
    amax = padded.view(nb, block[0], kb, block[1]).abs().amax(dim=(1, 3))
    scale_inv = amax.clamp(min=1e-12) / FP8_MAX
    expanded = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() / expanded).to(FP8_DTYPE), scale_inv


def quantizable(name: str, tensor: torch.Tensor, skip: list[str]) -> bool:
    """A Linear weight that the block-FP8 layout stores in float8: 2-D ``*proj.weight`` / ``w1|w2|w3.weight``
    outside the embeddings, the LM head, MoE routers and the modules listed in ``skip``."""
    if tensor.ndim != 2 or not name.endswith(".weight") or any(s in name for s in skip):
        return False
    leaf = name.rsplit(".", 2)[-2]
    return leaf.endswith("proj") or leaf in ("w1", "w2", "w3")


def quantize_checkpoint_fp8(model_dir, block: tuple[int, int] = (128, 128),
                            modules_to_not_convert: list[str] | None = None) -> None:
    """Rewrite the safetensors checkpoint in ``model_dir`` in place in the block-FP8 layout: every quantizable
    weight becomes float8 with its ``weight_scale_inv``, and config.json gets the fp8 ``quantization_config``."""
    from safetensors.torch import load_file, save_file
    model_dir = Path(model_dir)
    skip = list(modules_to_not_convert or [])
    added = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        weights = load_file(str(path))
        for name in [n for n, t in weights.items() if quantizable(n, t, skip)]:
            weights[name], weights[name + SCALE_SUFFIX] = _quantize(weights[name], block)
            added[name + SCALE_SUFFIX] = path.name
        save_file(weights, str(path), metadata=metadata or {"format": "pt"})
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():  # a sharded checkpoint: its index names the new scale tensors too
        index = json.loads(index_path.read_text())
        index["weight_map"].update(added)
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block),
                                     **({"modules_to_not_convert": skip} if skip else {})}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
