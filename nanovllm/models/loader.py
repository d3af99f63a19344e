"""Builds a model from its HF config and fills its weights: from a safetensors checkpoint, or random.

Checkpoints are one file or sharded with an index.  Names are mapped as the model declares: ``checkpoint_prefixes``
(a leading prefix rewritten), ``unpacked_prefixes`` (names taken as they are), ``checkpoint_renames`` (a module
renamed), ``packed_modules`` (q/k/v, gate/up copied into their slice of the packed parameter) and ``expert_weights``
(per-expert tensors stacked into ``experts.<stacked>``; a stacked tensor in the checkpoint loads whole).  Every
parameter must be filled exactly: a missing or mis-shaped tensor raises an error naming it as the checkpoint does, a
corrupt file one naming the file.  Tied embeddings need no ``lm_head.weight``; unused tensors are ignored.  Values
are converted to the model's dtype, then ``after_loading`` may rewrite them.  Float8 weights (``fp8_checkpoint``)
stay so with their scales where the model quantizes them, else are dequantized; GPTQ/AWQ ones: ``int4_loader.py``.

``load_format="dummy"``: config.json only (``dummy_weights.py``; int4 for a GPTQ/AWQ config).  ``offload_experts``:
the model is built on the host, its experts kept there behind a device cache (``expert_offload.py``).
"""
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.kernels import weight_quant
from nanovllm.models import (dummy_weights, expert_offload, fp8_checkpoint, fp8_weights, int4_checkpoint,
                             int4_loader, int4_weights)
from nanovllm.models.registry import resolve_model_class
from nanovllm.models.tensor_parallel import checkpoint_slice
from nanovllm.models.svd_moe import compressed_class


def build_model(hf_config: dict, *, dtype: torch.dtype, device: torch.device, model_dir: str,
                load_format: str = "safetensors", seed: int = 0, offload_experts: bool = False,
                experts_on_device: int | None = None, offload_host_share: float | None = None,
                quantization: str | None = None) -> nn.Module:
    """The model of ``hf_config`` on ``device`` in ``dtype``, weights filled, eval mode, no gradients; ``quantization=
    "fp8"`` quantizes them.  Built on the host, dummy weights drawn on ``device``: dummy GPTQ/AWQ weights too large in
    16 bits (quantized on ``device``), and with ``offload_experts`` (``expert_offload.offload_experts``: the experts
    stay on the host, ``experts_on_device`` slots per layer, the host's share ``offload_host_share``)."""
    if not offload_experts:
        try:
            return _build(hf_config, dtype, device, model_dir, load_format, seed, None, quantization)
        except torch.OutOfMemoryError:  # 16-bit dummy Mixtral-8x7B passes 80 GB before it is quantized to int4
            if load_format != "dummy" or quantization not in int4_checkpoint.METHODS:
                raise
    model = _build(hf_config, dtype, torch.device("cpu"), model_dir, load_format, seed, device, quantization)
    if not offload_experts:
        return model.to(device)
    expert_offload.offload_experts(model, device, experts_on_device, offload_host_share)
    return model


