"""The engine's calls mirrored across tensor-parallel ranks.

At N > 1, rank 0 steps a ``MirroredEngine``.  Its mutating calls (``MIRRORED``) each send one control message
(``control.send``) and run on rank 0's engine; every other rank replays them on its own engine in the same order
(``serve``), so all schedulers decide alike and the steps' collectives line up without any step's inputs
travelling.  ``step`` is sent before rank 0 runs it (its collectives need every rank); the others run on rank 0
first and travel only once they succeeded there, so an error on rank 0 leaves the ranks in step.  A sequence
travels as its ``seq_id`` (ranks number requests alike); ``add_request``'s arguments travel pickled, ``step`` as
a bare header.  Reads (``READ_ONLY``) see rank 0's engine; ``step_log`` may also be set.  Nothing else of
``Engine`` is reachable, so a new mutating method cannot bypass the mirror.

A replaying rank treats any exception as a bug: it propagates (``launch.py`` logs it and ends the process).
"""
import pickle
import weakref

from nanovllm.distributed import liveness
from nanovllm.engine.engine import Engine
from nanovllm.engine.sequence import Sequence
from nanovllm.parallel import control

STEP, ADD_REQUEST, ABORT, RESET_PREFIX_CACHE, RESET_STATS, BUILD_VARIANT_GRAPHS, REMOVE_LORA, ADD_LORA = range(8)


class _Read:
    """A read of the wrapped engine's attribute of the same name (``writable``: also set there)."""

    def __init__(self, writable: bool = False):
        self.writable = writable

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, mirror, owner=None):
        return self if mirror is None else getattr(mirror._engine, self.name)

    def __set__(self, mirror, value):
        if not self.writable:
            raise AttributeError(f"{self.name} of a mirrored engine is read-only")
        setattr(mirror._engine, self.name, value)


class MirroredEngine:
    """Rank 0's ``engine`` at N > 1 (see the module docstring); ``peers`` is ``control.SpawnedPeers`` or
    ``control.TorchrunPeers``."""
    MIRRORED = ("add_request", "step", "abort", "reset_prefix_cache", "reset_stats", "build_variant_graphs", "add_lora",
                "remove_lora", "close")
    READ_ONLY = ("config", "platform", "runner", "block_manager", "scheduler", "pipeline", "stats", "step_log",
                 "describe", "has_work")

    config = _Read()
    platform = _Read()
    runner = _Read()
    block_manager = _Read()
    scheduler = _Read()
    pipeline = _Read()
    stats = _Read()
    step_log = _Read(writable=True)
    describe = _Read()
    has_work = _Read()

    def __init__(self, engine: Engine, peers):
        self._engine, self.peers = engine, peers
        attach = getattr(peers, "attach", None)
        if attach is not None:  # closing the peers alone (their exit hook) releases this engine first too
            attach(engine)

    def add_request(self, prompt_token_ids, params, images=None, lora_request=None) -> Sequence:
        seq = self._engine.add_request(prompt_token_ids, params, images, lora_request)
        self.peers.send(ADD_REQUEST, payload=pickle.dumps((prompt_token_ids, params, images, lora_request),
                                                          protocol=pickle.HIGHEST_PROTOCOL))
        return seq

    def step(self):
        self.peers.send(STEP)
        try:
            return self._engine.step()
        except BaseException as e:  # the other ranks ran this step's collectives: they are out of step now
            self.peers.failed(e)
            raise

    def abort(self, seq: Sequence) -> bool:
        if not self._engine.abort(seq):
            return False  # finished on every rank alike: nothing to tell them
        self.peers.send(ABORT, seq.seq_id)
        return True

    def reset_prefix_cache(self) -> None:
        self._engine.reset_prefix_cache()
        self.peers.send(RESET_PREFIX_CACHE)

    def reset_stats(self) -> None:
        self._engine.reset_stats()
        self.peers.send(RESET_STATS)

    def add_lora(self, lora_request) -> None:
        self._engine.add_lora(lora_request)
        self.peers.send(ADD_LORA, payload=pickle.dumps(lora_request, protocol=pickle.HIGHEST_PROTOCOL))

    def remove_lora(self, lora_int_id: int) -> None:
        self._engine.remove_lora(lora_int_id)
        self.peers.send(REMOVE_LORA, lora_int_id)

    def build_variant_graphs(self, variant: str) -> None:
        """Sent first, as ``step`` is: capturing the graphs runs the step's collectives on every rank."""
        self.peers.send(BUILD_VARIANT_GRAPHS, payload=variant.encode())
        try:
            self._engine.build_variant_graphs(variant)
        except BaseException as e:
            self.peers.failed(e)
            raise

    def close(self) -> None:
        """Close rank 0's engine, then the other ranks (each closes its engine and ends its process) and the group.
        In this order because NCCL's abort waits while CUDA graphs that captured the group's collectives are alive
        (until ``control.ABORT_BOUND_S`` gives the group up); with the graphs released first it returns at once.
        Peers that hold the engine (``attach``) do both, in this order, in their own ``close``."""
        try:
            close = getattr(self._engine, "close", None)
            if close is not None and getattr(self.peers, "attach", None) is None:
                close()
        finally:
            self.peers.close()


class EngineReplica:
    """Another rank's side: replays rank 0's calls on ``engine``, finding an aborted sequence by id among those it
    added that are still alive."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.live: weakref.WeakValueDictionary[int, Sequence] = weakref.WeakValueDictionary()

    def __call__(self, op: int, arg: int, payload: bytes) -> bool:
        """Run one call; False once it was ``control.CLOSE`` (the engine is closed then)."""
        engine = self.engine
        if op == STEP:
            engine.step()
        elif op == ADD_REQUEST:
            seq = engine.add_request(*pickle.loads(payload))
            self.live[seq.seq_id] = seq
        elif op == ABORT:
            if not engine.abort(self.live[arg]):
                raise RuntimeError(f"sequence {arg} had finished here but not on rank 0: the ranks are out of step")
        elif op == RESET_PREFIX_CACHE:
            engine.reset_prefix_cache()
        elif op == RESET_STATS:
            engine.reset_stats()
        elif op == BUILD_VARIANT_GRAPHS:
            engine.build_variant_graphs(payload.decode())
        elif op == REMOVE_LORA:
            engine.remove_lora(arg)
        elif op == ADD_LORA:
            engine.add_lora(pickle.loads(payload))
        elif op == control.CLOSE:
            close = getattr(engine, "close", None)
            if close is not None:
                close()
            return False
        else:
            raise ValueError(f"not a mirrored engine call: {op}")
        return True


_DOING = {STEP: "running step", ADD_REQUEST: "adding request", ABORT: "aborting sequence",
          RESET_PREFIX_CACHE: "resetting the prefix cache", RESET_STATS: "resetting stats",
          BUILD_VARIANT_GRAPHS: "building variant graphs", REMOVE_LORA: "removing a LoRA adapter",
          ADD_LORA: "adding a LoRA adapter",
          control.CLOSE: "closing"}


def serve(engine: Engine) -> None:
    """Replay rank 0's calls on ``engine`` until rank 0 closes it, saying which call it runs (its liveness beat,
    ``distributed/liveness.py``)."""
    replica = EngineReplica(engine)
    calls = 0
    while True:
        liveness.doing(f"waiting for rank 0's call {calls + 1}")
        op, arg, payload = control.receive()
        calls += 1
        if op == control.CLOSE:
            liveness.stop(closing=True)  # rank 0 may end before this rank has left the group
        liveness.doing(f"{_DOING.get(op, 'running op ' + str(op))} (call {calls})")
        if not replica(op, arg, payload):
            return
