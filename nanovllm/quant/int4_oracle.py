"""The weights a GPTQ or AWQ checkpoint stands for, as a plain checkpoint transformers can run: the int4 oracle.

``write_dequantized(src, dst)`` copies checkpoint directory ``src`` to ``dst`` with every int4 Linear ``X``
(``X.qweight``, ``X.qzeros``, ``X.scales``, GPTQ's ``X.g_idx``) replaced by ``X.weight``, its real value computed
in float32 straight from the stored words, by the formats' own definitions (``quant/int4_formats.py`` states
them), not by the engine's loader: GPTQ column k of output row n is ``(code - zero) * scale`` of group
``g_idx[k]``, AWQ's of group ``k // group``; then cast to the checkpoint's float dtype (that of the other weights).
config.json loses its ``quantization_config``; other files are copied as they are.  One safetensors file or an
index of several.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanovllm.quant.int4_formats import AWQ_ORDER, GPTQ_ORDER, PARTS, group_width, unpack_words


def gptq_weight(qweight, qzeros, scales, g_idx, group: int, v2: bool) -> torch.Tensor:
    """float32 [N, K]: qweight [K/8, N] packs input columns down each output column; qzeros [G, N/8] packs output
    columns (v1 stores zero - 1); each input column k takes group ``g_idx[k]`` (k // group without one)."""
    codes = unpack_words(qweight.t(), GPTQ_ORDER).float()  # [N, K], code of input column k in row n
    zero = unpack_words(qzeros, GPTQ_ORDER).float() + (0 if v2 else 1)  # [G, N]
    k = codes.shape[1]
    groups = (torch.arange(k) // group_width(group, k)) if g_idx is None else g_idx.long()
    return (codes - zero[groups].t()) * scales.float()[groups].t()


def awq_weight(qweight, qzeros, scales, group: int) -> torch.Tensor:
    """float32 [N, K]: qweight [K, N/8] and qzeros [G, N/8] pack output columns in AWQ's order; group k // group."""
    codes = unpack_words(qweight, AWQ_ORDER).float()  # [K, N]
    zero = unpack_words(qzeros, AWQ_ORDER).float()  # [G, N]
    groups = torch.arange(codes.shape[0]) // group_width(group, codes.shape[0])
    return ((codes - zero[groups]) * scales.float()[groups]).t()


def _dequantized(weights: dict, every: dict, scheme: dict, dtype: torch.dtype) -> dict:
    out = {}
    for name, t in weights.items():
        base, _, part = name.rpartition(".")
        if part not in PARTS or base + ".qweight" not in every:
            out[name] = t
        elif part == "qweight":
            if scheme["method"] == "awq":
                w = awq_weight(t, every[base + ".qzeros"], every[base + ".scales"], scheme["group"])
            else:
                w = gptq_weight(t, every[base + ".qzeros"], every[base + ".scales"], every.get(base + ".g_idx"),
                                scheme["group"], scheme["v2"])
            out[base + ".weight"] = w.to(dtype).contiguous()
    return out


def write_dequantized(src, dst, scheme: dict) -> str:
    """Write the dequantized copy of GPTQ or AWQ checkpoint ``src`` (its fields: ``int4_checkpoint.int4_fields``'
    ``scheme``) to ``dst`` (a directory); its path."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.safetensors"))
    every = {n: t for f in files for n, t in load_file(str(f)).items()}
    floats = [t.dtype for t in every.values() if t.is_floating_point() and t.dtype != torch.float16]
    dtype = floats[0] if floats else torch.float16
    renamed = {}
    for f in files:
        out = _dequantized(load_file(str(f)), every, scheme, dtype)
        renamed.update((n, f.name) for n in out)
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
    for extra in src.iterdir():
        if extra.suffix != ".safetensors" and extra.is_file():
            shutil.copy(extra, dst / extra.name)
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = renamed
        index.write_text(json.dumps(data, indent=2))
    return str(dst)
