"""Closing rank 0's side of a tensor-parallel group (``nanovllm/workers.py``) when a peer is already gone: the exit
message fails as gloo fails it (``RuntimeError``), yet ``close`` does not raise, still ends and joins every spawned
worker, and leaves the group once; a close for a failed start sends no exit message at all.  No process starts:
the workers are stand-ins."""
import pytest

from nanovllm import workers


class Proc:
    """A stand-in worker process that records what ``close`` did to it."""

    def __init__(self):
        self.alive, self.did = True, []

    def is_alive(self):
        return self.alive

    def join(self, timeout=None):
        self.did.append("join")

    def terminate(self):
        self.did.append("terminate")
        self.alive = False

    def kill(self):
        self.did.append("kill")
        self.alive = False


@pytest.fixture
def sent(monkeypatch):
    """Calls to ``broadcast_call`` and ``leave_group``; the broadcast fails as a closed gloo connection does."""
    log = []

    def broadcast(call=None):
        log.append(call)
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(workers, "broadcast_call", broadcast)
    monkeypatch.setattr(workers, "leave_group", lambda: log.append("leave"))
    return log


def spawned(procs) -> workers.Workers:
    peers = object.__new__(workers.Workers)  # as __init__ leaves it, without starting processes
    peers.procs, peers.closed = procs, False
    return peers


def test_workers_close_survives_a_peer_gone_and_still_stops_the_rest(sent):
    procs = [Proc(), Proc()]
    spawned(procs).close()
    assert sent == [("exit",), "leave"]
    assert all(p.did == ["join", "kill"] for p in procs)  # the stand-ins never exit on their own


def test_a_failed_start_terminates_the_workers_without_an_exit_message(sent):
    procs = [Proc()]
    peers = spawned(procs)
    peers.close(serving=False)
    peers.close()  # a second close (atexit, __del__) does nothing
    assert sent == ["leave"] and procs[0].did == ["terminate", "join"]


@pytest.mark.parametrize("serving", [True, False])
def test_torchrun_rank_0_close_survives_a_peer_gone(sent, serving):
    peers = object.__new__(workers.TorchrunPeers)
    peers.rank, peers.closed = 0, False
    peers.close(serving=serving)
    assert sent == ([("exit",)] if serving else []) + ["leave"]
    assert peers.broken  # later calls raise at once
