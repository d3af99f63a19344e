"""``SlotManager``: which LoRA adapter sits in which device slot, and a host LRU cache of loaded adapters.

Pure bookkeeping, no device code. Device slots are 1..``max_loras`` (slot 0 is the kernel's "no adapter").
``acquire(request)`` pins the request's adapter (by ``lora_int_id``) in a slot: (slot, None) if it is already
there; else (slot, adapter) after taking a free slot or evicting the least recently used unpinned one, the
adapter (from the host cache, else ``load(request)``) being what the caller must now write into that slot; None
when every slot is pinned (the caller waits). ``release(slot)`` unpins once. The host cache keeps at most
``max_cpu_loras`` adapters, evicting the least recently used (an adapter may stay in a slot after leaving it).
``remove(id)`` forgets an unpinned adapter and returns the slot it freed (for the caller to zero) or None.
A failing ``load`` raises ValueError naming the adapter and its path and changes no state.
"""
from collections import OrderedDict
from typing import Callable

from nanovllm.lora.peft import Adapter
from nanovllm.lora.request import LoRARequest


class SlotManager:
    def __init__(self, max_loras: int, max_cpu_loras: int, load: Callable[[LoRARequest], Adapter]):
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        if max_cpu_loras < 1:
            raise ValueError(f"max_cpu_loras must be >= 1, got {max_cpu_loras}")
        self.max_loras, self.max_cpu_loras, self._load = max_loras, max_cpu_loras, load
        self._ids: list[int | None] = [None] * (max_loras + 1)  # slot -> adapter id; index 0 unused
        self._pins = [0] * (max_loras + 1)
        self._recent: OrderedDict[int, None] = OrderedDict()  # occupied slots, least recently used first
        self._slot: dict[int, int] = {}  # adapter id -> slot
        self._host: OrderedDict[int, Adapter] = OrderedDict()  # adapter id -> adapter, least recently used first

    def acquire(self, request: LoRARequest) -> tuple[int, Adapter | None] | None:
        lid = request.lora_int_id
        if (slot := self._slot.get(lid)) is not None:
            self._pins[slot] += 1
            self._recent.move_to_end(slot)
            return slot, None
        slot = self._victim()
        if slot is None:
            return None
        adapter = self.fetch(request)  # may raise; nothing has changed yet
        if (old := self._ids[slot]) is not None:
            del self._slot[old]
        self._ids[slot], self._slot[lid], self._pins[slot] = lid, slot, 1
        self._recent[slot] = None
        self._recent.move_to_end(slot)
        return slot, adapter

    def _victim(self) -> int | None:
        """The lowest free slot, else the least recently used unpinned one, else None."""
        for slot in range(1, self.max_loras + 1):
            if self._ids[slot] is None:
                return slot
        return next((s for s in self._recent if self._pins[s] == 0), None)

    def fetch(self, request: LoRARequest) -> Adapter:
        """The request's adapter from the host cache, else loaded (``load``) and cached (a failure: ValueError
        naming it, nothing cached)."""
        lid = request.lora_int_id
        if lid in self._host:
            self._host.move_to_end(lid)
            return self._host[lid]
        try:
            adapter = self._load(request)
        except Exception as e:
            raise ValueError(f"LoRA adapter {request.lora_name!r} (id {lid}) at {request.lora_path!r} failed to "
                             f"load: {e}") from e
        self._host[lid] = adapter
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)
        return adapter

    def release(self, slot: int) -> None:
        if not 1 <= slot <= self.max_loras or self._pins[slot] == 0:
            raise ValueError(f"LoRA slot {slot} is not pinned")
        self._pins[slot] -= 1

    def remove(self, lora_int_id: int) -> int | None:
        """Forget an unpinned adapter; the device slot it freed, or None. ValueError if it is pinned."""
        slot = self._slot.get(lora_int_id)
        if slot is not None and self._pins[slot]:
            raise ValueError(f"LoRA adapter {lora_int_id} is in use (pinned in slot {slot}); cannot remove it")
        self._host.pop(lora_int_id, None)
        if slot is None:
            return None
        del self._slot[lora_int_id]
        self._ids[slot] = None
        del self._recent[slot]
        return slot

    def slot_of(self, lora_int_id: int) -> int | None:
        return self._slot.get(lora_int_id)

    def pins(self, slot: int) -> int:
        return self._pins[slot]

    def loaded_ids(self) -> list[int]:
        """Ids of the adapters in a device slot or the host cache, sorted."""
        return sorted(set(self._slot) | set(self._host))

    def cached_ids(self) -> list[int]:
        """Ids in the host cache, least recently used first."""
        return list(self._host)
