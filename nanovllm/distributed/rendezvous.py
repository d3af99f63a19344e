"""The start-up rendezvous of a group whose rank 0 spawned the other ranks itself: rank 0 hosts the TCP store, and
waits for every rank to announce it has started, watching the processes it spawned meanwhile, so a rank that dies
before it joins (it could not unpickle its arguments, it crashed at import) makes rank 0 raise within a poll
interval instead of waiting out the group's timeout in ``torch.distributed``'s rendezvous.  The store outlives a
failing rank, so it also carries that rank's error to rank 0 (``report_error``, ``reported_errors``).

Contract: ``host`` (rank 0) opens a store on a free localhost port (``store.port``) before the ranks are spawned;
each rank calls ``announce`` with a store from ``connect`` just before it joins the group with that store
(``group.init_process_group(..., store=...)``); rank 0 calls ``wait_for_ranks`` before joining it.
``wait_for_ranks`` raises ``RuntimeError`` naming each dead rank, its exit code and the error it reported
("tensor-parallel worker(s) died: rank 1 (exit code 1): ValueError: ..."), or, after ``timeout_s``, the ranks that
never announced themselves; it stops no process: the caller does.  A rank that dies after announcing itself is not
seen here (the group's own collectives or timeout catch it).  A failing rank calls ``report_error`` on its store
(the rendezvous store, or ``group_store()``: torchrun's) before it ends; reporting and reading never raise.
"""
import datetime
import os
import time
from collections.abc import Callable

import torch.distributed as dist

HOST = "127.0.0.1"
POLL_S = 0.05  # seconds between two looks at the store and the processes
MAX_ERROR_CHARS = 2000  # of a failing rank's "TypeName: message" report


def _key(rank: int) -> str:
    return f"nanovllm/started/{rank}"


def host(size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store for a group of ``size`` ranks, listening on a free localhost port (``.port``)."""
    return dist.TCPStore(HOST, 0, size, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def connect(port: int, size: int, timeout_s: float) -> dist.TCPStore:
    """Another rank's client of rank 0's store on ``port``."""
    return dist.TCPStore(HOST, port, size, False, datetime.timedelta(seconds=timeout_s))


def connect_watch(port: int | None, size: int, timeout_s: float) -> dist.TCPStore:
    """A store client of its own for a rank's liveness watch (``liveness.py``): rank 0's store on ``port``, or, with
    None, torchrun's (``MASTER_ADDR``:``MASTER_PORT``)."""
    if port is None:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, False,
                             datetime.timedelta(seconds=timeout_s))
    return connect(port, size, timeout_s)


def announce(store: dist.TCPStore, rank: int) -> None:
    """Tell rank 0 that ``rank`` started and is about to join the group."""
    store.set(_key(rank), "1")


def _error_key(rank: int) -> str:
    return f"nanovllm/error/{rank}"


def group_store() -> dist.Store | None:
    """The default group's store (under torchrun, torchrun's env:// store), or None outside a group."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store to report to: the rank's stderr still has its traceback
        return None


def report_error(store: dist.Store | None, rank: int, error: BaseException) -> bool:
    """Leave ``error`` as "TypeName: message" (at most ``MAX_ERROR_CHARS``) for rank 0 under ``rank``'s key, and
    wait until the store holds it, so that rank 0 finds it once this process ended.  False if there is no store or
    it cannot be reached."""
    if store is None:
        return False
    try:
        store.set(_error_key(rank), f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS])
        return store.check([_error_key(rank)])  # a round trip: the store has the error
    except Exception:  # noqa: BLE001 - rank 0 then names this rank by its exit code only
        return False


def reported_errors(store: dist.Store | None, ranks) -> dict[int, str]:
    """The error each rank of ``ranks`` reported (``report_error``), by rank; {} without a reachable store."""
    errors = {}
    for rank in ranks:
        try:
            if store is not None and store.check([_error_key(rank)]):
                errors[rank] = store.get(_error_key(rank)).decode(errors="replace")
        except Exception:  # noqa: BLE001 - a store gone with its host: the exit code still names the rank
            pass
    return errors


def describe_dead(dead: list[tuple[int, int | None]], errors: dict[int, str] | None = None,
                  doing: dict[int, str] | None = None) -> str:
    """"tensor-parallel worker(s) died: rank 1 (exit code 1): ValueError: ..., while it was running step (call 7),
    rank 2 (exit code -9)" for (rank, exit code) pairs (None: a torchrun rank known only by its report), the errors
    they reported and what they were doing (their last liveness beat, where rank 0 saw one)."""
    errors, doing = errors or {}, doing or {}
    parts = [f"rank {r} ({'failed' if c is None else f'exit code {c}'})" + (f": {errors[r]}" if r in errors else "")
             + (f", while it was {doing[r]}" if r in doing else "") for r, c in dead]
    return f"tensor-parallel worker(s) died: {', '.join(parts)}"


def wait_for_ranks(store: dist.TCPStore, ranks: list[int], dead: Callable[[], list[tuple[int, int | None]]],
                   timeout_s: float) -> None:
    """Return once every rank of ``ranks`` announced itself; ``dead()`` lists the (rank, exit code) of ranks whose
    process ended, checked between looks at the store (a dead rank raises even if it announced itself)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(ranks)
    while True:
        waiting = [r for r in waiting if not store.check([_key(r)])]
        gone = dead()
        if gone:
            errors = reported_errors(store, [r for r, _ in gone])
            raise RuntimeError(f"{describe_dead(gone, errors)} before joining the group (its stderr has the traceback)")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel rank(s) {', '.join(map(str, waiting))} did not start within "
                               f"{timeout_s:g} s")
        time.sleep(POLL_S)
