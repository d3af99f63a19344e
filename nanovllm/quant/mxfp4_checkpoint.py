"""GPT-OSS's published MXFP4 checkpoint layout (``quant_method: "mxfp4"``), written and read back as plain weights.

Only the stacked routed experts are MXFP4; per layer ``X = model.layers.N.mlp.experts``:

* ``X.gate_up_proj_blocks`` uint8 [E, 2I, H/32, 16] and ``X.gate_up_proj_scales`` uint8 [E, 2I, H/32]: output rows
  gate and up interleaved (row 2i gate i, row 2i + 1 up i), as the columns of the plain ``X.gate_up_proj`` [E, H, 2I];
* ``X.down_proj_blocks`` uint8 [E, H, I/32, 16] and ``X.down_proj_scales`` uint8 [E, H, I/32] (plain: [E, I, H]);
* bytes and scales as ``kernels/mxfp4_quant.py`` states; the biases, attention, router, norms, embeddings and LM
  head are plain tensors.  config.json's ``quantization_config`` is ``CONFIG``, as the published ones.

``write_checkpoint`` rewrites a plain GPT-OSS checkpoint so (synthesis); ``write_dequantized`` writes the
dequantized copy that transformers runs as the oracle (experts in the other weights' dtype, exact there).
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanovllm.kernels import mxfp4_quant

PROJECTIONS = ("gate_up_proj", "down_proj")
CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                              "model.embed_tokens", "lm_head"]}


def stored_names(base: str) -> tuple[str, str]:
    """(blocks, scales) names of the plain stacked-expert tensor ``base`` (``X.gate_up_proj``, ``X.down_proj``)."""
    return base + "_blocks", base + "_scales"


def bases(names) -> list[str]:
    """The stacked-expert tensors (``X.gate_up_proj``/``X.down_proj``) that tensor ``names`` store in MXFP4."""
    return sorted(n[:-len("_blocks")] for n in names if n.endswith(tuple(p + "_blocks" for p in PROJECTIONS)))


def dequantize_stored(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The plain tensor (transformers' layout: [E, H, 2I] or [E, I, H]) of stored ``blocks`` [E, R, G, 16] and
    ``scales`` [E, R, G]."""
    return mxfp4_quant.dequantize(blocks.flatten(-2), scales, dtype).transpose(1, 2).contiguous()


def quantize_plain(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [E, R, G, 16], scales [E, R, G]) of a plain stacked-expert tensor in transformers' layout."""
    blocks, scales = mxfp4_quant.quantize(weight.transpose(1, 2))
    return blocks.unflatten(-1, (-1, 16)).contiguous(), scales.contiguous()


def _files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(model_dir.glob("*.safetensors"))


def _rewrite(src: Path, dst: Path, convert, config_edit) -> None:
    """Copy ``src`` to ``dst`` (may be the same) with each safetensors file's tensors through ``convert`` (a dict
    -> a dict), the index's weight map and config.json through ``config_edit``."""
    if src != dst:
        shutil.copytree(src, dst, dirs_exist_ok=True)
    where = {}
    for path in _files(dst):
        tensors = convert(load_file(path))
        save_file(tensors, path, metadata={"format": "pt"})
        where.update((name, path.name) for name in tensors)
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(where.items()))
        index.write_text(json.dumps(data, indent=2))
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config_edit(config), indent=2))


def write_checkpoint(model_dir) -> None:
    """Rewrite the plain GPT-OSS checkpoint in ``model_dir`` with MXFP4 experts (``quantize`` rounds them)."""
    model_dir = Path(model_dir)

    def convert(tensors: dict) -> dict:
        out = {}
        for name, t in tensors.items():
            if name.endswith(tuple(".experts." + p for p in PROJECTIONS)):
                blocks, scales = quantize_plain(t)
                out.update(zip(stored_names(name), (blocks, scales)))
            else:
                out[name] = t
        return out
    _rewrite(model_dir, model_dir, convert, lambda c: {**c, "quantization_config": dict(CONFIG)})


def write_dequantized(src, dst, dtype: torch.dtype | None = None) -> str:
    """Write ``src`` (an MXFP4 checkpoint) to ``dst`` with its experts dequantized into ``dtype`` (None: the other
    weights' float dtype) and no ``quantization_config``; ``dst``'s path."""
    src, dst = Path(src), Path(dst)

    def convert(tensors: dict) -> dict:
        plain = [t.dtype for t in tensors.values() if t.is_floating_point()]
        into = dtype or (plain[0] if plain else torch.bfloat16)
        out = {n: t for n, t in tensors.items() if not n.endswith(("_blocks", "_scales"))}
        for base in bases(tensors):
            blocks, scales = (tensors[n] for n in stored_names(base))
            out[base] = dequantize_stored(blocks, scales, into)
        return out
    _rewrite(src, dst, convert, lambda c: {k: v for k, v in c.items() if k != "quantization_config"})
    return str(dst)
