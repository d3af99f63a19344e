"""The start-up rendezvous of a group whose rank 0 spawned the other ranks itself: rank 0 hosts the TCP store, and
waits for every rank to announce it has started, watching the processes it spawned meanwhile, so a rank that dies
before it joins (it could not unpickle its arguments, it crashed at import) makes rank 0 raise within a poll
interval instead of waiting out the group's timeout in ``torch.distributed``'s rendezvous.

Contract: ``host`` (rank 0) opens a store on a free localhost port (``store.port``) before the ranks are spawned;
each rank calls ``announce`` with a store from ``connect`` just before it joins the group with that store
(``group.init_process_group(..., store=...)``); rank 0 calls ``wait_for_ranks`` before joining it.
``wait_for_ranks`` raises ``RuntimeError`` naming each dead rank and its exit code ("tensor-parallel worker(s)
died: rank 1 (exit code 1)"), or, after ``timeout_s``, the ranks that never announced themselves; it stops no
process: the caller does.  A rank that dies after announcing itself is not seen here (the group's own collectives
or timeout catch it).
"""
import datetime
import time
from collections.abc import Callable

import torch.distributed as dist

HOST = "127.0.0.1"
POLL_S = 0.05  # seconds between two looks at the store and the processes


def _key(rank: int) -> str:
    return f"nanovllm/started/{rank}"


def host(size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store for a group of ``size`` ranks, listening on a free localhost port (``.port``)."""
    return dist.TCPStore(HOST, 0, size, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def connect(port: int, size: int, timeout_s: float) -> dist.TCPStore:
    """Another rank's client of rank 0's store on ``port``."""
    return dist.TCPStore(HOST, port, size, False, datetime.timedelta(seconds=timeout_s))


def announce(store: dist.TCPStore, rank: int) -> None:
    """Tell rank 0 that ``rank`` started and is about to join the group."""
    store.set(_key(rank), "1")


def describe_dead(dead: list[tuple[int, int | None]]) -> str:
    """"tensor-parallel worker(s) died: rank 1 (exit code 1), ..." for (rank, exit code) pairs."""
    return f"tensor-parallel worker(s) died: {', '.join(f'rank {r} (exit code {c})' for r, c in dead)}"


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
            raise RuntimeError(f"{describe_dead(gone)} before joining the group (its stderr says why)")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel rank(s) {', '.join(map(str, waiting))} did not start within "
                               f"{timeout_s:g} s")
        time.sleep(POLL_S)
