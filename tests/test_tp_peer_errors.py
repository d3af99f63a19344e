"""A tensor-parallel rank other than 0 that fails hands its own error to rank 0 (``nanovllm/parallel/launch.py``,
``control.py``, the store in ``nanovllm/distributed/rendezvous.py``), so the user reads the real message, not the
transport's.

Before this, an engine whose build raised ``ValueError`` on rank 1 only (before ``Engine.__init__``, while rank 0
builds its model and waits in a collective) made ``LLM(...)`` raise gloo's ``RuntimeError("[.../gloo/transport/tcp/
pair.cc:553] Connection closed by peer [127.0.0.1]:32684. This is typically caused by a remote worker crashing.
...")``; now it raises ``RuntimeError("tensor-parallel worker(s) died: rank 1 (exit code 1): ValueError: injected at
build on rank 1; ...")`` from the gloo error, within seconds, and leaves no worker.  The report's store round trip,
its length cap, and rank 0's choice between its own error and a dead peer's run without starting a process."""
import pytest

from conftest import build_checkpoint
from nanovllm import LLM, distributed
from nanovllm.distributed import liveness, rendezvous
from nanovllm.engine.engine import Engine
from nanovllm.parallel import control
from test_tp_close import Proc
from test_tp_sizes import spawned_workers
from test_tp_worker_failure import BOUND_S, ENGINE, within_bound


class FailsToBuildOnRankOne(Engine):
    """Rank 1 raises before building anything; rank 0 meanwhile builds its model and blocks in a collective."""

    def __init__(self, config):
        if distributed.current().rank == 1:
            raise ValueError("injected at build on rank 1")
        super().__init__(config)


class FailsToBuildOnRankOneLLM(LLM):
    engine_class = FailsToBuildOnRankOne


def test_a_build_failure_on_rank_1_alone_raises_its_own_error_on_rank_0(tmp_path, monkeypatch):
    model = build_checkpoint(tmp_path / "qwen3", "qwen3")
    monkeypatch.setenv("NANOVLLM_TP_TIMEOUT_S", str(5 * BOUND_S))  # the worker inherits it
    error, seconds = within_bound(lambda: FailsToBuildOnRankOneLLM(model, tensor_parallel_size=2, **ENGINE).close(),
                                  f"LLM(...) still builds {BOUND_S} s after rank 1 failed")
    assert seconds < 30
    assert isinstance(error, RuntimeError), error
    assert "rank 1 (exit code 1): ValueError: injected at build on rank 1" in str(error), str(error)
    assert error.__cause__ is not None  # the collective's own error, chained
    assert spawned_workers() == [] and distributed.current() == distributed.TensorParallel(0, 1)


@pytest.fixture
def store(monkeypatch):
    # no watch runs here: what an earlier test's watch found in this process (kept until the next start) is not ours
    monkeypatch.setattr(liveness, "_failure", None)
    return rendezvous.host(2, 5.0)


def test_a_reported_error_reaches_rank_0_through_the_store_capped_in_length(store):
    peer = rendezvous.connect(store.port, 2, 5.0)
    assert rendezvous.reported_errors(store, [1]) == {}
    assert rendezvous.report_error(peer, 1, ValueError("x" * 5000))
    got = rendezvous.reported_errors(store, [1, 2])
    assert list(got) == [1] and got[1] == ("ValueError: " + "x" * 5000)[:rendezvous.MAX_ERROR_CHARS]
    assert not rendezvous.report_error(None, 1, ValueError("no store"))
    assert rendezvous.reported_errors(None, [1]) == {}
    assert rendezvous.group_store() is None  # not in a group: nothing to report to
    assert rendezvous.describe_dead([(1, 1), (2, -9)], {1: "ValueError: bad shard"}) == \
        "tensor-parallel worker(s) died: rank 1 (exit code 1): ValueError: bad shard, rank 2 (exit code -9)"
    assert rendezvous.describe_dead([(1, None)]) == "tensor-parallel worker(s) died: rank 1 (failed)"


def test_a_rank_that_died_before_joining_is_named_with_its_reported_error(store):
    rendezvous.report_error(rendezvous.connect(store.port, 2, 5.0), 1, TypeError("cannot bind cuda:1"))
    with pytest.raises(RuntimeError, match=r"rank 1 \(exit code 1\): TypeError: cannot bind cuda:1 before joining"):
        rendezvous.wait_for_ranks(store, [1], lambda: [(1, 1)], 5.0)


def dead_peers(store, message: str | None) -> control.SpawnedPeers:
    """Spawned peers whose rank 1 ended with exit code 1, having reported ``message`` (None: nothing)."""
    proc = Proc()
    proc.alive, proc.exitcode = False, 1
    if message is not None:
        rendezvous.report_error(rendezvous.connect(store.port, 2, 5.0), 1, ValueError(message))
    return control.SpawnedPeers([proc], store)


def test_rank_0_gives_a_collectives_error_way_to_the_dead_peers_own(store):
    gloo = RuntimeError("Connection closed by peer")
    with pytest.raises(RuntimeError, match=r"rank 1 \(exit code 1\): ValueError: shard cuts a group") as raised:
        dead_peers(store, "shard cuts a group").build_failed(gloo)
    assert raised.value.__cause__ is gloo
    with pytest.raises(RuntimeError, match=r"died: rank 1 \(exit code 1\): ValueError: shard cuts a group$"):
        dead_peers(store, None).send(0)  # the report from the first peers is still in the store
    with pytest.raises(RuntimeError, match=r"died: rank 1 \(exit code 1\); the traceback") as raised:
        dead_peers(rendezvous.host(2, 5.0), None).failed(gloo)  # no report: the exit code alone, as before
    assert raised.value.__cause__ is gloo


def test_rank_0s_own_error_stays_with_a_note_naming_the_dead_peer(store):
    own = ValueError("rank 0's shard cuts a group")
    dead_peers(store, "rank 1's shard cuts a group").build_failed(own)  # returns: the caller re-raises ``own``
    assert own.__notes__ == ["tensor-parallel rank 0: meanwhile tensor-parallel worker(s) died: rank 1 (exit code "
                             "1): ValueError: rank 1's shard cuts a group"]
    alive = control.SpawnedPeers([Proc()], store)
    alive.death_grace_s = 0.1
    gloo = RuntimeError("Connection reset by peer")
    alive.build_failed(gloo)  # no peer failed: rank 0's error stays, untouched
    assert not hasattr(gloo, "__notes__")
