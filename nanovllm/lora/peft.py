"""Read a PEFT LoRA adapter directory into host tensors: ``read_adapter(path, max_rank, dtype) -> Adapter``.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``, a plain
tensor dict). ``Adapter.weights`` maps (layer index, module) to (A [r, in_features], B [out_features, r]) in
``dtype``, for the modules ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` of decoder layers (a
multimodal model's ``language_model`` layers too); ``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)``
with ``use_rslora``).

Anything the slot pool cannot serve raises a ``ValueError`` naming the value: a missing file, ``peft_type`` other
than LORA, ``r`` above ``max_rank``, DoRA, ``modules_to_save``, embedding or lm_head adapters, another target
module, a ``bias`` other than "none", per-module ranks or alphas (``rank_pattern``/``alpha_pattern``), an unknown
tensor, a tensor whose shape disagrees with ``r`` or an A without its B. ``check_shapes`` compares the adapter's
(in, out) per layer and module with the base model's.
"""
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_NAME = re.compile(r"^(?:base_model\.model\.)?model\.(?:language_model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                   r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_EMBEDDING = ("embed_tokens", "lm_head", "lora_embedding_A", "lora_embedding_B")


@dataclass
class Adapter:
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(default_factory=dict)


def _config(path: Path, max_rank: int) -> tuple[int, float]:
    """(r, scaling) of a valid adapter_config.json; ValueError naming what the slot pool cannot serve."""
    file = path / "adapter_config.json"
    if not file.is_file():
        raise ValueError(f"LoRA adapter {str(path)!r}: missing {file.name}")
    cfg = json.loads(file.read_text())
    if (peft_type := str(cfg.get("peft_type", "LORA")).upper()) != "LORA":
        raise ValueError(f"LoRA adapter {str(path)!r}: peft_type {peft_type!r} is not LORA")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA adapter {str(path)!r}: rank r={r!r} is not a positive int")
    if r > max_rank:
        raise ValueError(f"LoRA adapter {str(path)!r}: rank {r} is above max_lora_rank={max_rank}")
    if cfg.get("use_dora"):
        raise ValueError(f"LoRA adapter {str(path)!r}: use_dora=true (DoRA) is not supported")
    if cfg.get("modules_to_save"):
        raise ValueError(f"LoRA adapter {str(path)!r}: modules_to_save={cfg['modules_to_save']!r} is not supported")
    if (bias := cfg.get("bias", "none")) not in ("none", None):
        raise ValueError(f"LoRA adapter {str(path)!r}: bias={bias!r} is not supported (only 'none')")
    if cfg.get("lora_bias"):
        raise ValueError(f"LoRA adapter {str(path)!r}: lora_bias=true is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"LoRA adapter {str(path)!r}: {key}={cfg[key]!r} (per-module ranks or alphas) "
                             "is not supported")
    targets = cfg.get("target_modules") or []
    for name in [] if isinstance(targets, str) else targets:  # a str is a regex: the tensor names are checked
        _check_module(path, name.split(".")[-1], f"target module {name!r}")
    alpha = cfg.get("lora_alpha", 8)
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _check_module(path: Path, module: str, what: str) -> None:
    if module in _EMBEDDING or "embed" in module:
        raise ValueError(f"LoRA adapter {str(path)!r}: {what} is an embedding or lm_head adapter, not supported")
    if module not in MODULES:
        raise ValueError(f"LoRA adapter {str(path)!r}: {what} is not one of {', '.join(MODULES)}")


def _tensors(path: Path) -> dict[str, Tensor]:
    if (file := path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(file), device="cpu")
    if (file := path / "adapter_model.bin").is_file():
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"LoRA adapter {str(path)!r}: adapter_model.bin is not a plain dict of tensors")
        return state
    raise ValueError(f"LoRA adapter {str(path)!r}: missing adapter_model.safetensors (or adapter_model.bin)")


def read_adapter(path, max_rank: int, dtype: torch.dtype = torch.float32) -> Adapter:
    """The adapter in the PEFT directory ``path``, its tensors in ``dtype`` on the CPU; ValueError as above."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"LoRA adapter path {str(path)!r} is not a directory")
    r, scaling = _config(path, max_rank)
    halves: dict[tuple[int, str], dict[str, Tensor]] = {}
    for name, tensor in _tensors(path).items():
        if any(e in name for e in _EMBEDDING):
            raise ValueError(f"LoRA adapter {str(path)!r}: tensor {name!r} is an embedding or lm_head adapter, "
                             "not supported")
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"LoRA adapter {str(path)!r}: tensor {name!r} is not a decoder layer's lora_A/lora_B")
        layer, parent, module, half = int(m[1]), m[2], m[3], m[4]
        _check_module(path, module, f"tensor {name!r}")
        if _PARENT[module] != parent:
            raise ValueError(f"LoRA adapter {str(path)!r}: tensor {name!r}: {module} is not under {parent}")
        expect = "[r, in_features]" if half == "A" else "[out_features, r]"
        if tensor.dim() != 2 or tensor.shape[0 if half == "A" else 1] != r:
            raise ValueError(f"LoRA adapter {str(path)!r}: tensor {name!r} has shape {list(tensor.shape)}, "
                             f"not {expect} with r={r}")
        halves.setdefault((layer, module), {})[half] = tensor.to(dtype).contiguous()
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        if len(pair) != 2:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"LoRA adapter {str(path)!r}: layer {layer} {module} has no {missing}")
        weights[(layer, module)] = (pair["A"], pair["B"])
    if not weights:
        raise ValueError(f"LoRA adapter {str(path)!r}: no lora_A/lora_B tensors")
    return Adapter(rank=r, scaling=float(scaling), weights=weights)


def check_shapes(adapter: Adapter, expected: dict) -> None:
    """ValueError naming the module where the adapter's (in, out) differs from the base model's ``expected``: (in,
    out) by (layer, module) (the pool's ``sizes``: a layer's own, Gemma 4's differ), or by module for every layer."""
    for (layer, module), (a, b) in adapter.weights.items():
        want = expected.get((layer, module), expected.get(module))
        if want is None:
            raise ValueError(f"LoRA module {module} (layer {layer}) is not a projection of the base model")
        if (a.shape[1], b.shape[0]) != tuple(want):
            raise ValueError(f"LoRA module {module} (layer {layer}) maps {a.shape[1]} -> {b.shape[0]} features, "
                             f"the base model's {want[0]} -> {want[1]}")
