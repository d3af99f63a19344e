"""Compress a mixture-of-experts checkpoint's experts to low rank (``models/svd_moe.py`` runs the result).

    python -m nanovllm.tools.compress_experts MODEL OUT --rank R --method pca|activation [--calib FILE]
        [--ridge 1e-4] [--device cuda]

Per MoE layer and per expert matrix (gate, up, down) it fits a shared basis U and per-expert V
(``tools/svd_fit.py``): ``pca`` from the weights alone, ``activation`` from the inputs each (layer, expert) saw,
read from ``--calib`` (written by ``tools/collect_moe_calib.py``; the down matrix's inputs are the expert's
``silu(gate) * up`` of them).  OUT gets ``experts-LLLL.safetensors`` per layer (``model.layers.L.mlp.experts.
{gate,up,down}_{U,V}``), ``model.safetensors`` with every tensor of MODEL that is not an expert's, MODEL's other
files, and last its config.json plus ``expert_compression = {method, rank, ridge, ranks}``, which is how the
loader knows the checkpoint is compressed.  Re-running is safe and resumes: a layer file whose recorded method,
rank and ridge match is kept, a finished OUT with the same settings is left as it is.  A MODEL without weights
(config only, for ``load_format="dummy"``) gives an OUT with the config alone.
"""
import argparse
import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from nanovllm.models.loader import build_model, checkpoint_files
from nanovllm.models.moe import SparseMoe
from nanovllm.models.registry import resolve_model_class
from nanovllm.tools.svd_fit import activation_fit, pca_fit

METHODS = ("pca", "activation")
_EXPERT_TENSOR = re.compile(r"\.experts\.(\d+\.\w+\.weight|gate_up_proj|down_proj)$")


def _settings(method: str, rank: int, ridge: float) -> dict:
    return {"method": method, "rank": str(rank), "ridge": repr(float(ridge))}


def _layer_done(path: str, settings: dict) -> bool:
    if not os.path.isfile(path):
        return False
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}) == settings


def _save_atomic(tensors: dict, path: str, metadata: dict) -> None:
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _fit(w: torch.Tensor, inputs, method: str, rank: int, ridge: float):
    return pca_fit(w, rank) if method == "pca" else activation_fit(w, inputs, rank, ridge)


def compress_layer(moe: SparseMoe, method: str, rank: int, ridge: float, device: torch.device,
                   calib: list | None) -> dict:
    """{"gate_U", "gate_V", "up_U", "up_V", "down_U", "down_V"} of one layer, in the experts' dtype."""
    w13 = moe.experts.gate_up_proj.data.to(device)
    w2 = moe.experts.down_proj.data.to(device)
    inter = w13.shape[1] // 2
    gate, up = w13[:, :inter], w13[:, inter:]
    hidden_in = down_in = None
    if method == "activation":
        hidden_in = [x.to(device=device, dtype=torch.float32) for x in calib]
        down_in = [torch.nn.functional.silu(x @ gate[e].float().T) * (x @ up[e].float().T)
                   for e, x in enumerate(hidden_in)]
    out = {}
    for name, w, inputs in (("gate", gate, hidden_in), ("up", up, hidden_in), ("down", w2, down_in)):
        u, v = _fit(w, inputs, method, rank, ridge)
        out[f"{name}_U"], out[f"{name}_V"] = u.to(w.dtype).cpu(), v.to(w.dtype).cpu()
    return out


def _read_calib(path: str, layer: int, num_experts: int, hidden: int) -> list:
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        return [f.get_tensor(k) if (k := f"layers.{layer}.experts.{e}") in keys else torch.empty(0, hidden)
                for e in range(num_experts)]


def compress(model_dir: str, out_dir: str, *, rank: int, method: str, calib: str | None = None,
             ridge: float = 1e-4, device: str = "cpu") -> dict:
    """Write the compressed checkpoint (module docstring); returns its ``expert_compression``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {', '.join(METHODS)}")
    if method == "activation" and not (calib and os.path.isfile(calib)):
        raise ValueError(f"method='activation' needs --calib FILE (from collect_moe_calib), got {calib!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive int")
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    if "expert_compression" in hf:
        raise ValueError(f"{model_dir!r} is already compressed ({hf['expert_compression']})")
    settings = _settings(method, rank, ridge)
    os.makedirs(out_dir, exist_ok=True)
    has_weights = any(n.endswith(".safetensors") for n in os.listdir(model_dir))
    dtype = getattr(torch, hf.get("torch_dtype") or hf.get("dtype") or "float32")
    if has_weights:
        model = build_model(hf, dtype=dtype, device=torch.device("cpu"), model_dir=model_dir)
    else:  # only the shapes are needed
        with torch.device("meta"):
            model = resolve_model_class(hf)(hf)
    layers = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoe)]
    if not layers:
        raise ValueError(f"{model_dir!r} has no mixture-of-experts layer to compress")
    e, two_i, hidden = layers[0][1].experts.gate_up_proj.shape
    ranks = {"gate": min(rank, two_i // 2), "up": min(rank, two_i // 2), "down": min(rank, hidden)}
    compression = {"method": method, "rank": rank, "ridge": float(ridge), "ranks": ranks}
    config_path = os.path.join(out_dir, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            if json.load(f).get("expert_compression") == compression:
                return compression  # finished before with the same settings
        os.remove(config_path)  # other settings: redo, and the directory is unfinished until the end
    if has_weights:
        for i, moe in tqdm(layers, desc="compressing experts", unit="layer"):
            path = os.path.join(out_dir, f"experts-{i:04d}.safetensors")
            if _layer_done(path, settings):
                continue
            inputs = _read_calib(calib, i, e, hidden) if method == "activation" else None
            fitted = compress_layer(moe, method, rank, ridge, torch.device(device), inputs)
            _save_atomic({f"model.layers.{i}.mlp.experts.{k}": v for k, v in fitted.items()}, path, settings)
        rest = {}
        for src in checkpoint_files(model_dir):
            with safe_open(src, framework="pt") as f:
                rest.update({k: f.get_tensor(k) for k in f.keys() if not _EXPERT_TENSOR.search(k)})
        _save_atomic(rest, os.path.join(out_dir, "model.safetensors"), {"format": "pt"})
    for name in os.listdir(model_dir):  # tokenizer, generation config
        src = os.path.join(model_dir, name)
        if os.path.isfile(src) and name != "config.json" and not name.startswith("model") \
                and not name.endswith(".safetensors"):
            shutil.copyfile(src, os.path.join(out_dir, name))
    tmp = config_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(hf, expert_compression=compression), f, indent=2)
    os.replace(tmp, config_path)
    return compression


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--calib", help="calibration inputs from collect_moe_calib (method activation)")
    p.add_argument("--ridge", type=float, default=1e-4, help="relative ridge of the activation fit")
    p.add_argument("--device", default="cpu", help="where the fits run (cpu, cuda)")
    a = p.parse_args(argv)
    c = compress(a.model, a.out, rank=a.rank, method=a.method, calib=a.calib, ridge=a.ridge, device=a.device)
    print(f"wrote {a.out}: {c}")


if __name__ == "__main__":
    main()
