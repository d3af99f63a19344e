"""``StepPipeline``: the steps queued on the device, and the host buffers each one may use.

The engine keeps up to ``depth`` steps queued: it launches step n, then reads the tokens of step n - depth.  Each
launched step owns a ``StepSlot``: a (pinned) host buffer its sampled tokens are copied to in the background, the
index that picks its input staging buffers (``DecodeInputBuilder``), and the event that says the device is done with
it.  There are ``max_depth + 1`` slots, used round robin.  The rule that makes this safe, enforced here: a slot is
handed out again only after ``collect`` has waited for its previous step (the device may still be copying that
step's inputs out of the slot's staging buffers and its tokens into its host buffer, and its prompt logprobs).

With ``adaptive`` (one rank, on a device that runs queued work while the host goes on), ``paced`` measures the
device's pace (seconds between launches once the host waits for it) and the host's seconds a step, and ``depth`` is
the fewest steps whose device time covers the host's time plus ``LEAD_SECONDS``, at most ``max_depth``
(``pipeline_depth``): a step arriving behind the queue waits for all of it (a prompt's first token, in a server), so
long steps keep fewer.  Tokens are the same at every depth.
"""
import math
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


LEAD_SECONDS = 0.008  # device work kept queued past the host's own time a step: covers its stalls
_WEIGHT = 0.25  # of a new sample in the running averages


class StepPipeline:
    def __init__(self, depth: int, make_host_tokens: Callable[[], torch.Tensor], adaptive: bool = False):
        assert depth >= 1
        self.max_depth = self.depth = depth  # the most steps kept queued, and those kept now
        self.adaptive = adaptive
        self.host_seconds = self.device_seconds = None  # running averages a step (None until measured)
        self._last_launch: float | None = None
        self._slots = [StepSlot(i, make_host_tokens()) for i in range(depth + 1)]
        self._queued: deque = deque()  # (what the caller launched, slot, number of tokens)
        self._launches = 0

    def paced(self, launched_at: float | None, steady: bool, host_seconds: float) -> None:
        """Note an engine step: when it launched one (None: it did not), whether the host waited for the device
        since the launch before (so the interval is the device's pace) and the host's own seconds; with
        ``adaptive``, sets ``depth`` from the running averages."""
        if not self.adaptive:
            return
        self.host_seconds = _average(self.host_seconds, host_seconds)
        if launched_at is not None:
            if steady and self._last_launch is not None:
                self.device_seconds = _average(self.device_seconds, launched_at - self._last_launch)
            self._last_launch = launched_at
        if self.device_seconds:
            self.depth = max(1, min(self.max_depth, math.ceil((self.host_seconds + LEAD_SECONDS) /
                                                              self.device_seconds)))

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
        """Whether to read the oldest step now: more than ``depth`` are queued (after it fell, maybe several), or
        nothing new was launched."""
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


def _average(old: float | None, sample: float) -> float:
    return sample if old is None else old + _WEIGHT * (sample - old)
