"""One MoE layer's experts in (pinned) host memory behind a device cache of a few of them, and the host's share.

``ExpertCache(w13, w2, device, slots, pin, scratch, host_share, w13_scale, w2_scale, group, w13_zero, w2_zero)``
keeps the experts on the host (``host_w13`` [E, 2I, H]; w2 transposed, ``host_w2t`` [E, I, H], so any run of
intermediate rows is contiguous) and ``slots`` of them on the device alike, evicted least recently used.  FP8 experts
travel with their scales, int4 ones (``int4_quant.py``) with scales and zeros, laid out as their weights; int4 codes
stay packed: w13 [E, 2I, H/2] and w2t w2's bytes [E, H, I/2] transposed, [E, I/2, H] (the kernels read w2's strided
view).  Copies run on a side stream on CUDA.  ``plan(needed)`` splits a step's experts by ``host_share``: the host
takes that share of the non-resident experts' work, whole experts from the end of the list, and the boundary expert
is split at intermediate row ``k`` (int4: even, whole bytes of w2t): the device copies rows [0, k) into the shared
``SplitScratch`` and computes them, the host rows [k, I).  The sums are exact with ``k`` anywhere in a group: the
device's columns [0, k) of w2 take groups [0, ceil(k/g)), the host dequantizes the whole expert.  Counters
(``COUNTERS``): ``hits``, ``misses`` (copied, split or computed on the host), ``bytes_fetched`` (weights, scales and
zeros copied), ``splits``, ``host_computed`` (in experts), ``host_seconds``, ``join_seconds`` (waiting for the device).
"""
import time
from collections import OrderedDict

import torch

from nanovllm.kernels import int4_quant, weight_quant

COUNTERS = ("hits", "misses", "bytes_fetched", "splits", "host_computed", "host_seconds",
            "join_seconds")
PARTS = ("", "_scale", "_zero")  # suffixes of an expert's stored tensors: weights, scales (quantized), zeros (int4)


