"""Builds a model from its HF config and fills its weights: from a safetensors checkpoint, or random.

Checkpoints are one file or sharded with an index.  Names are mapped as the model declares (``placement.py``).
Every parameter must be filled exactly: a missing or mis-shaped tensor raises an error naming it as the checkpoint
does, a corrupt file one naming the file.  Tied embeddings need no ``lm_head.weight``; unused tensors are ignored.
Values are converted to the model's dtype, then ``after_loading`` may rewrite them.  A quantized checkpoint's
scheme (``nanovllm/quant/``) reads the tensors it owns (float8 weights and their scales; GPTQ/AWQ ones); this
module the rest.  A scheme that quantizes online (``quantization="fp8"``, dummy weights of a quantized config)
runs after loading.

``load_format="dummy"``: config.json only (``dummy_weights.py``).  ``offload_experts``: the model is built on the
host, its experts kept there behind a device cache (``expert_offload.py``).
"""
import contextlib
import json
import os

import torch
from safetensors import SafetensorError
from torch import nn

from nanovllm.models import dummy_weights, expert_offload, moe
from nanovllm.models.placement import Placement
from nanovllm.models.registry import resolve_model_class
from nanovllm.models.svd_moe import compressed_class
from nanovllm.quant.checkpoint import Checkpoint, corrupt, read_piece
from nanovllm.quant.fp8_checkpoint import is_float8
from nanovllm.quant.scheme import QuantScheme


def build_model(hf_config: dict, *, dtype: torch.dtype, device: torch.device, model_dir: str,
                load_format: str = "safetensors", seed: int = 0, offload_experts: bool = False,
                experts_on_device: int | None = None, offload_host_share: float | None = None,
                scheme: QuantScheme | None = None, online: QuantScheme | None = None) -> nn.Module:
    """The model of ``hf_config`` on ``device`` in ``dtype``, weights filled, eval mode, no gradients; ``scheme``
    (``quant.registry.checkpoint_scheme``) reads a quantized checkpoint, ``online`` (``online_scheme``) quantizes
    the loaded weights.  Built on the host, dummy weights drawn on ``device``: dummy weights too large in 16 bits
    where ``online.quantize_from_host`` (quantized on ``device``), and with ``offload_experts``
    (``expert_offload.offload_experts``: the experts stay on the host, ``experts_on_device`` slots per layer, the
    host's share ``offload_host_share``)."""
    if not offload_experts:
        try:
            return _build(hf_config, dtype, device, model_dir, load_format, seed, None, scheme, online)
        except torch.OutOfMemoryError:  # 16-bit dummy Mixtral-8x7B passes 80 GB before it is quantized to int4
            if load_format != "dummy" or online is None or not online.quantize_from_host:
                raise
    model = _build(hf_config, dtype, torch.device("cpu"), model_dir, load_format, seed, device, scheme, online)
    if not offload_experts:
        return model.to(device)
    expert_offload.offload_experts(model, device, experts_on_device, offload_host_share)
    return model


def _build(hf_config: dict, dtype: torch.dtype, device: torch.device, model_dir: str, load_format: str, seed: int,
           draw_device: torch.device | None, scheme: QuantScheme | None, online: QuantScheme | None) -> nn.Module:
    model_cls = resolve_model_class(hf_config)
    if "expert_compression" in hf_config:  # low-rank experts (svd_moe.py)
        model_cls = compressed_class(model_cls, hf_config["expert_compression"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    held = load_format == "dummy" and online is not None and online.draws_held  # experts drawn an expert at a time
    try:
        with torch.device(device), (moe.deferred_experts() if held else contextlib.nullcontext()):
            model = model_cls(hf_config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        dummy_weights.fill_dummy_weights(model, seed, draw_device, online if held else None)
    else:
        load_weights(model, model_dir, scheme)
    if hasattr(model, "tie_lm_head"):
        model.tie_lm_head()
    model.after_loading()
    if online is not None:
        online.quantize_online(model, draw_device)
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


def load_weights(model: nn.Module, model_dir: str, scheme: QuantScheme | None = None) -> None:
    """Fill ``model``'s parameters from the checkpoint in ``model_dir``, ``scheme`` reading the tensors it owns."""
    placement = Placement(model)
    filled: dict[str, set] = {}
    with Checkpoint(checkpoint_files(model_dir)) as checkpoint:
        if scheme is not None:
            scheme.load(model, checkpoint, placement, filled)
        params = placement.params()  # after the scheme's: it may replace the parameters it quantizes
        for path in checkpoint.files:
            try:
                for name in checkpoint.names(path):
                    if scheme is not None and scheme.owns(name, checkpoint):
                        continue
                    target, where = placement.target(name)
                    if target not in params:
                        continue
                    if is_float8(checkpoint, name):  # an FP8 checkpoint's scheme owns these
                        raise ValueError(f"tensor {name!r} is float8 but config.json has no FP8 quantization_config "
                                         f"(quant_method 'fp8' or 'compressed-tensors') to read its scales by")
                    param = params[target]
                    cut = placement.cut(target, where, placement.local_shape(target, where, param.shape))
                    placement.copy(name, target, where, read_piece(checkpoint.slice(name), cut), param)
                    filled.setdefault(target, set()).add(where)
            except SafetensorError as e:
                raise corrupt(path, e) from e
    missing = [n for target, param in params.items() if None not in filled.get(target, set())
               for n in placement.missing_parts(target, param, filled.get(target, set()))]
    if missing:
        missing = [placement.checkpoint_name(n) for n in missing]
        raise ValueError(f"checkpoint {model_dir!r} lacks tensors the model needs: {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
