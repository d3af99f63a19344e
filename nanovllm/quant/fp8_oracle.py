"""The weights an FP8 engine computes with, as a plain checkpoint transformers can run: the oracle of FP8 weights.

``write_dequantized(src, dst, layout, online)`` copies checkpoint directory ``src`` to ``dst`` with every weight the FP8
engine holds in float8 replaced by its dequantized value in the checkpoint's float dtype: an FP8 checkpoint's float8
tensors times their scales, per block, channel or tensor as its layout says (the scheme's ``layout``; its
``quantization_config`` dropped), or with ``online`` (the engine's ``quantization="fp8"``; the model's dtype, in
which the engine quantizes) each decoder-layer projection and expert weight cast to it, quantized and dequantized
as the engine does (one scale per row, so q/k/v or one expert alone give what the packed tensor gives).
Files other than the weights are copied as they are.  One safetensors file or an index of several.
"""
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from nanovllm.kernels import weight_quant
from nanovllm.quant import fp8_checkpoint


def _dequantized(weights: dict, online, layout, every: dict) -> dict:
    out = {}
    for name, t in weights.items():
        if fp8_checkpoint.is_scale_name(layout, name):
            continue
        if t.dtype == weight_quant.FP8_DTYPE:
            t = layout.dequantize(t, every[name + layout.suffix])
        elif online and name.startswith("model.layers.") and fp8_checkpoint.quantizable(name, t, []):
            t = t.to(online)  # the engine quantizes the weights in the model's dtype
            t = weight_quant.dequantize(*weight_quant.quantize(t, t.shape[-1]), t.shape[-1], t.dtype)  # per row
        out[name] = t
    return out


def write_dequantized(src, dst, layout=None, online=None) -> str:
    """Write ``src``'s oracle to ``dst``: an FP8 checkpoint's of its ``layout`` (``fp8_checkpoint.py``), or with
    ``online`` (a dtype) an unquantized one's under ``quantization="fp8"``; the path written."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    files = sorted(src.glob("*.safetensors"))
    every = {n: t for f in files for n, t in load_file(str(f)).items()} if layout else {}
    for f in files:
        save_file(_dequantized(load_file(str(f)), online, layout, every), str(dst / f.name), metadata={"format": "pt"})
    for extra in src.iterdir():
        if extra.suffix != ".safetensors" and extra.is_file():
            shutil.copy(extra, dst / extra.name)
    if layout:
        config.pop("quantization_config", None)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    index = dst / "model.safetensors.index.json"
    if index.is_file():  # the scale tensors are gone
        data = json.loads(index.read_text())
        data["weight_map"] = {n: f for n, f in data["weight_map"].items()
                              if not fp8_checkpoint.is_scale_name(layout, n)}
        index.write_text(json.dumps(data, indent=2))
    return str(dst)
