"""The control channel of a tensor-parallel group, and rank 0's handle on the other ranks.

* ``open_channel`` (every rank, right after joining the default group) makes the gloo group calls travel on; it
  never times out, since rank 0 may idle for hours between two calls.  ``leave_group`` forgets it and leaves the
  default group: this process is a rank of one again.
* ``send(op, arg, payload)`` on rank 0 and ``receive()`` on every other rank move one call, in order: an int64
  header ``[op, arg, len(payload)]``, then the payload's bytes only when there are any.  ``send`` does not wait
  for the peers to take the call (gloo would wait for each to post its receive, i.e. to finish its last call):
  up to ``MAX_IN_FLIGHT`` calls stay in flight, and a failed one raises from a later ``send`` or ``flush``.
* ``SpawnedPeers``, ``TorchrunPeers``: ``send``, ``failed`` and ``build_failed`` raise ``RuntimeError`` naming
  each dead rank, its exit code and error; later calls raise at once; ``close`` closes the engine ``attach`` named
  first (NCCL's abort waits while its CUDA graphs live), then sends ``CLOSE``, ends spawned ranks and leaves the
  group, never raising for a peer gone nor waiting on one without a deadline (``timeout_s()``, then a signal).
* ``timeout_s()``: ``$NANOVLLM_TP_TIMEOUT_S`` (default 30): a collective's wait, and how long a peer may stop
  answering (``distributed/liveness.py``) before rank 0 raises.
"""
import collections
import datetime
import threading
import time
import weakref

import torch
import torch.distributed as dist

import nanovllm.distributed as distributed
from nanovllm import envs
from nanovllm.distributed import liveness, rendezvous

CLOSE = -1  # the op that ends a rank's replay
MAX_IN_FLIGHT = 16
ABORT_BOUND_S = 30.0  # how long leaving an NCCL group may take before this process gives the group up
JOIN_BOUND_S = 30.0  # how long a closing rank 0 waits for a spawned rank's process to end before killing it
KILL_GRACE_S = 2.0  # how long a failed group's peers get to end themselves (a rank that reported its error exits 1)
_control = None  # the gloo group calls travel on
_in_flight: collections.deque = collections.deque()  # ([work], [tensor]) of each send not yet seen complete
_header = torch.zeros(3, dtype=torch.int64)  # a receiving rank's


def timeout_s() -> float:
    """The default group's timeout: ``$NANOVLLM_TP_TIMEOUT_S`` seconds (``nanovllm/envs.py``)."""
    return envs.get("NANOVLLM_TP_TIMEOUT_S")


def open_channel() -> None:
    global _control
    _control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))


