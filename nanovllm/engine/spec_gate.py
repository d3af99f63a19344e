"""``SpecGate``: when the engine lets decode steps propose (speculative decoding), by what it measures pays.

A verify step must be resolved before the next step is scheduled (its tokens are unknown until then), so speculating
gives up the pipeline (``pipeline_depth`` queued steps) and runs more rows per step. It pays when the tokens each
sequence gains per verify step outweigh the verify cycle's cost: ``gain * plain >= verify``, with ``gain`` the
tokens per sequence a verify step kept (1 + accepted drafts), ``verify`` the seconds from a verify step's launch to
the next decode launch and ``plain`` those between two pipelined plain decode launches (running averages, measured
only between decode launches; plain steps are measured first). After a verify step that did not pay, or a decode
step with nothing to propose, the next ``backoff`` decode steps run plain and pipelined; ``backoff`` starts at
``BACKOFF``, doubles each time speculating fails to pay in a row, up to ``MAX_BACKOFF``, so text that repeats
nothing costs one verify step in ``MAX_BACKOFF`` plain ones; a verify step that pays resets it. The ranks of a
tensor-parallel group time themselves but decide alike (``agree``), as their mirrored schedulers must.
"""
import time
from typing import Callable

BACKOFF = 4
MAX_BACKOFF = 64
_WEIGHT = 0.25  # of a new sample in the running averages


class SpecGate:
    def __init__(self, adaptive: bool = True, agree: Callable[[int], int] = lambda pays: pays):
        self.adaptive = adaptive  # False: back off only after a decode step with nothing to propose (tests)
        self.agree = agree  # the group's verdict from each rank's (tensor parallelism: the smallest)
        self.wait = 0  # decode steps to run plain before the next try at proposing
        self.backoffs = {"nothing proposed": 0, "did not pay": 0}  # how often each sent steps plain
        self.backoff = BACKOFF
        self.gain = self.verify = self.plain = None  # running averages (module docstring); None until measured
        self._last: tuple[float, bool] | None = None  # (time, was a verify step) of the last decode launch

    @property
    def may_propose(self) -> bool:
        """Whether the next decode step may propose (the engine then resolves every queued step first; otherwise
        the scheduler gets no proposals, even where every token happens to be resolved)."""
        return self.wait == 0

    def launched(self, is_decode: bool, verifies: bool, steady: bool) -> None:
        """Note a step launch: times the interval since the last decode launch (``steady``: the engine waited for
        an earlier step meanwhile, so the interval is the device's pace, not a pipeline filling up); counts down
        the plain run."""
        now = time.perf_counter()
        if not is_decode:
            self._last = None
            return
        if self._last is not None and steady:
            seconds = now - self._last[0]
            if self._last[1]:
                self.verify = _average(self.verify, seconds)
            elif not verifies:  # not the drain before a verify step: that waits for every queued step
                self.plain = _average(self.plain, seconds)
        self._last = (now, verifies)
        if verifies:  # the engine resolves it before the next step
            return
        if self.wait:
            self.wait -= 1
        else:  # a decode step that tried and found nothing to propose
            self.wait = self.backoff
            self.backoffs["nothing proposed"] += 1

    def resolved(self, sequences: int, accepted: int) -> None:
        """Note a resolved verify step of ``sequences`` sequences that kept ``accepted`` drafts in all."""
        self.gain = _average(self.gain, 1 + accepted / max(1, sequences))
        if not self.adaptive:
            return
        if self.plain is None:  # measure plain steps first
            self.wait = BACKOFF
        elif self.agree(int(self.verify is None or self.gain * self.plain >= self.verify)):
            self.backoff = BACKOFF
        else:
            self.wait, self.backoff = self.backoff, min(2 * self.backoff, MAX_BACKOFF)
            self.backoffs["did not pay"] += 1


def _average(old: float | None, sample: float) -> float:
    return sample if old is None else old + _WEIGHT * (sample - old)
