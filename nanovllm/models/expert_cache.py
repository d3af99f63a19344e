"""One MoE layer's experts in (pinned) host memory behind a device cache of a few of them, and the host's share.

``ExpertCache(w13, w2, device, slots, pin, scratch, host_share)`` keeps the layer's experts on the host (``host_w13``
[E, 2I, H]; the down projection transposed, ``host_w2t`` [E, I, H], so any run of intermediate rows is contiguous) and
``slots`` whole experts on the device in the same layout, evicted least recently used.  Copies run on a side stream
on CUDA; the compute stream waits on each copy's event.

``plan(needed)`` splits a step's experts by ``host_share``: the host takes that share of the non-resident experts'
work, whole experts from the end of the list, and the expert on the boundary is split at intermediate row ``k``: the
device copies rows [0, k) into the shared ``SplitScratch`` and computes them, the host computes rows [k, I).  The two
partial sums are exact parts of the expert's output.  A split expert does not enter the cache.

Counters (``COUNTERS``, per step, layer and needed expert): ``hits``, ``misses`` (copied, split or computed on the
host), ``bytes_fetched``, ``splits``, ``host_computed`` (in experts), ``host_seconds`` and ``join_seconds`` (the host
waiting for the device's part of the same layer).
"""
import time
from collections import OrderedDict

import torch

COUNTERS = ("hits", "misses", "bytes_fetched", "splits", "host_computed", "host_seconds",
            "join_seconds")


class SplitScratch:
    """Device room for the device's rows of one split expert (at most a whole expert), shared by every layer of a
    model: layers run one at a time, and each copy into it waits for the compute stream, which holds the kernel that
    read it last."""

    def __init__(self, inter: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self.w13 = torch.empty((2 * inter, hidden), dtype=dtype, device=device)
        self.w2t = torch.empty((inter, hidden), dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2t.numel() * self.w2t.element_size()

    def views(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's stacks of one expert of intermediate size ``k``: w13 [1, 2k, H] (gate rows, then up rows)
        and w2 [1, H, k] (a transposed view)."""
        hidden = self.w13.shape[1]
        return self.w13[:2 * k].view(1, 2 * k, hidden), self.w2t[:k].view(1, k, hidden).transpose(1, 2)


class ExpertCache:
    """The device slots of one MoE layer's experts over their host copies (see the module docstring)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, device: torch.device, slots: int, pin: bool,
                 scratch: SplitScratch | None = None, host_share: float = 0.0):
        num_experts, two_i, hidden = w13.shape
        if not 1 <= slots <= num_experts:
            raise ValueError(f"experts_on_device={slots} must be in [1, {num_experts}] (the layer's experts)")
        w2t = w2.transpose(1, 2).contiguous()
        self.host_w13 = w13.pin_memory() if pin else w13
        self.host_w2t = w2t.pin_memory() if pin else w2t
        self.inter = two_i // 2
        self.split_step = 16 if self.inter % 16 == 0 else 1
        self.device, self.num_slots, self.scratch = device, slots, scratch
        self.w13 = torch.empty((slots, two_i, hidden), dtype=w13.dtype, device=device)
        self.w2t = torch.empty((slots, self.inter, hidden), dtype=w2.dtype, device=device)
        self.slot_w2 = self.w2t.transpose(1, 2)
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(slots - 1, -1, -1))
        self.events: dict[int, object] = {}  # slot -> copy event not yet waited on (CUDA)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.reset_counters()
        self.host_share = host_share
        self.expert_bytes = 3 * self.inter * hidden * w13.element_size()

    def reset_counters(self) -> None:
        self.hits = self.misses = self.bytes_fetched = self.splits = 0
        self.host_computed = self.host_seconds = self.join_seconds = 0.0

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

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        """Copy each (device destination, host source) pair; on CUDA on the side stream, after the compute stream's
        queued readers of the destinations, returning the copies' event (None elsewhere)."""
        if self.stream is None:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def _copy_in(self, expert: int, keep: set) -> None:
        slot = self._slot_for(expert, keep)
        event = self._copy([(self.w13[slot], self.host_w13[expert]), (self.w2t[slot], self.host_w2t[expert])])
        if event is not None:
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

    def plan(self, needed: list[int]) -> tuple[list[int], tuple[int, int] | None, list[int]]:
        """(the experts the device runs whole, resident ones first; the split expert and its row k, or None; the
        experts the host runs whole) for a step needing ``needed`` (module docstring).  Resident experts come first
        because a step with more experts than slots runs in rounds: in id order, a step needing every expert with
        one slot would evict the resident one before reaching it, and never hit."""
        resident = [e for e in needed if e in self.lru]
        missing = [e for e in needed if e not in self.lru]
        device_work = (1.0 - self.host_share) * len(missing)
        whole = int(device_work)
        step = self.split_step
        k = round((device_work - whole) * self.inter / step) * step
        if whole < len(missing) and k >= self.inter:
            whole, k = whole + 1, 0
        split = (missing[whole], k) if whole < len(missing) and k > 0 and self.scratch is not None else None
        return resident + missing[:whole], split, missing[whole + (split is not None):]

    def run_split(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert: int, k: int,
                  moe_experts) -> torch.Tensor:
        """The device's rows [0, k) of ``expert`` for the tokens routed to it (``moe_experts``: the MoE op), copied
        into the scratch first."""
        s, src13, inter = self.scratch, self.host_w13[expert], self.inter
        event = self._copy([(s.w13[:k], src13[:k]), (s.w13[k:2 * k], src13[inter:inter + k]),
                            (s.w2t[:k], self.host_w2t[expert, :k])])
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.misses += 1
        self.splits += 1
        self.bytes_fetched += self.expert_bytes * k // inter
        w = torch.where(ids == expert, weights, torch.zeros_like(weights))
        return moe_experts(x, w, torch.zeros_like(ids), *s.views(k))

    def compute_on_host(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: list[int],
                        split: tuple[int, int] | None) -> torch.Tensor:
        """The router-weighted sum of ``experts``' outputs, and of rows [k, I) of the split expert's, for the tokens
        routed to them, computed on the host from its copies; ``x``, ``weights``, ``ids`` are host tensors.
        Returns float32 [T, H] on the host."""
        start = time.perf_counter()
        y = torch.zeros(x.shape, dtype=torch.float32)
        inter = self.inter
        parts = [(e, 0) for e in experts] + ([split] if split is not None else [])
        for e, k in parts:
            rows, picks = (ids == e).nonzero(as_tuple=True)
            xs, w13 = x[rows], self.host_w13[e]
            if k:
                gate, up = xs @ w13[k:inter].T, xs @ w13[inter + k:].T
            else:  # a whole expert: one matmul over gate and up
                gate, up = (xs @ w13.T).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(gate) * up) @ self.host_w2t[e, k:]
            y.index_add_(0, rows, out.float() * weights[rows, picks, None])
            self.misses += k == 0  # a split expert counted its miss on the device
            self.host_computed += (inter - k) / inter
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
