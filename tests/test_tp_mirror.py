"""``MirroredEngine``'s surface is explicit (``nanovllm/parallel/mirror.py``): every public method of ``Engine`` is
either mirrored to the other ranks or listed as a read of rank 0's engine, so a new mutating method cannot
silently run on rank 0 alone; and the calls a replica replays keep two engines in step: ``step`` travels before
rank 0 runs it, the others after, an abort travels by sequence id and only when rank 0's sequence was still
running.  No process starts: the channel and the engines are stand-ins."""
import inspect

import pytest

from nanovllm.engine.engine import Engine
from nanovllm.parallel import control, mirror
from nanovllm.parallel.mirror import EngineReplica, MirroredEngine


def unlisted(engine_class) -> list[str]:
    """Public methods and properties of ``engine_class`` that ``MirroredEngine`` neither mirrors nor reads."""
    listed = set(MirroredEngine.MIRRORED) | set(MirroredEngine.READ_ONLY)
    return [name for name, member in inspect.getmembers(engine_class)
            if not name.startswith("_") and (callable(member) or isinstance(member, property))
            and name not in listed]


def test_every_public_engine_method_is_mirrored_or_read_only():
    assert unlisted(Engine) == []
    for name in MirroredEngine.MIRRORED + MirroredEngine.READ_ONLY:
        assert name in vars(MirroredEngine), f"{name} is listed but not defined on MirroredEngine"
    assert "__getattr__" not in vars(MirroredEngine)


def test_a_new_engine_method_is_caught():
    class Grown(Engine):
        def evict(self, seq):
            pass

    assert unlisted(Grown) == ["evict"]


class Seq:
    def __init__(self, seq_id):
        self.seq_id, self.finished = seq_id, False


class StubEngine:
    """Records calls and holds its sequences, as a scheduler does; ``abort`` succeeds once per sequence, as
    ``Engine.abort`` does."""

    def __init__(self, log):
        self.log, self.seqs, self.step_log, self.stats = log, [], None, {"steps": 0}

    def add_request(self, ids, params, images=None, lora_request=None):
        seq = Seq(len(self.seqs))
        self.seqs.append(seq)
        self.log.append(("add", seq.seq_id))
        return seq

    def step(self):
        self.log.append(("step",))
        return [], False, 0

    def abort(self, seq):
        self.log.append(("abort", seq.seq_id))
        done, seq.finished = seq.finished, True
        return not done

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))

    def reset_stats(self):
        self.log.append(("reset_stats",))

    def build_variant_graphs(self, variant):
        self.log.append(("build", variant))


class LoopbackPeers:
    """Sends each call straight into ``replica``, logging it in the shared log."""

    def __init__(self, replica, log):
        self.replica, self.log, self.closed = replica, log, False

    def send(self, op, arg=0, payload=b""):
        self.log.append(("send", op))
        self.replica(op, arg, payload)

    def failed(self, error):
        pass

    def close(self):
        self.closed = True
        self.replica(control.CLOSE, 0, b"")


@pytest.fixture
def pair():
    log, replica_log = [], []
    replica = EngineReplica(StubEngine(replica_log))
    return MirroredEngine(StubEngine(log), LoopbackPeers(replica, log)), log, replica_log


def test_the_replica_replays_rank_0s_calls_in_order(pair):
    engine, log, replica_log = pair
    seq = engine.add_request([1, 2, 3], "params")
    engine.step()
    assert engine.abort(seq) and not engine.abort(seq)  # the second: finished everywhere, nothing sent
    engine.reset_prefix_cache()
    engine.reset_stats()
    engine.build_variant_graphs("processed")  # sent first, as a step is: capturing runs the collectives
    assert log == [("add", 0), ("send", mirror.ADD_REQUEST), ("send", mirror.STEP), ("step",), ("abort", 0),
                   ("send", mirror.ABORT), ("abort", 0), ("reset_prefix_cache",), ("send", mirror.RESET_PREFIX_CACHE),
                   ("reset_stats",), ("send", mirror.RESET_STATS), ("send", mirror.BUILD_VARIANT_GRAPHS),
                   ("build", "processed")]
    assert replica_log == [("add", 0), ("step",), ("abort", 0), ("reset_prefix_cache",), ("reset_stats",),
                           ("build", "processed")]
    engine.close()
    assert engine.peers.closed


def test_reads_reach_rank_0s_engine_and_only_step_log_may_be_set(pair):
    engine = pair[0]
    engine.step_log = []
    assert engine._engine.step_log == [] and engine.stats is engine._engine.stats
    with pytest.raises(AttributeError, match="stats of a mirrored engine is read-only"):
        engine.stats = {}
    with pytest.raises(AttributeError):
        engine.seqs  # noqa: B018 - not part of the surface


def test_a_replica_that_cannot_find_an_aborted_sequence_raises(pair):
    replica = pair[0].peers.replica
    with pytest.raises(KeyError):
        replica(mirror.ABORT, 7, b"")
