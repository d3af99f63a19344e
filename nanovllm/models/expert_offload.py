"""Expert offload: every expert of an MoE layer in (pinned) host memory, and a device cache of a few of them.

``offload_experts(model, device, slots, prefetch, host_share)`` takes a model built on the host (``build_model``
with the CPU as device), moves everything that is not an expert (attention, norms, embeddings, routers, shared experts)
to ``device``, and gives each ``SparseMoe`` an ``ExpertCache``: the layer's stacked experts stay on the host
(pinned where the device is CUDA) and ``slots`` of them live on the device, evicted least recently used.

A step of an offloaded layer routes on the device, reads the set of chosen experts on the host (one sync per layer),
makes them resident (copies on a side stream on CUDA; the compute stream waits on each copy's event) and runs the
experts on the slots (``ops.moe_experts``), with the expert ids remapped to slots. A step that needs more distinct
experts than there are slots runs in rounds of at most ``slots`` experts, resident ones first, the router weights
of the others set to zero. With ``prefetch``, each layer also applies the next MoE layer's router to its own input
and starts copying the experts that guess picks, so the copies overlap this layer's compute.

With ``host_share`` > 0, that share of a step's non-resident experts (rounded, the last ones of the step's list) is
computed by the host from its own copy instead of being copied (Fiddler's idea: the host's memory reads the expert
at a rate close to the link's, so both together move about twice the bytes per second).  The layer's input and
routing go to the host first, the device's rounds (copies and kernels) are launched next, and the host computes its
experts while the device works; its result is added to the device's in float32.

Graph mode: an offloaded model runs eagerly (``graph_capturable = False`` with a logged reason).  The set of
experts a step needs is known only after routing, on the host, and the copies it triggers depend on it; a
captured graph would replay the copies of the step it was captured on.  Capturing the attention segments
between eager MoE layers is possible, but each decode step would then replay one graph per layer with a host
sync between them; when experts do not fit, copying whole experts over the host link dominates a step, so the
launch overhead a graph saves is small against it, and eager is the correct-by-construction choice
(``benchmarks/offload_bench.py`` measures the copy share of a step).

Counters (``ExpertCache.hits``, ``misses``, ``prefetched``, ``bytes_fetched``, ``host_computed``;
``offload_stats(model)`` sums them) count per (step, layer, needed expert): a hit is an expert already resident (or
being prefetched) when a step needs it; a miss is copied or (``host_computed``) computed on the host.  Two timers
show where a step with host compute spends its time: ``host_seconds`` (the host computing its experts) and
``join_seconds`` (the host then waiting for the device's rounds of the same layer).
"""
import time
from collections import OrderedDict

import torch

from nanovllm.kernels import ops
from nanovllm.kernels.moe_reference import route_reference
from nanovllm.models.moe import SparseMoe

COUNTERS = ("hits", "misses", "prefetched", "bytes_fetched", "host_computed", "host_seconds", "join_seconds")
NOT_CAPTURABLE_REASON = "experts are offloaded to host memory (offload_experts=True): routing decides the copies"