def _build(hf_config: dict, dtype: torch.dtype, device: torch.device, model_dir: str, load_format: str, seed: int,
           draw_device: torch.device | None, quantization: str | None) -> nn.Module:
    model_cls = resolve_model_class(hf_config)
    if "expert_compression" in hf_config:  # low-rank experts (svd_moe.py)
        model_cls = compressed_class(model_cls, hf_config["expert_compression"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(hf_config)
    finally:
        torch.set_default_dtype(previous)
    int4 = int4_checkpoint.int4_config(hf_config)  # a GPTQ or AWQ checkpoint's, its fields checked
    if load_format == "dummy":
        dummy_weights.fill_dummy_weights(model, seed, draw_device)
    else:
        load_weights(model, model_dir, fp8_checkpoint.layout(hf_config), int4)
    if hasattr(model, "tie_lm_head"):
        model.tie_lm_head()
    model.after_loading()
    if quantization == "fp8":
        fp8_weights.quantize_online(model)
    elif quantization in int4_checkpoint.METHODS:  # dummy weights of a GPTQ or AWQ config
        int4_weights.quantize_online(model, int4, draw_device)
    return model.eval().requires_grad_(False)


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


_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")


def _target(name: str, model: nn.Module) -> tuple[str, object]:
    """HF tensor name -> (our parameter name, where in it the tensor goes): None for the whole parameter, ``i``
    for shard i of a packed one, ``(expert, half)`` for one expert of a stacked one (half None: all its rows)."""
    for old, new in getattr(model, "checkpoint_prefixes", {}).items():
        if name.startswith(old):
            name = new + name[len(old):]
            break
    for old, new in getattr(model, "checkpoint_renames", {}).items():
        name = name.replace(f".{old}.", f".{new}.")
    if name.startswith(getattr(model, "unpacked_prefixes", ())):
        return name, None
    experts = getattr(model, "expert_weights", {})
    m = _EXPERT.match(name)
    if m and m["part"] in experts:
        stacked, half = experts[m["part"]]
        return f"{m['prefix']}.{stacked}", (int(m["expert"]), half)
    for packed_name, parts in getattr(model, "packed_modules", {}).items():
        for i, part in enumerate(parts):
            token = f".{part}."
            if token in name:
                return name.replace(token, f".{packed_name}."), i
    return name, None


def _checkpoint_name(name: str, model: nn.Module) -> str:
    """Our name -> the checkpoint's (``checkpoint_renames`` and ``checkpoint_prefixes`` undone; the newest naming),
    for error messages."""
    for old, new in getattr(model, "checkpoint_renames", {}).items():
        name = name.replace(f".{new}.", f".{old}.")
    for old, new in getattr(model, "checkpoint_prefixes", {}).items():
        if name.startswith(new):
            return old + name[len(new):]
    return name


def load_weights(model: nn.Module, model_dir: str, fp8_layout=None, int4: dict | None = None) -> None:
    """Fill ``model``'s parameters from the checkpoint in ``model_dir``; ``fp8_layout`` (``fp8_checkpoint.layout``)
    reads float8 weights and scales, ``int4`` (``int4_checkpoint.int4_config``) GPTQ/AWQ ones (``int4_loader``)."""
    files = checkpoint_files(model_dir)
    if fp8_layout is not None:  # weights stored in float8 stay so, with their scales (fp8_weights.py)
        fp8_checkpoint.prepare_model(model, _float8_targets(model, files), fp8_layout)
    filled: dict[str, set] = {}
    if int4 is not None:
        int4_loader.load(model, files, int4, filled, _target, _packed_sizes, _copy)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    with fp8_checkpoint.ScaleReader(files, fp8_layout) as scales:
        for path in files:
            _load_file(path, model, params, tied, scales, filled)
    _check_filled(model, model_dir, params, tied, filled)


def _float8_targets(model: nn.Module, files: list[str]) -> set[str]:
    """Our parameters every checkpoint part of which is float8 (a packed or stacked one mixing float8 and other
    parts is dequantized instead)."""
    parts, float8 = {}, {}  # target -> the places its checkpoint parts fill; those of float8 parts
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                target, where = _target(name, model)
                parts.setdefault(target, set()).add(where)
                if fp8_checkpoint.is_float8(f, name):
                    float8.setdefault(target, set()).add(where)
    return {t for t, got in float8.items() if got == parts[t]}


def _load_file(path: str, model: nn.Module, params: dict, tied: bool, scales, filled: dict[str, set]) -> None:
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                target, where = _target(name, model)
                if target not in params or (tied and target == "lm_head.weight") or scales.is_scale(name):
                    continue
                param = params[target]
                if weight_quant.is_fp8(param):  # the float8 piece and its scales, each into its place
                    tensor, scale = _rank_piece(f, name, target, where, param, model, scales, quantized=True)
                    _copy(name, target, where, scale, getattr(*_owner(model, target + "_scale")), model)
                else:
                    tensor = _rank_piece(f, name, target, where, param, model, scales)
                _copy(name, target, where, tensor, param, model)
                filled.setdefault(target, set()).add(where)
    except SafetensorError as e:
        raise ValueError(f"safetensors file {path!r} is truncated or corrupt ({e}); copy or download it again") from e


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module, _, attr = name.rpartition(".")
    return model.get_submodule(module), attr


@torch.no_grad()
def _copy(name: str, target: str, where, tensor: torch.Tensor, param: torch.Tensor, model: nn.Module) -> None:
    """Copy checkpoint tensor ``name`` (this rank's piece) into its place in ``param`` (``where``: ``_target``'s)."""
    if where is None:
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(param.shape)}")
        param.copy_(tensor.to(param.dtype))
    elif isinstance(where, tuple):
        _copy_expert(where, name, tensor, param)
    else:
        _copy_shard(target, where, name, tensor, param, model.args)


def _check_filled(model: nn.Module, model_dir: str, params: dict, tied: bool, filled: dict[str, set]) -> None:
    missing = []
    for target, param in params.items():
        if tied and target == "lm_head.weight":
            continue
        got = filled.get(target, set())
        if None not in got:
            missing += _missing_parts(target, param, got, model)
    if missing:
        missing = [_checkpoint_name(n, model) for n in missing]
        raise ValueError(f"checkpoint {model_dir!r} lacks tensors the model needs: {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def _missing_parts(target: str, param: torch.Tensor, got: set, model: nn.Module) -> list[str]:
    """The checkpoint tensors (our names) that would fill what ``got`` left empty of parameter ``target``."""
    prefix, leaf = target.rsplit(".", 1)
    experts = getattr(model, "expert_weights", {})
    if prefix.endswith(".experts") and any(stacked == leaf for stacked, _ in experts.values()):
        return [f"{prefix}.{e}.{part}.weight" for e in range(param.shape[0])
                for part, (stacked, half) in experts.items() if stacked == leaf and (e, half) not in got]
    packed_name, parts = _packing_of(target, getattr(model, "packed_modules", {}))
    if parts is None:
        return [target]
    return [target.replace(f".{packed_name}.", f".{p}.") for i, p in enumerate(parts) if i not in got]


def _packing_of(target: str, packed: dict):
    for packed_name, parts in packed.items():
        if f".{packed_name}." in target:
            return packed_name, parts
    return None, None


def _copy_shard(target, shard, name, tensor, param, args):
    """Copy one HF tensor into its rows of a packed parameter (q/k/v sizes from the attention, gate/up halves)."""
    sizes = _packed_sizes(target, param, args)
    start = sum(sizes[:shard])
    expected = (sizes[shard],) + tuple(param.shape[1:])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {expected}")
    param[start:start + sizes[shard]].copy_(tensor.to(param.dtype))


def _copy_expert(where, name, tensor, param):
    """One expert's HF tensor into its stacked parameter [E, rows, cols]: all rows, or gate (half 0) or up (1)."""
    expert, half = where
    if expert >= param.shape[0]:
        raise ValueError(f"tensor {name!r} is for expert {expert}, the model has {param.shape[0]} experts")
    dst = param[expert]
    if half is not None:
        rows = dst.shape[0] // 2
        dst = dst[half * rows:(half + 1) * rows]
    if tuple(tensor.shape) != tuple(dst.shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(dst.shape)}")
    dst.copy_(tensor.to(param.dtype))


def _rank_piece(f, name: str, target: str, where, param: torch.Tensor, model, scales, quantized: bool = False):
    """The piece of tensor ``name`` of the open checkpoint file ``f`` that this tensor-parallel rank holds (all of
    it at one rank), read from the file alone (``get_slice``: a rank never holds the whole tensor); rows past the
    tensor's end (the LM head's vocabulary padding) come back as zeros.  A float8 tensor comes back dequantized
    (``scales``, a ``fp8_checkpoint.ScaleReader``), or with ``quantized`` as (float8 piece, its scales per row)."""
    if where is None:
        local = tuple(param.shape)
    elif isinstance(where, tuple):  # one expert: its gate or up rows, or all its rows
        local = tuple(param.shape[1:])
        if where[1] is not None:
            local = (local[0] // 2,) + local[1:]
    else:
        local = (_packed_sizes(target, param, model.args)[where],) + tuple(param.shape[1:])
    cut = checkpoint_slice(target, where, local, model.args)
    fp8 = fp8_checkpoint.is_float8(f, name)
    if quantized:
        return scales.read_quantized(f, name, None if cut is None else (cut[0], cut[1], cut[1] + cut[2]))
    if cut is None:
        return scales.read(f, name, None) if fp8 else f.get_tensor(name)
    dim, start, length = cut
    stored = f.get_slice(name)
    stop = max(start, min(start + length, stored.get_shape()[dim]))
    if fp8:
        piece = scales.read(f, name, (dim, start, stop))
    else:
        piece = stored[(slice(None),) * dim + (slice(start, stop),)]
    if piece.shape[dim] < length:
        pad = list(piece.shape)
        pad[dim] = length - piece.shape[dim]
        piece = torch.cat([piece, piece.new_zeros(pad)], dim)
    return piece


def _packed_sizes(target: str, param: torch.Tensor, a) -> list[int]:
    if ".qkv_proj." in target:
        kv = (param.shape[0] - a.head_dim * a.num_heads // distributed.current().size) // 2
        return [param.shape[0] - 2 * kv, kv, kv]
    if ".gate_up_proj." in target:
        return [param.shape[0] // 2] * 2
    raise AssertionError(f"unknown packed parameter {target}")
