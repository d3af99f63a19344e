"""``StepPipeline``: the steps queued on the device, and the host buffers each one may use.

The engine keeps up to ``depth`` steps queued: it launches step n, then reads the tokens of step n - depth.
Each launched step owns a ``StepSlot``: a (pinned) host buffer its sampled tokens are copied to in the
background, the index that picks its input staging buffers (``DecodeInputBuilder``), and the event that says the
device is done with it.  There are ``depth + 1`` slots, used round robin, so a slot is reused by the step launched
``depth + 1`` launches later, by which time the engine has read the step that last held it.

The rule that makes this safe, enforced here: a slot is handed out again only after ``collect`` has waited for
its previous step.  Until then the device may still be copying that step's inputs out of the slot's staging
buffers and its tokens into the slot's host buffer.  A prefill step that computes prompt logprobs leaves them on its
slot too (``prompt_logprobs``), handed back with its tokens.
"""
from collections import deque
from typing import Any, Callable

import torch

from nanovllm.distributed import liveness


class StepSlot:
    def __init__(self, index: int, host_tokens: torch.Tensor):
        self.index = index
        self.host_tokens = host_tokens  # [max_num_seqs + 1] int64 on the host: the step's tokens land here
        # (values [max_num_seqs + 1, 1 + MAX_LOGPROBS], ids [.., MAX_LOGPROBS]) on the host, made by the runner the
        # first time a step of this slot reports logprobs; ``has_logprobs`` says whether the current one does
        self.host_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.has_logprobs = False
        # the current step's prompt logprobs, if it computes any: (per row group (sequence, first prompt position,
        # rows), values [rows, 1 + MAX_LOGPROBS], ids [rows, MAX_LOGPROBS]) on the host, copied in the background
        self.prompt_logprobs: tuple | None = None
        self.event = None  # set at launch: the platform's event recorded after the step's work
        self.busy = False


class StepPipeline:
    def __init__(self, depth: int, make_host_tokens: Callable[[], torch.Tensor]):
        assert depth >= 1
        self.depth = depth
        self._slots = [StepSlot(i, make_host_tokens()) for i in range(depth + 1)]
        self._queued: deque = deque()  # (what the caller launched, slot, number of tokens)
        self._launches = 0

    def next_slot(self) -> StepSlot:
        """The slot for the step about to be launched (round robin); it must have been collected."""
        slot = self._slots[self._launches % len(self._slots)]
        if slot.busy:
            raise RuntimeError(f"pipeline slot {slot.index} handed out again before its step was collected "
                               f"({len(self._queued)} steps queued, depth {self.depth})")
        return slot

    def push(self, work: Any, slot: StepSlot, num_tokens: int, event) -> None:
        """Record a launched step: ``work`` (the scheduler's batch), its slot, tokens it samples and its event."""
        assert slot is self.next_slot() and not slot.busy
        slot.busy, slot.event = True, event
        self._launches += 1
        self._queued.append((work, slot, num_tokens))

    def should_collect(self, launched: bool) -> bool:
        """Whether to read the oldest step now: more than ``depth`` are queued, or nothing new was launched."""
        return bool(self._queued) and (len(self._queued) > self.depth or not launched)

    def collect(self) -> tuple[Any, list[int], tuple | None, tuple | None]:
        """Wait for the oldest queued step; returns (its work, its sampled tokens, its logprobs: None or numpy
        (values [n, 1 + MAX_LOGPROBS], ids [n, MAX_LOGPROBS]), its prompt logprobs: None or
        ``StepSlot.prompt_logprobs`` with numpy arrays) and frees its slot."""
        work, slot, n = self._queued.popleft()
        if slot.event is not None:
            liveness.wait(slot.event)  # under tensor parallelism, bounded: a peer that stops answering raises
        tokens = slot.host_tokens[:n].tolist()
        logprobs = None
        if slot.has_logprobs:
            values, ids = slot.host_logprobs
            logprobs = (values[:n].numpy().copy(), ids[:n].numpy().copy())
        prompt = slot.prompt_logprobs
        if prompt is not None:
            prompt = (prompt[0], prompt[1].numpy(), prompt[2].numpy())
        slot.busy, slot.event, slot.has_logprobs, slot.prompt_logprobs = False, None, False, None
        return work, tokens, logprobs, prompt

    def oldest(self) -> Any:
        """The work of the oldest queued step, or None."""
        return self._queued[0][0] if self._queued else None

    def __len__(self) -> int:
        return len(self._queued)