class ExpertCache:
    """The device slots of one MoE layer's experts over their host copies (see the module docstring)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, device: torch.device, slots: int, pin: bool):
        num_experts = w13.shape[0]
        if not 1 <= slots <= num_experts:
            raise ValueError(f"experts_on_device={slots} must be in [1, {num_experts}] (the layer's experts)")
        self.host_w13 = w13.pin_memory() if pin else w13
        self.host_w2 = w2.pin_memory() if pin else w2
        self.device, self.num_slots = device, slots
        self.w13 = torch.empty((slots, *w13.shape[1:]), dtype=w13.dtype, device=device)
        self.w2 = torch.empty((slots, *w2.shape[1:]), dtype=w2.dtype, device=device)
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(slots - 1, -1, -1))
        self.events: dict[int, object] = {}  # slot -> copy event not yet waited on (CUDA)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.reset_counters()
        self.host_share = 0.0
        self.expert_bytes = (w13[0].numel() * w13.element_size() + w2[0].numel() * w2.element_size())

    def reset_counters(self) -> None:
        self.hits = self.misses = self.prefetched = self.bytes_fetched = self.host_computed = 0
        self.host_seconds = self.join_seconds = 0.0

    @property
    def device_bytes(self) -> int:
        return self.num_slots * self.expert_bytes

    def _slot_for(self, expert: int, keep: set) -> int:
        """A slot for ``expert`` (not resident): a free one, else the least recently used not in ``keep``."""
        if self.free:
            return self.free.pop()
        for victim in self.lru:
            if victim not in keep:
                return self.lru.pop(victim)
        raise AssertionError(f"all {self.num_slots} slots are kept")  # callers keep at most num_slots experts

    def _copy_in(self, expert: int, keep: set) -> None:
        slot = self._slot_for(expert, keep)
        if self.stream is None:
            self.w13[slot].copy_(self.host_w13[expert])
            self.w2[slot].copy_(self.host_w2[expert])
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the slot's last readers are queued
            with torch.cuda.stream(self.stream):
                self.w13[slot].copy_(self.host_w13[expert], non_blocking=True)
                self.w2[slot].copy_(self.host_w2[expert], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.events[slot] = event
        self.lru[expert] = slot
        self.bytes_fetched += self.expert_bytes

    def ensure(self, experts: list[int]) -> None:
        """Make ``experts`` (at most ``num_slots``) resident and most recently used; the compute stream waits
        for their copies."""
        keep = set(experts)
        for e in experts:
            if e in self.lru:
                self.hits += 1
                self.lru.move_to_end(e)
            else:
                self.misses += 1
                self._copy_in(e, keep)
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            for e in experts:
                event = self.events.pop(self.lru[e], None)
                if event is not None:
                    current.wait_event(event)

    def resident_first(self, experts: list[int]) -> list[int]:
        """``experts`` with the resident ones first (order otherwise kept): when a step runs in rounds, the
        resident experts are used before any copy could evict them (in id order, a step needing every expert
        with one slot would evict the resident one before reaching it, and never hit)."""
        return [e for e in experts if e in self.lru] + [e for e in experts if e not in self.lru]

    def prefetch(self, experts: list[int]) -> None:
        """Start copying the guessed ``experts`` that are not resident (at most ``num_slots``, the most likely
        first), evicting the least recently used; they count as ``prefetched``, not as misses."""
        guess = experts[:self.num_slots]
        keep = set(guess)
        for e in guess:
            if e not in self.lru:
                self.prefetched += 1
                self._copy_in(e, keep)

    def split_for_host(self, needed: list[int]) -> list[int]:
        """The experts of ``needed`` the host computes: ``host_share`` of the non-resident ones, the last ones."""
        missing = [e for e in needed if e not in self.lru]
        count = round(len(missing) * self.host_share)
        return missing[len(missing) - count:] if count else []

    def compute_on_host(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                        experts: list[int]) -> torch.Tensor:
        """The router-weighted sum of ``experts``' outputs for the tokens routed to them, computed on the host from
        its copies; ``x``, ``weights``, ``ids`` are host tensors.  Returns float32 [T, H] on the host."""
        start = time.perf_counter()
        y = torch.zeros(x.shape, dtype=torch.float32)
        for e in experts:
            rows, picks = (ids == e).nonzero(as_tuple=True)
            gate, up = (x[rows] @ self.host_w13[e].T).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(gate) * up) @ self.host_w2[e].T
            y.index_add_(0, rows, out.float() * weights[rows, picks, None])
            self.misses += 1
            self.host_computed += 1
        self.host_seconds += time.perf_counter() - start
        return y

    def join(self, y: torch.Tensor, host_y: torch.Tensor) -> torch.Tensor:
        """``y`` (the device's part, on the device) plus ``host_y`` (``compute_on_host``'s), in float32, in y's
        dtype; the wait for the device's queued rounds is timed in ``join_seconds``."""
        start = time.perf_counter()
        if self.stream is not None:
            torch.cuda.current_stream(self.device).synchronize()
            host_y = host_y.pin_memory()
        self.join_seconds += time.perf_counter() - start
        return (y.float() + host_y.to(y.device, non_blocking=self.stream is not None)).to(y.dtype)

    def slot_map(self) -> torch.Tensor:
        """Expert id -> slot (0 for experts not resident), on the device."""
        table = [0] * self.host_w13.shape[0]
        for e, s in self.lru.items():
            table[e] = s
        return self.to_device(table)

    def to_device(self, values: list[int]) -> torch.Tensor:
        """An int64 tensor of ``values`` on the device, queued on the compute stream without waiting for it (a
        plain copy from pageable memory would wait for the queued copies of experts, and so would the host)."""
        t = torch.tensor(values, dtype=torch.int64)
        if self.stream is None:
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)


