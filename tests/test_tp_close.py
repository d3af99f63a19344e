"""Closing rank 0's side of a tensor-parallel group (``nanovllm/parallel/control.py``) when a peer is already gone:
the close message fails as gloo fails it (``RuntimeError``), yet ``close`` does not raise, still ends and joins
every spawned rank, and leaves the group once; a close for a failed start sends no message at all; a closed or
broken group refuses calls.  The ranks are stand-ins, but for the failed group's kill: a rank that is ending itself
(it reported its error) keeps its exit code 1, and one that hangs is killed."""
import multiprocessing as mp
import os
import time

import pytest

from nanovllm.parallel import control


class Proc:
    """A stand-in rank process that records what ``close`` did to it."""

    def __init__(self):
        self.alive, self.did, self.exitcode = True, [], None

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
    """Calls to ``send`` and ``leave_group``; the send fails as a closed gloo connection does."""
    log = []

    def send(op, arg=0, payload=b""):
        log.append(op)
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(control, "send", send)
    monkeypatch.setattr(control, "leave_group", lambda: log.append("leave"))
    return log


def test_spawned_close_survives_a_peer_gone_and_still_stops_the_rest(sent):
    procs = [Proc(), Proc()]
    control.SpawnedPeers(procs).close()
    assert sent == [control.CLOSE, "leave"]
    assert all(p.did == ["terminate", "join"] for p in procs)  # not told to close: ended by signal


def test_a_failed_start_terminates_the_ranks_without_a_message(sent):
    procs = [Proc()]
    peers = control.SpawnedPeers(procs)
    peers.close(serving=False)
    peers.close()  # a second close (atexit, __del__) does nothing
    assert sent == ["leave"] and procs[0].did == ["terminate", "join"]
    with pytest.raises(RuntimeError, match="the engine was closed"):
        peers.send(0)


@pytest.mark.parametrize("serving", [True, False])
def test_torchrun_rank_0_close_survives_a_peer_gone(sent, serving):
    peers = control.TorchrunPeers(2)
    peers.close(serving=serving)
    assert sent == ([control.CLOSE] if serving else []) + ["leave"]
    assert peers.broken


def test_a_call_that_failed_after_the_peers_had_it_breaks_the_group(sent):
    peers = control.TorchrunPeers(2)
    with pytest.raises(RuntimeError, match="Connection closed by peer") as raised:
        peers.send(0)
    assert "Later calls of this LLM raise at once" in "".join(raised.value.__notes__)
    with pytest.raises(RuntimeError, match="an earlier call failed"):
        peers.send(0)
    assert sent == [0]  # the second call never reached the channel


def test_a_dead_spawned_rank_is_named_with_its_exit_code(sent):
    procs = [Proc(), Proc()]
    procs[1].alive, procs[1].exitcode = False, 1
    with pytest.raises(RuntimeError, match=r"died: rank 2 \(exit code 1\)"):
        control.SpawnedPeers(procs).send(0)
    assert sent == []


def _exit_soon(code: int, after_s: float) -> None:
    time.sleep(after_s)
    os._exit(code)


def test_the_kill_of_a_failed_group_lets_a_rank_ending_itself_keep_its_exit_code():
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_exit_soon, args=(1, 0.1)), ctx.Process(target=time.sleep, args=(600,))]
    for p in procs:
        p.start()
    control.SpawnedPeers(procs).kill()
    for p in procs:
        p.join(timeout=control.JOIN_BOUND_S)
    assert [p.exitcode for p in procs] == [1, -9]  # the first ended itself within the grace; the other was killed
