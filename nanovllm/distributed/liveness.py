"""Liveness of a tensor-parallel group: each rank says what it is doing, rank 0 learns within a bounded time that a
peer stopped answering, and no rank outlives rank 0.

``start`` (every rank, once it joined) runs a thread that writes this rank's beat, "<counter> <activity>", to the
group's store every ``BEAT_S`` (``doing`` sets the activity) and reads the others'.  A rank r > 0 ends its process
when rank 0's store is gone, its beat stood still for ``timeout_s`` or it set the stop key.  On rank 0, a peer whose
process ended, that reported an error, or whose beat stood still for ``timeout_s`` has failed: ``failure()`` names it
and what it was doing, and the thread sets the stop key, kills the peers it can and aborts the default group, so a
collective waiting for the peer returns; on a device backend the process's exit is then bounded to ``EXIT_BOUND_S``
(``exit_bound.py``).  ``wait(event)`` is rank 0's bounded ``event.synchronize()``: it raises once a peer failed or
after ``timeout_s`` (a peer alive but stuck).  ``failure()`` outlives the watch (a failed group's queued collectives
may never finish: it is not synchronised); ``activities()`` and ``longest_waits()`` report the peers' last
activities and how close legitimate waits came to ``timeout_s``.  ``meet(activity)`` waits, with no bound but this
watch, until every rank reached its meeting of the same order: for work whose length differs by rank (compiling).
"""
import os
import threading
import time
from typing import Callable

import torch.distributed as dist

from nanovllm.distributed import exit_bound
from nanovllm.distributed.rendezvous import group_store, reported_errors
from nanovllm.logger import logger

BEAT_S = 0.5  # seconds between two beats (and two looks at the peers)
MEET_POLL_S = 0.05  # seconds between two looks at a meeting's count
STOP_KEY = "nanovllm/beat/stop"
CLOSING_GRACE_S = 30.0  # a rank told to close that is still alive this long after rank 0 went ends itself
EXIT_BOUND_S = 60.0  # after a failure on a device backend, rank 0's exit may take this long (its abort takes 30 s)


def _beat_key(rank: int) -> str:
    return f"nanovllm/beat/{rank}"


class _Watch:
    def __init__(self, rank, size, connect, timeout_s, dead, kill):
        self.rank, self.size, self.connect, self.timeout_s = rank, size, connect, timeout_s
        self.dead, self.kill = dead or (lambda: []), kill or (lambda: None)
        self.activity = "joining the group"
        self.closing = False
        self.stopped = threading.Event()
        self.seen: dict[int, tuple[str, float]] = {}  # peer -> (its last beat, when rank 0 saw it change)
        self.max_gap = 0.0
        self.max_wait = 0.0  # the longest ``wait`` of rank 0 for a step
        self.thread = threading.Thread(target=self._run, name=f"nanovllm-tp-liveness-{rank}", daemon=True)

    def _run(self) -> None:
        try:
            store = self.connect()
        except Exception as e:  # noqa: BLE001 - no store: rank 0 is already gone
            self._peer_lost(f"its store could not be reached ({type(e).__name__}: {e})")
            return
        if not self.rank:  # an earlier group's stop (torchrun keeps one store) is not this group's
            store.delete_key(STOP_KEY)
        counter = 0
        while not self.stopped.wait(BEAT_S):
            counter += 1
            try:
                store.set(_beat_key(self.rank), f"{counter} {self.activity}")
                if self.rank:
                    self._watch_rank0(store)
                elif _failure is None:
                    self._watch_peers(store)
            except Exception as e:  # noqa: BLE001 - the store went with rank 0
                if self.rank:
                    self._peer_lost(f"rank 0's store stopped answering ({type(e).__name__})")
                    return

    # ---- rank r > 0 -------------------------------------------------------------------------------------
    def _watch_rank0(self, store) -> None:
        if store.check([STOP_KEY]):
            self._peer_lost("rank 0 stopped the group (a rank failed)")
        _, still = self._read_beat(store, 0, time.monotonic())
        if still > self.timeout_s:
            self._peer_lost(f"rank 0 has not answered for {still:.0f} s (NANOVLLM_TP_TIMEOUT_S={self.timeout_s:g})")

    def _peer_lost(self, why: str) -> None:
        if self.closing:  # told to close: rank 0 may simply be done; give this rank's own exit a moment
            if not self.stopped.wait(CLOSING_GRACE_S):
                os._exit(0)
            return
        logger.error("tensor-parallel rank %d: %s; ending this process (it was %s)", self.rank, why, self.activity)
        os._exit(1)

    def _read_beat(self, store, rank: int, now: float) -> tuple[str, float]:
        """(what ``rank``'s beat says it is doing, seconds its beat has stood still), noting in ``max_gap`` the
        longest time between two of its beats seen here (``BEAT_S`` unless it stalled)."""
        key = _beat_key(rank)
        beat = store.get(key).decode() if store.check([key]) else ""
        last, since = self.seen.get(rank, (None, None))
        if beat != last:
            if since is not None:
                self.max_gap = max(self.max_gap, now - since)
            self.seen[rank] = (beat, now)
            since = now
        self.max_gap = max(self.max_gap, now - since)
        return beat.partition(" ")[2] or "starting", now - since

    # ---- rank 0 -----------------------------------------------------------------------------------------
    def _watch_peers(self, store) -> None:
        now = time.monotonic()
        beats = {peer: self._read_beat(store, peer, now) for peer in range(1, self.size)}
        dead = self.dead()
        problems = [f"rank {r} ({'exit code ' + str(c) if c is not None else 'ended'}), while it was {beats[r][0]}"
                    for r, c in dead]
        errors = reported_errors(store, [r for r in beats if r not in dict(dead)])
        problems += [f"rank {r} raised {e}, while it was {beats[r][0]}" for r, e in errors.items()]
        problems += [f"rank {r} has not answered for {gap:.0f} s (NANOVLLM_TP_TIMEOUT_S={self.timeout_s:g}), "
                     f"last {doing}" for r, (doing, gap) in beats.items() if gap > self.timeout_s]
        if problems:
            self.fail("tensor-parallel peer(s) stopped answering: " + "; ".join(problems), store)

    def fail(self, message: str, store=None) -> None:
        """Record ``message`` as the group's failure, stop the peers and abort the default group (rank 0)."""
        global _failure
        if _failure is not None or self.stopped.is_set():  # a stopped watch's peers are closing, not failing
            return
        _failure = message
        logger.error("%s; stopping the other ranks", message)
        if dist.is_initialized() and dist.get_backend() != "gloo":  # device work may wait for the peer forever
            exit_bound.arm(EXIT_BOUND_S)
        try:
            if store is not None:
                store.set(STOP_KEY, "1")
            self.kill()
        finally:
            try:
                if dist.is_initialized():
                    dist.distributed_c10d._abort_process_group()
            except Exception:  # noqa: BLE001 - a backend without abort: the killed peers close its connections
                pass

    def describe_peers(self) -> str:
        now = time.monotonic()
        return ", ".join(f"rank {r}: {beat.partition(' ')[2] or 'starting'} (changed {now - t:.0f} s ago)"
                         for r, (beat, t) in sorted(self.seen.items())) or "no beat seen yet"


