"""``EngineLoras``: an engine's LoRA adapters (``enable_lora``): the device pool on the model's projections
(``lora/pool.py``), which adapter sits in which slot and the host cache (``lora/slots.py``), and the pin each
running sequence holds on its adapter's slot.

The scheduler ``admit``s a waiting sequence only once its adapter is in a slot (written there if it was not, in
stream order, so steps already queued still read what the slot held); with every slot pinned by running sequences
it waits, never dropped.  ``release`` (finish, preemption, abort) unpins; an unpinned slot keeps its adapter until
another needs the slot.  ``load`` reads and checks an adapter without pinning it (a bad one fails its request
before anything is queued); ``remove`` forgets an unpinned one.
"""
from nanovllm.lora.peft import Adapter, check_shapes, read_adapter
from nanovllm.lora.pool import LoraPool
from nanovllm.lora.request import LoRARequest
from nanovllm.lora.slots import SlotManager


def check(loras: "EngineLoras | None", request) -> None:
    """A request's ``lora_request`` loads and fits (``EngineLoras.load``); a ``ValueError`` naming it otherwise, or
    where the engine has no adapters (built without ``enable_lora``)."""
    if loras is None:
        raise ValueError(f"lora_request {getattr(request, 'lora_name', request)!r}: this engine was built without "
                         f"enable_lora=True")
    loras.load(request)


def remove(loras: "EngineLoras | None", lora_int_id: int, waiting) -> None:
    """``EngineLoras.remove``; a ``ValueError`` where the engine has no adapters, or while a request of ``waiting``
    (the queue) still names the adapter (it would be read again when admitted)."""
    if loras is None:
        raise ValueError(f"remove_lora({lora_int_id}): this engine was built without enable_lora=True")
    if any(seq.lora is not None and seq.lora.lora_int_id == lora_int_id for seq in waiting):
        raise ValueError(f"LoRA adapter {lora_int_id} is in use (requests waiting for it); cannot remove it")
    loras.remove(lora_int_id)


class EngineLoras:
    def __init__(self, model, config):
        self.pool = LoraPool(model, config.max_loras, config.max_lora_rank)
        self.max_rank = config.max_lora_rank
        self.slots = SlotManager(config.max_loras, config.max_cpu_loras, self._read)
        self.known: dict[int, LoRARequest] = {}  # adapters requests have named, by id

    @classmethod
    def make(cls, model, config) -> "EngineLoras | None":
        return cls(model, config) if config.enable_lora else None

    def _read(self, request: LoRARequest) -> Adapter:
        adapter = read_adapter(request.lora_path, self.max_rank)
        check_shapes(adapter, self.pool.sizes)
        return adapter

    def load(self, request: LoRARequest) -> None:
        """Check that ``request``'s adapter loads and fits this model (``ValueError`` naming it otherwise), and that
        its id names one adapter: the first path given for an id stays its path."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        known = self.known.get(request.lora_int_id)
        if known is not None and known.lora_path != request.lora_path:
            raise ValueError(f"lora_int_id {request.lora_int_id} names adapter {known.lora_name!r} at "
                             f"{known.lora_path!r}; {request.lora_name!r} at {request.lora_path!r} needs another id")
        if known is None:
            self.slots.fetch(request)  # read and checked once, then kept in the host cache for its first slot
            self.known[request.lora_int_id] = request

    def admit(self, seq) -> bool:
        """Pin ``seq``'s adapter in a slot and set ``seq.lora_slot`` (True at once for the base model); False when
        every slot is pinned."""
        if seq.lora is None:
            return True
        got = self.slots.acquire(seq.lora)
        if got is None:
            return False
        slot, adapter = got
        if adapter is not None:
            self.pool.write(slot, adapter)
        seq.lora_slot = slot
        return True

    def release(self, seq) -> None:
        if seq.lora_slot:
            self.slots.release(seq.lora_slot)
            seq.lora_slot = 0

    def remove(self, lora_int_id: int) -> None:
        """Forget an adapter (``ValueError`` while a running sequence uses it); its slot is emptied."""
        slot = self.slots.remove(lora_int_id)
        if slot is not None:
            self.pool.clear(slot)
        self.known.pop(lora_int_id, None)