def send(op: int, arg: int = 0, payload: bytes = b"") -> None:
    tensors = [torch.tensor([op, arg, len(payload)], dtype=torch.int64)]
    if payload:
        tensors.append(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    _in_flight.append(([dist.broadcast(t, src=0, group=_control, async_op=True) for t in tensors], tensors))
    while _in_flight and (len(_in_flight) > MAX_IN_FLIGHT or all(w.is_completed() for w in _in_flight[0][0])):
        _wait_oldest()


def flush(timeout: float | None = None) -> None:
    """Wait until every call sent has been taken by every peer; with ``timeout`` (seconds), raise
    ``RuntimeError`` once that has passed (a peer alive but not answering, after the liveness watch stopped)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while _in_flight:
        _wait_oldest(deadline)


def _wait_oldest(deadline: float | None = None) -> None:
    for work in _in_flight.popleft()[0]:
        while not work.is_completed():  # a peer that stops answering fails here, not in a wait without end
            if liveness.failure() is not None:
                raise RuntimeError(liveness.failure())
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError("a tensor-parallel peer did not take rank 0's call in time")
            time.sleep(1e-4)
        work.wait()  # raises if that send failed


def receive() -> tuple[int, int, bytes]:
    """The next call rank 0 sent: (op, arg, payload)."""
    dist.broadcast(_header, src=0, group=_control)
    op, arg, size = _header.tolist()
    if not size:
        return op, arg, b""
    payload = torch.empty(size, dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=_control)
    return op, arg, payload.numpy().tobytes()


def leave_group() -> None:
    """Forget the control group and leave the default one.  NCCL groups are aborted after a device sync, not
    destroyed: ``destroy_process_group`` waits on every rank's teardown and can hang at exit; the sync means no
    work is in flight, so the abort loses nothing.  The abort itself is bounded (``ABORT_BOUND_S``)."""
    global _control
    _control = None
    _in_flight.clear()
    distributed.release_symmetric_all_reduce()
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            if liveness.failure() is None:  # a failed group's queued collectives may never finish
                torch.cuda.synchronize()
            _bounded(dist.distributed_c10d._abort_process_group, ABORT_BOUND_S)
        else:
            dist.destroy_process_group()
    distributed.set_current(distributed.TensorParallel())


def _bounded(teardown, seconds: float) -> None:
    """Run ``teardown`` (NCCL's abort) in a thread for at most ``seconds``.  Past that, this process gives the group
    up (``distributed.abandon_group``: a later group in it raises, naming why) rather than wait without end."""
    thread = threading.Thread(target=teardown, name="nanovllm-tp-abort", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        distributed.abandon_group(f"tearing down the last tensor-parallel group (NCCL's abort) took over {seconds:g} s")


class _Peers:
    """What both kinds of peers share: once a call failed after the peers had it, the ranks are out of step."""
    broken: str | None = None
    closed = False
    label = "tensor-parallel rank 0"
    death_grace_s = 0.0  # how long a failed call waits for the peer that caused it to show as dead
    store = None  # where a failing peer reports its error (rendezvous.report_error)
    _engine = None  # a weak reference to rank 0's engine (``attach``)

    def attach(self, engine) -> None:
        """``engine`` (rank 0's, held weakly) is closed first by ``close``, before the group is left."""
        self._engine = weakref.ref(engine)

    def _close_engine(self) -> None:
        """Close the attached engine once, if it is still alive."""
        engine = self._engine() if self._engine is not None else None
        self._engine = None
        close = getattr(engine, "close", None)
        if close is not None:
            close()

    def close(self, serving: bool = True) -> None:
        """Close the attached engine first, then end the peers and leave the group (``_end_peers``, each kind's own
        way; ``serving=False``: rank 0 failed before the peers served calls).  Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self._close_engine()
        finally:
            self._end_peers(serving)

    def dead(self) -> list[tuple[int, int | None]]:
        """(rank, exit code) of each peer known to have ended."""
        return []

    def failures(self) -> list[tuple[int, int | None]]:
        """(rank, exit code or None) of each peer known to have failed: ``dead`` unless a subclass knows more."""
        return self.dead()

    def describe(self, dead: list[tuple[int, int | None]]) -> str:
        """``dead`` named with the errors those ranks reported (``rendezvous.describe_dead``), after what the
        liveness watch found (which rank stopped answering, and what it was doing)."""
        found = liveness.failure()
        named = rendezvous.describe_dead(dead, rendezvous.reported_errors(self.store, [r for r, _ in dead]),
                                         liveness.activities())
        return f"{found}; {named}" if found else named

    def kill(self) -> None:
        """End the peers' processes this rank can reach (the liveness watch found one failed)."""

    def send(self, op: int, arg: int = 0, payload: bytes = b"") -> None:
        if self.closed:
            raise RuntimeError(f"{self.label}: the engine was closed")
        dead = self.dead()
        if dead:
            self.broken = self.describe(dead)
            raise RuntimeError(self.broken)
        if self.broken:
            raise RuntimeError(f"{self.label}: an earlier call failed ({self.broken}); the ranks are out of step "
                               f"or gone, so this engine cannot run calls any more")
        try:
            send(op, arg, payload)
        except Exception as e:  # a peer that died closed its connection
            self.failed(e)
            raise

    def _wait_for_failures(self, grace_s: float) -> list[tuple[int, int | None]]:
        deadline = time.monotonic() + grace_s
        while not (failed := self.failures()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return failed

    def failed(self, error: BaseException) -> None:
        """A call failed on rank 0 after the peers had it: refuse later calls.  Raises ``RuntimeError`` naming
        the rank(s) and their errors if a peer is found failed within ``death_grace_s``; else adds a note to
        ``error``."""
        self.broken = f"{type(error).__name__}: {error}"[:300]
        dead = self._wait_for_failures(self.death_grace_s if isinstance(error, Exception) else 0.0)
        if dead:
            self.broken = self.describe(dead)
            raise RuntimeError(f"{self.broken}; the traceback is in its stderr") from error
        error.add_note(f"{self.label}: this call failed after the other ranks started it; if a peer rank died, "
                       f"its log (torchrun reports the first failure) says why; a peer that hangs fails a collective "
                       f"after NANOVLLM_TP_TIMEOUT_S={timeout_s():g} s.  Later calls of this LLM raise at once.")

    def build_failed(self, error: BaseException) -> None:
        """Rank 0's engine build raised ``error`` after the peers started.  A ``RuntimeError`` (what a collective
        raises when its peer is gone) gives way to the failed peers' own errors: raises ``RuntimeError`` naming
        them, from ``error``, if a peer is found failed within ``death_grace_s``.  Any other error is rank 0's
        own: it stays, with a note naming a peer already failed.  Returns when ``error`` stays."""
        if not isinstance(error, Exception):
            return
        dead = self._wait_for_failures(self.death_grace_s if isinstance(error, RuntimeError) else 0.0)
        if dead and isinstance(error, RuntimeError):
            raise RuntimeError(f"{self.describe(dead)}; the traceback is in its stderr") from error
        if dead:
            error.add_note(f"{self.label}: meanwhile {self.describe(dead)}")


class SpawnedPeers(_Peers):
    """Ranks 1..N-1 as the processes rank 0 spawned (``procs``, rank order)."""
    death_grace_s = 3.0

    def __init__(self, procs: list, store=None):
        self.procs, self.store = procs, store  # store: the rendezvous store rank 0 hosts

    def dead(self) -> list[tuple[int, int | None]]:
        return [(rank, p.exitcode) for rank, p in enumerate(self.procs, 1) if not p.is_alive()]

    def kill(self) -> None:
        """Kill each peer still alive ``KILL_GRACE_S`` from now: a rank that reported its error is already ending
        its process (exit code 1), and a kill in between would hide that code behind the signal's."""
        deadline = time.monotonic() + KILL_GRACE_S
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()

    def _end_peers(self, serving: bool) -> None:
        """Send ``CLOSE``, join the peers, then leave the group.  ``serving=False`` (each may wait in a collective
        of its engine's start), a peer that cannot be told or does not take ``CLOSE`` within ``timeout_s()``: ended
        by signal; one alive after ``JOIN_BOUND_S``: killed."""
        liveness.stop()  # from here on a peer that ends is closing, not failing
        told = serving and not self.broken and not self.dead()
        if told:
            try:
                send(CLOSE)
                flush(timeout_s())
            except RuntimeError:  # a peer died since the check (gloo: connection closed), or hangs
                told = False
        try:
            for p in self.procs:  # told: each closes its engine and ends its process
                if not told:
                    p.terminate()
                p.join(timeout=JOIN_BOUND_S)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=JOIN_BOUND_S)
        finally:
            leave_group()  # once the peers are gone: nothing of theirs still waits on this rank's teardown


class TorchrunPeers(_Peers):
    """Ranks 1..N-1 of a group torchrun started: their processes are torchrun's."""

    def __init__(self, world: int):
        self.label = f"tensor-parallel rank 0 of {world} (torchrun)"
        self.world, self.store = world, rendezvous.group_store()

    def failures(self) -> list[tuple[int, int | None]]:
        """The ranks that reported an error (their processes are torchrun's: no exit code here)."""
        return [(r, None) for r in rendezvous.reported_errors(self.store, range(1, self.world))]

    def _end_peers(self, serving: bool) -> None:
        """Send ``CLOSE`` (not with ``serving=False``: the peers' collectives then fail and torchrun ends them; a
        peer that does not take it within ``timeout_s()`` is left to torchrun) and leave the group."""
        liveness.stop()
        if not serving:
            self.broken = "rank 0 failed to build its engine"
        if not self.broken:
            try:
                send(CLOSE)
                flush(timeout_s())
            except RuntimeError as e:  # a peer is already gone: nothing to tell it; still leave the group
                self.broken = f"{type(e).__name__}: {e}"[:300]
        try:
            leave_group()
        except Exception:
            if not self.broken:
                raise
