"""The FP8 KV cache's scales: every attention layer's ``k_scale``/``v_scale`` buffers ([KV heads] float32,
``kernels/kv_quant.py``), read from a checkpoint or calibrated.

* ``load_checkpoint_scales``: vLLM's FP8 checkpoints store ``self_attn.k_scale``/``v_scale``, older ones one
  ``self_attn.kv_scale`` for both, or ``k_proj``/``v_proj.output_scale``; a scalar applies to every head, a
  vector of the model's KV heads is sliced to this rank's.  A checkpoint that has scales for some layers only is
  an error naming the first layer without.
* ``calibrate``: from a cache in the model's dtype that one prefill filled, ``HEADROOM`` x amax / 448 per layer
  and KV head (``per_head``) or per layer; a per-layer scale is agreed over the tensor-parallel ranks, so every
  rank (and any tensor-parallel size) stores K and V alike.
"""
import re

import torch
from safetensors import safe_open

import nanovllm.distributed as distributed
from nanovllm.kernels.kv_quant import FP8_MAX
from nanovllm.models.tensor_parallel import kv_heads

HEADROOM = 2.0  # calibrated scales leave K and V this factor below e4m3's largest value
_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale|k_proj\.output_scale|v_proj\.output_scale)$")


def attention_layers(model) -> list:
    """Per layer, its attention module, or None where it has none (a hybrid model's linear-attention layers)."""
    return [getattr(layer, "self_attn", None) for layer in model.model.layers]


def _local(value: torch.Tensor, attn, name: str, total_heads: int) -> torch.Tensor:
    """A checkpoint scale as this rank's [KV heads] vector."""
    value = value.float().flatten()
    if value.numel() == 1:
        return value.expand(attn.num_kv_heads)
    if value.numel() != total_heads:
        raise ValueError(f"tensor {name!r} holds {value.numel()} scales; expected 1 or one per KV head "
                         f"({total_heads})")
    count, first = kv_heads(total_heads)
    return value[first:first + count]


@torch.no_grad()
def load_checkpoint_scales(model, files: list[str]) -> bool:
    """Fill the scales from the safetensors ``files`` if they hold any; whether they did."""
    found: dict[tuple[int, str], tuple[str, torch.Tensor]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                m = _NAME.search(name)
                if m is None:
                    continue
                kinds = ("k", "v") if m[2] == "kv_scale" else (m[2][0],)
                for kind in kinds:
                    found[(int(m[1]), kind)] = (name, f.get_tensor(name))
    if not found:
        return False
    total = model.args.num_kv_heads
    for i, attn in enumerate(attention_layers(model)):
        for kind in ("k", "v") if attn is not None else ():
            if (i, kind) not in found:
                raise ValueError(f"the checkpoint has KV cache scales, but none for layer {i}'s {kind.upper()} "
                                 f"(self_attn.{kind}_scale)")
            name, value = found[(i, kind)]
            getattr(attn, f"{kind}_scale").copy_(_local(value, attn, name, total))
    return True


@torch.no_grad()
def calibrate(model, caches: list, per_head: bool) -> None:
    """Set every layer's scales from ``caches`` [(K, V)] per layer, in the model's dtype, zero where unwritten (a
    layer without attention: its state pools, passed over)."""
    for attn, kv in zip(attention_layers(model), caches):
        for cache, scale in zip(kv, (attn.k_scale, attn.v_scale)) if attn is not None else ():
            amax = cache.abs().amax(dim=(0, 2, 3)).float()
            if not per_head:
                amax = distributed.agree_max(amax.max().reshape(1)).expand(amax.shape[0])
            scale.copy_((amax * HEADROOM / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny))