class OffloadedMoe(torch.nn.Module):
    """A ``SparseMoe`` whose experts sit behind an ``ExpertCache``; same routing, same result."""

    def __init__(self, moe: SparseMoe, cache: ExpertCache):
        super().__init__()
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate, self.shared_expert, self.shared_expert_gate = moe.gate, moe.shared_expert, moe.shared_expert_gate
        self.cache = cache
        self.next_moe: "OffloadedMoe | None" = None  # set by offload_experts when prefetching

    def guess(self, x: torch.Tensor) -> list[int]:
        """The experts this layer's router picks for ``x`` (another layer's input), most picked first."""
        _, ids = route_reference(torch.nn.functional.linear(x, self.gate.weight), self.top_k, self.renormalize)
        counts = torch.bincount(ids.reshape(-1), minlength=self.gate.weight.shape[0])
        order = torch.argsort(counts, descending=True, stable=True)
        return [e for e, c in zip(order.tolist(), counts[order].tolist()) if c > 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_reference(ops.linear(x, self.gate.weight), self.top_k, self.renormalize)
        if self.next_moe is not None and x.shape[0]:
            self.next_moe.cache.prefetch(self.next_moe.guess(x))
        c = self.cache
        needed = c.resident_first(torch.unique(ids).tolist())
        on_host = c.split_for_host(needed)
        if on_host:  # to the host before the device's rounds are queued: reading them later would wait for those
            host_inputs = (x.cpu(), weights.cpu(), ids.cpu())
            needed = [e for e in needed if e not in on_host]
        y = None
        for r in range(0, len(needed), c.num_slots):
            chunk = needed[r:r + c.num_slots]
            c.ensure(chunk)
            w = weights
            if len(chunk) < len(needed) or on_host:
                in_chunk = torch.isin(ids, c.to_device(chunk))
                w = torch.where(in_chunk, weights, torch.zeros_like(weights))
            part = ops.moe_experts(x, w, c.slot_map()[ids], c.w13, c.w2)
            y = part if y is None else y + part
        if y is None:
            y = torch.zeros_like(x)
        if on_host:
            y = c.join(y, c.compute_on_host(*host_inputs, on_host))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(ops.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return y


@torch.no_grad()
def offload_experts(model: torch.nn.Module, device: torch.device, slots: int | None, prefetch: bool,
                    host_share: float = 0.0) -> list:
    """Turn ``model`` (built on the host) into an offloaded one on ``device`` (module docstring); ``slots``
    None: every expert resident.  Returns the layers' caches."""
    layers = model.model.layers
    moes = [(i, layer.mlp) for i, layer in enumerate(layers) if isinstance(layer.mlp, SparseMoe)]
    if not moes:
        raise ValueError("offload_experts=True, but the model has no mixture-of-experts layer")
    pin = device.type == "cuda"
    caches, offloaded = [], []
    for i, moe in moes:
        w13, w2 = moe.experts.gate_up_proj.data, moe.experts.down_proj.data
        del moe.experts  # the host copy lives on in the cache only
        cache = ExpertCache(w13, w2, device, slots or w13.shape[0], pin)
        layers[i].mlp = OffloadedMoe(moe, cache)
        caches.append(cache)
        offloaded.append(layers[i].mlp)
    model.to(device)  # the caches are not modules: their host copies stay where they are
    set_prefetch(model, prefetch)
    set_host_share(model, host_share)
    for cache in caches:  # warm start: the first experts resident, so "all resident" fetches nothing later
        cache.ensure(list(range(cache.num_slots)))
        cache.reset_counters()
    model.graph_capturable = False
    model.not_capturable_reason = NOT_CAPTURABLE_REASON
    return caches


def set_prefetch(model: torch.nn.Module, on: bool) -> None:
    """Turn the next-layer prefetch of an offloaded model on or off (for A/B measurements)."""
    offloaded = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, OffloadedMoe)]
    for a, b in zip(offloaded, offloaded[1:] + [None]):
        a.next_moe = b if on else None


def set_host_share(model: torch.nn.Module, share: float) -> None:
    """Set the share of non-resident experts the host computes, in every offloaded layer (for A/B measurements)."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, OffloadedMoe):
            layer.mlp.cache.host_share = share


def offload_stats(model: torch.nn.Module) -> dict:
    """The counters summed over the model's expert caches, plus device and host bytes of experts."""
    caches = [layer.mlp.cache for layer in model.model.layers if isinstance(layer.mlp, OffloadedMoe)]
    stats = {k: sum(getattr(c, k) for c in caches)
             for k in COUNTERS}
    stats["expert_cache_bytes"] = sum(c.device_bytes for c in caches)
    stats["expert_host_bytes"] = sum(c.expert_bytes * c.host_w13.shape[0] for c in caches)
    return stats
