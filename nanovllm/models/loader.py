"""Builds a model from its HF config and fills its weights: from a safetensors checkpoint, or random.

Checkpoints are one file or sharded with an index.  HF tensors named in the model's ``packed_modules`` (q/k/v,
gate/up) are copied into their slice of the packed parameter.  Every parameter must be filled exactly; a missing
or mis-shaped tensor raises an error that names it, and a truncated or corrupt file one that names the file.
Tied embeddings need no ``lm_head.weight``; tensors the model does not use (e.g. rotary caches) are ignored.
Values are converted to the model's dtype on load.  Once filled, either way, the model's ``after_loading`` may
rewrite its weights (MiniCPM folds its scalings into them).

``load_format="dummy"`` needs config.json only: weights are drawn on the device from a generator seeded with
``seed`` (norm weights 1, everything else normal with std 0.02), the same on every run of one device type.
"""
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from nanovllm.models.registry import resolve_model_class

_DUMMY_STD = 0.02


def build_model(hf_config: dict, *, dtype: torch.dtype, device: torch.device, model_dir: str,
                load_format: str = "safetensors", seed: int = 0) -> nn.Module:
    """The model of ``hf_config`` on ``device`` in ``dtype``, weights filled, in eval mode without gradients."""
    model_cls = resolve_model_class(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(hf_config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    else:
        load_weights(model, model_dir)
    model.after_loading()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights drawn on each parameter's device, deterministic under ``seed``."""
    generators = {}
    for name, param in model.named_parameters():  # shared (tied) parameters are listed once
        if "norm" in name.rsplit(".", 2)[-2]:
            param.fill_(1.0)
            continue
        device = param.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        param.normal_(0.0, _DUMMY_STD, generator=generators[device])


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
        if missing:
            raise FileNotFoundError(f"safetensors shards listed in {index} are missing: {missing}")
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {model_dir!r} (only safetensors checkpoints are supported)")
    return [os.path.join(model_dir, f) for f in files]


def _target(name: str, packed: dict) -> tuple[str, int | None]:
    """HF tensor name -> (our parameter name, shard index inside a packed parameter or None)."""
    for packed_name, parts in packed.items():
        for i, part in enumerate(parts):
            token = f".{part}."
            if token in name:
                return name.replace(token, f".{packed_name}."), i
    return name, None


def load_weights(model: nn.Module, model_dir: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    filled: dict[str, set] = {}
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    target, shard = _target(name, packed)
                    if target not in params or (tied and target == "lm_head.weight"):
                        continue
                    tensor = f.get_tensor(name)
                    param = params[target]
                    with torch.no_grad():
                        if shard is None:
                            if tuple(tensor.shape) != tuple(param.shape):
                                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                                 f"the model expects {tuple(param.shape)}")
                            param.copy_(tensor.to(param.dtype))
                        else:
                            _copy_shard(model, target, shard, name, tensor, param)
                    filled.setdefault(target, set()).add(shard)
        except SafetensorError as e:
            raise ValueError(f"safetensors file {path!r} is truncated or corrupt ({e}); copy or download it again"
                             ) from e
    missing = []
    for target in params:
        if tied and target == "lm_head.weight":
            continue
        got = filled.get(target, set())
        packed_name, parts = _packing_of(target, packed)
        if parts is None:
            missing += [] if None in got else [target]
        else:
            missing += [target.replace(f".{packed_name}.", f".{p}.") for i, p in enumerate(parts) if i not in got]
    if missing:
        raise ValueError(f"checkpoint {model_dir!r} lacks tensors the model needs: {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def _packing_of(target: str, packed: dict):
    for packed_name, parts in packed.items():
        if f".{packed_name}." in target:
            return packed_name, parts
    return None, None


def _copy_shard(model, target, shard, name, tensor, param):
    """Copy one HF tensor into its rows of a packed parameter; row counts come from the model's attention/MLP."""
    sizes = _packed_sizes(model, target)
    start = sum(sizes[:shard])
    expected = (sizes[shard],) + tuple(param.shape[1:])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {expected}")
    param[start:start + sizes[shard]].copy_(tensor.to(param.dtype))


def _packed_sizes(model, target: str) -> list[int]:
    a = model.args
    if ".qkv_proj." in target:
        return [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
    if ".gate_up_proj." in target:
        return [a.intermediate_size, a.intermediate_size]
    raise AssertionError(f"unknown packed parameter {target}")
