"""Expert offload: every expert of an MoE layer in (pinned) host memory, and a device cache of a few of them.

``offload_experts(model, device, slots, host_share)`` takes a model built on the host (``build_model`` does so when
asked to offload), moves everything but the experts to ``device`` and gives each ``SparseMoe`` an ``ExpertCache``
(``expert_cache.py``) with ``slots`` experts on the device, evicted least recently used.

A step of an offloaded layer routes on the device, reads the chosen experts on the host (one sync per layer) and
splits them between device and host (``ExpertCache.plan``): the device makes its experts resident and runs them on
the slots, in rounds of at most ``slots`` experts; the host computes ``host_share`` of the non-resident experts' work
from its own copy (default ``CUDA_OFFLOAD_HOST_SHARE`` on CUDA, else 0, and 0 for int4 experts, which the host
dequantizes whole at each use), added in float32.  FP8 and int4 experts stay quantized (with scales and zeros).

An offloaded model runs eagerly (``graph_capturable = False`` with a logged reason): which experts a step copies is
known only after routing, on the host, and a captured graph would replay the copies of the step it was captured on.
``offload_stats(model)`` sums the caches' counters and adds the device and host bytes of experts.
"""
import torch

from nanovllm.config import CUDA_OFFLOAD_HOST_SHARE
from nanovllm.kernels import ops
from nanovllm.quant import held
from nanovllm.kernels.moe_reference import route_reference
from nanovllm.models.expert_cache import COUNTERS, ExpertCache, SplitScratch
from nanovllm.models.moe import SparseMoe

__all__ = ["COUNTERS", "OffloadedMoe", "expert_caches", "offload_experts", "offload_stats"]
NOT_CAPTURABLE_REASON = "experts are offloaded to host memory (offload_experts=True): routing decides the copies"


class OffloadedMoe(torch.nn.Module):
    """A ``SparseMoe`` whose experts sit behind an ``ExpertCache``; same routing, same result."""

    def __init__(self, moe: SparseMoe, cache: ExpertCache):
        super().__init__()
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate, self.shared_expert, self.shared_expert_gate = moe.gate, moe.shared_expert, moe.shared_expert_gate
        self.cache = cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_reference(ops.linear(x, self.gate.weight), self.top_k, self.renormalize)
        c = self.cache
        on_device, split, on_host = c.plan(torch.unique(ids).tolist())
        host_part = bool(on_host) or split is not None
        if host_part:  # to the host before the device's part is queued: reading them later would wait for it
            host_inputs = (x.cpu(), weights.cpu(), ids.cpu())
        y = c.run_split(x, weights, ids, *split, ops.moe_experts) if split else None
        for r in range(0, len(on_device), c.num_slots):
            chunk = on_device[r:r + c.num_slots]
            c.ensure(chunk)
            w = weights
            if len(chunk) < len(on_device) or host_part:
                in_chunk = torch.isin(ids, c.to_device(chunk))
                w = torch.where(in_chunk, weights, torch.zeros_like(weights))
            part = ops.moe_experts(x, w, c.slot_map()[ids], *c.slot_weights())
            y = part if y is None else y + part
        if y is None:
            y = torch.zeros_like(x)
        if host_part:
            y = c.join(y, c.compute_on_host(*host_inputs, on_host, split))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(ops.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return y


@torch.no_grad()
def offload_experts(model: torch.nn.Module, device: torch.device, slots: int | None,
                    host_share: float | None = None) -> list:
    """Turn ``model`` (built on the host) into an offloaded one on ``device`` (module docstring); ``slots``
    None: every expert resident; ``host_share`` None: the device's default.  Returns the layers' caches."""
    layers = model.model.layers
    moes = [(i, layer.mlp) for i, layer in enumerate(layers) if isinstance(layer.mlp, SparseMoe)]
    if host_share is None:
        int4 = any(held.format_of(moe.experts) is held.INT4 for _, moe in moes)
        host_share = CUDA_OFFLOAD_HOST_SHARE if device.type == "cuda" and not int4 else 0.0
    if not moes:
        raise ValueError("offload_experts=True, but the model has no mixture-of-experts layer that can be offloaded "
                         "(plain SiLU experts without biases: not GPT-OSS's)")
    pin = device.type == "cuda"
    num_experts = moes[0][1].experts.gate_up_proj.shape[0]
    splits = host_share > 0 and slots is not None and slots < num_experts
    scratches = {}  # (dtype, group) -> room for a split expert's device rows, one per expert format of the model
    caches = []
    for i, moe in moes:
        ex = moe.experts
        w13, w2 = ex.gate_up_proj.data, ex.down_proj.data
        w13_scale, w2_scale, group, w13_zero, w2_zero = held.expert_args(ex)  # zeros: int4 experts
        int4 = held.format_of(ex) is held.INT4
        del moe.experts  # the host copy lives on in the cache only
        key = (w13.dtype, group)  # int4 experts' uint8 codes are a dtype of their own
        if splits and key not in scratches:
            scratches[key] = SplitScratch(w13.shape[1] // 2, w13.shape[2] * (2 if int4 else 1), w13.dtype, device,
                                          group, int4)
        cache = ExpertCache(w13, w2, device, slots or w13.shape[0], pin, scratches.get(key), host_share, w13_scale,
                            w2_scale, group, w13_zero, w2_zero)
        layers[i].mlp = OffloadedMoe(moe, cache)
        caches.append(cache)
    model.to(device)  # the caches are not modules: their host copies stay where they are
    for cache in caches:  # warm start: the first experts resident, so "all resident" fetches nothing later
        cache.ensure(list(range(cache.num_slots)))
        cache.reset_counters()
    model.graph_capturable = False
    model.not_capturable_reason = NOT_CAPTURABLE_REASON
    return caches


def expert_caches(model: torch.nn.Module) -> list[ExpertCache]:
    """The caches of the model's offloaded MoE layers, in layer order (none for a model not offloaded)."""
    return [layer.mlp.cache for layer in model.model.layers if isinstance(layer.mlp, OffloadedMoe)]


def offload_stats(model: torch.nn.Module) -> dict:
    """The counters summed over the model's expert caches, plus device and host bytes of experts."""
    caches = expert_caches(model)
    stats = {k: sum(getattr(c, k) for c in caches) for k in COUNTERS}
    stats["expert_cache_bytes"] = sum(c.device_bytes for c in caches)
    scratches = {id(c.scratch): c.scratch for c in caches if c.scratch is not None}
    stats["split_scratch_bytes"] = sum(s.nbytes for s in scratches.values())
    stats["expert_host_bytes"] = sum(c.expert_bytes * c.host_w13.shape[0] for c in caches)
    return stats