def _transposed(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.transpose(-2, -1)


def _w2t_rows(k: int, group: int, int4: bool) -> dict[str, int]:
    """Rows of w2t, of its scales and of its zeros (by ``PARTS`` suffix) that intermediate rows [0, k) take."""
    groups = weight_quant.num_groups(k, group or 1)
    return {"": k // 2 if int4 else k, "_scale": groups, "_zero": groups}


class SplitScratch:
    """Device room for the device's rows of one split expert (at most a whole expert), shared by every layer of a
    model: layers run one at a time, and each copy into it waits for the compute stream, which holds the kernel that
    read it last.  ``hidden`` is H (an int4 expert's columns, two per byte)."""

    def __init__(self, inter: int, hidden: int, dtype: torch.dtype, device: torch.device, group: int = 0,
                 int4: bool = False):
        per_byte = 2 if int4 else 1
        self.w13 = torch.empty((2 * inter, hidden // per_byte), dtype=dtype, device=device)
        self.w2t = torch.empty((inter // per_byte, hidden), dtype=dtype, device=device)
        self.group, self.int4 = group, int4  # scale group (0: unquantized, no scales); int4: with zeros
        self.w13_scale = self.w2t_scale = self.w13_zero = self.w2t_zero = None
        groups = weight_quant.num_groups
        for suffix, dt in (("_scale", torch.float16 if int4 else torch.float32), ("_zero", torch.uint8)):
            if group and (int4 or suffix == "_scale"):
                setattr(self, "w13" + suffix, torch.empty((2 * inter, groups(hidden, group)), dtype=dt, device=device))
                setattr(self, "w2t" + suffix, torch.empty((groups(inter, group), hidden), dtype=dt, device=device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w2t, self.w13_scale, self.w2t_scale,
                                                          self.w13_zero, self.w2t_zero) if t is not None)

    def views(self, k: int) -> tuple:
        """``moe_experts``' weight arguments for one expert of intermediate size ``k``: w13 [1, 2k, H] (gate rows,
        then up rows), w2 [1, H, k] (a transposed view; int4: [1, H, k/2]), their scales, the group, their zeros,
        laid out alike (None where the format has none)."""
        per_row = _w2t_rows(k, self.group, self.int4)
        w13, w2 = {}, {}
        for suffix in PARTS:
            t13, t2t = getattr(self, "w13" + suffix), getattr(self, "w2t" + suffix)
            if t13 is not None:
                w13[suffix], w2[suffix] = t13[:2 * k].unsqueeze(0), t2t[:per_row[suffix]].unsqueeze(0).transpose(1, 2)
        return (w13[""], w2[""], w13.get("_scale"), w2.get("_scale"), self.group, w13.get("_zero"), w2.get("_zero"))


class ExpertCache:
    """The device slots of one MoE layer's experts over their host copies (see the module docstring)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, device: torch.device, slots: int, pin: bool,
                 scratch: SplitScratch | None = None, host_share: float = 0.0, w13_scale: torch.Tensor | None = None,
                 w2_scale: torch.Tensor | None = None, group: int = 0, w13_zero: torch.Tensor | None = None,
                 w2_zero: torch.Tensor | None = None):
        num_experts, two_i, _ = w13.shape
        if not 1 <= slots <= num_experts:
            raise ValueError(f"experts_on_device={slots} must be in [1, {num_experts}] (the layer's experts)")
        assert (w13_scale is None) == (w2_scale is None) == (group == 0), "quantized experts come with both scales"
        assert (w13_zero is None) == (w2_zero is None) and (w13_zero is None or group), "int4: both zeros, scales"
        self.group, self.int4 = group, w13_zero is not None
        assert scratch is None or (scratch.group, scratch.int4) == (group, self.int4), "the scratch holds this format"

        def host(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous()
            return t.pin_memory() if pin else t

        self.inter = two_i // 2
        self.split_step = 16 if self.inter % 16 == 0 else 2 if self.int4 else 1  # int4: whole bytes of w2t
        self.device, self.num_slots, self.scratch = device, slots, scratch
        self.stacks = []  # (device slots, host experts)
        for suffix, t13, t2 in zip(PARTS, (w13, w13_scale, w13_zero), (w2, w2_scale, w2_zero)):
            for name, t in (("w13" + suffix, t13), ("w2t" + suffix, _transposed(t2))):
                src = None if t is None else host(t)
                dst = None if t is None else torch.empty((slots, *t.shape[1:]), dtype=t.dtype, device=device)
                setattr(self, "host_" + name, src)
                setattr(self, name, dst)
                if t is not None:
                    self.stacks.append((dst, src))
        self.slot_w2, self.slot_w2_scale, self.slot_w2_zero = map(_transposed, (self.w2t, self.w2t_scale,
                                                                                self.w2t_zero))
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(slots - 1, -1, -1))
        self.events: dict[int, object] = {}  # slot -> copy event not yet waited on (CUDA)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.reset_counters()
        self.host_share = host_share
        self.expert_bytes = sum(src[0].numel() * src.element_size() for _, src in self.stacks)  # scales, zeros too

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

    def slot_weights(self) -> tuple:
        """``moe_experts``' weight arguments over the slots: w13 [S, 2I, H], w2 [S, H, I] (a transposed view; int4:
        packed, [S, 2I, H/2] and [S, H, I/2]), their scales, the group, their zeros (None where the format has
        none)."""
        return (self.w13, self.slot_w2, self.w13_scale, self.slot_w2_scale, self.group, self.w13_zero,
                self.slot_w2_zero)

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        """Copy each (device destination, host source) pair, counted in ``bytes_fetched``; on CUDA on the side
        stream, after the compute stream's queued readers of the destinations, returning the copies' event (None
        elsewhere)."""
        self.bytes_fetched += sum(src.numel() * src.element_size() for _, src in pairs)
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
        event = self._copy([(dst[slot], src[expert]) for dst, src in self.stacks])
        if event is not None:
            self.events[slot] = event
        self.lru[expert] = slot

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
        into the scratch first (with the scales and zeros of quantized experts: rows [0, k) of w13's, groups
        [0, ceil(k/g)) of w2's; int4 w2t's rows are bytes, k/2 of them)."""
        assert not (self.int4 and k % 2), f"an int4 expert splits at an even row (whole bytes of w2t), not {k}"
        s, inter, pairs, rows2 = self.scratch, self.inter, [], _w2t_rows(k, self.group, self.int4)
        for suffix in PARTS:  # gate rows [0, k), up rows [I, I + k), w2t rows [0, rows2)
            src13, src2t = getattr(self, "host_w13" + suffix), getattr(self, "host_w2t" + suffix)
            if src13 is None:
                continue
            dst13, dst2t, k2 = getattr(s, "w13" + suffix), getattr(s, "w2t" + suffix), rows2[suffix]
            src13, src2t = src13[expert], src2t[expert]
            pairs += [(dst13[:k], src13[:k]), (dst13[k:2 * k], src13[inter:inter + k]), (dst2t[:k2], src2t[:k2])]
        event = self._copy(pairs)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.misses += 1
        self.splits += 1
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
            xs, (w13, w2t) = x[rows], self._host_expert(e, x.dtype)
            if k:
                gate, up = xs @ w13[k:inter].T, xs @ w13[inter + k:].T
            else:  # a whole expert: one matmul over gate and up
                gate, up = (xs @ w13.T).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(gate) * up) @ w2t[k:]
            y.index_add_(0, rows, out.float() * weights[rows, picks, None])
            self.misses += k == 0  # a split expert counted its miss on the device
            self.host_computed += (inter - k) / inter
        self.host_seconds += time.perf_counter() - start
        return y

    def _host_expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s host w13 [2I, H] and w2t [I, H], FP8 and int4 ones dequantized into ``dtype`` (as the twin
        does)."""
        if not self.group:
            return self.host_w13[e], self.host_w2t[e]
        if self.int4:
            w13 = int4_quant.dequantize(self.host_w13[e], self.host_w13_scale[e], self.host_w13_zero[e], self.group,
                                        dtype)
            w2 = int4_quant.dequantize(self.host_w2t[e].T, self.host_w2t_scale[e].T, self.host_w2t_zero[e].T,
                                       self.group, dtype)  # [H, I]
            return w13, w2.T
        w13 = weight_quant.dequantize(self.host_w13[e], self.host_w13_scale[e], self.group, dtype)
        w2 = weight_quant.dequantize(self.host_w2t[e].T, self.host_w2t_scale[e].T, self.group, dtype)  # [H, I]
        return w13, w2.T

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