_watch: _Watch | None = None
_failure: str | None = None  # the last watch's failure, kept after it stopped (a broken group is not synchronised)
_meetings = 0  # ``meet`` calls since this rank's watch started


def start(rank: int, size: int, connect: Callable, timeout_s: float, dead: Callable | None = None,
          kill: Callable | None = None) -> None:
    """Start this rank's beat and watch (see the module docstring); replaces an earlier one."""
    global _watch, _failure, _meetings
    stop()
    _failure, _meetings = None, 0
    _watch = _Watch(rank, size, connect, timeout_s, dead, kill)
    _watch.thread.start()


def stop(closing: bool = False) -> None:
    """Rank 0: end the watch (the peers are about to be closed).  Another rank with ``closing``: it was told to
    close, so rank 0 going away is no longer a failure."""
    global _watch
    if _watch is None:
        return
    if closing and _watch.rank:
        _watch.closing = True
        return
    _watch.stopped.set()
    _watch = None


def doing(activity: str) -> None:
    """This rank's current activity, as its next beat reports it."""
    if _watch is not None:
        _watch.activity = activity


class PeerFailed(RuntimeError):
    """A peer failed while this rank waited for it in ``meet``."""


def meet(activity: str) -> None:
    """Report ``activity``, then wait until every rank of the watched group has made as many ``meet`` calls as this
    one (ranks make them at the same points: they replay the same calls).  A rank may compile for longer than a
    collective may wait (``timeout_s``) without failing: ranks meet before running what they compiled.  No bound but
    the watch's: rank 0 raises ``PeerFailed`` once it found a peer failed; another rank ends with rank 0.  A no-op
    without a watch (a rank of one)."""
    global _meetings
    watch, store = _watch, group_store()
    if watch is None or store is None:
        return
    _meetings += 1
    arrived, left = f"nanovllm/meet/{_meetings}/arrived", f"nanovllm/meet/{_meetings}/left"
    doing(activity)
    store.add(arrived, 1)
    while store.add(arrived, 0) < watch.size:
        if _failure is not None:
            raise PeerFailed(_failure)
        time.sleep(MEET_POLL_S)
    if store.add(left, 1) == watch.size:  # the last to leave clears the meeting for a later group on this store
        store.delete_key(arrived)
        store.delete_key(left)


def failure() -> str | None:
    """What rank 0's watch found wrong with a peer (kept once the watch stopped, until the next ``start``), or
    None."""
    return _failure


def activities() -> dict[int, str]:
    """What each peer's last beat seen by rank 0's watch said it was doing, by rank ({} elsewhere)."""
    watch = _watch
    if watch is None or watch.rank:
        return {}
    return {r: beat.partition(" ")[2] for r, (beat, _) in list(watch.seen.items()) if beat}


def longest_waits() -> dict:
    """Rank 0's longest legitimate waits so far, against ``timeout_s``: ``tp_max_beat_gap_s`` (the longest a peer's
    beat stood still) and ``tp_max_step_wait_s`` (the longest ``wait`` for a step); {} outside a watched group."""
    watch = _watch
    if watch is None or watch.rank:
        return {}
    return {"tp_max_beat_gap_s": round(watch.max_gap, 2), "tp_max_step_wait_s": round(watch.max_wait, 3),
            "tp_timeout_s": watch.timeout_s}


def wait(event) -> None:
    """Wait for ``event`` (see the module docstring)."""
    watch = _watch
    query = getattr(event, "query", None)
    if watch is None or watch.rank or query is None:
        event.synchronize()
        return
    start_t = time.monotonic()
    pause = 20e-6
    while not query():
        if _failure is not None:
            raise RuntimeError(_failure)
        waited = time.monotonic() - start_t
        if waited > watch.timeout_s:
            watch.fail(f"tensor-parallel rank 0 waited {waited:.0f} s for a step that needs every rank "
                       f"(NANOVLLM_TP_TIMEOUT_S={watch.timeout_s:g}); {watch.describe_peers()}")
            raise RuntimeError(_failure)
        time.sleep(pause)
        pause = min(pause * 2, 1e-4)  # a step late by at most 0.1 ms
    watch.max_wait = max(watch.max_wait, time.monotonic() - start_t)
