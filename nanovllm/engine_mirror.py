"""The engine's step-level calls mirrored across tensor-parallel ranks, for callers that step the engine
themselves (the server's ``EngineLoop``, ``benchmarks/profile_run.py``) rather than through ``LLM.generate``.

At N > 1, rank 0's ``llm.engine`` is a ``MirroredEngine``: ``add_request``, ``step``, ``abort``,
``reset_prefix_cache`` and ``reset_stats`` first send the call to the other ranks (through the peers of
``workers.py``), then run it on rank 0's engine.  Each other rank replays the calls on its own engine in the same
order (``EngineReplica``), so every rank's scheduler makes the same decisions and their steps' collectives line up,
exactly as for a mirrored ``generate``.  A sequence travels as its ``seq_id``: ranks number requests identically.
Everything else (``has_work``, ``updated_sequences``, ``scheduler``, ``stats``...) reads rank 0's engine, and
``step_log`` (which ``bench.py`` sets to a list) is rank 0's engine's, read and set.

Each mirrored call costs one broadcast on the control group before rank 0 runs it.
"""
from nanovllm.engine.engine import Engine
from nanovllm.engine.sequence import Sequence


class MirroredEngine:
    """Rank 0's ``Engine`` at N > 1 (see the module docstring); ``peers`` has ``call(name, *args)`` and
    ``failed(error)`` (``workers.Workers`` or ``workers.TorchrunPeers``)."""

    def __init__(self, engine: Engine, peers):
        self._engine, self._peers = engine, peers

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @property
    def step_log(self):
        return self._engine.step_log

    @step_log.setter
    def step_log(self, value) -> None:  # set on the engine that steps, not on this wrapper
        self._engine.step_log = value

    def add_request(self, prompt_token_ids, params, images=None) -> Sequence:
        self._peers.call("engine", "add_request", prompt_token_ids, params, images)
        return self._engine.add_request(prompt_token_ids, params, images)

    def step(self):
        self._peers.call("engine", "step")
        try:
            return self._engine.step()
        except BaseException as e:  # the other ranks ran this step's collectives: they are out of step now
            self._peers.failed(e)
            raise

    def abort(self, seq: Sequence) -> bool:
        self._peers.call("engine", "abort", seq.seq_id)
        return self._engine.abort(seq)

    def reset_prefix_cache(self) -> None:
        self._peers.call("engine", "reset_prefix_cache")
        self._engine.reset_prefix_cache()

    def reset_stats(self) -> None:
        self._peers.call("engine", "reset_stats")
        self._engine.reset_stats()


class EngineReplica:
    """Another rank's side: replays rank 0's mirrored calls on ``engine``, keeping the unfinished sequences it
    added by id so that an ``abort`` finds its own copy."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.live: dict[int, Sequence] = {}

    def __call__(self, method: str, *args) -> None:
        engine = self.engine
        if method == "add_request":
            seq = engine.add_request(*args)
            self.live[seq.seq_id] = seq
        elif method == "step":
            for seq in engine.step()[0]:
                self.live.pop(seq.seq_id, None)
        elif method == "abort":
            seq = self.live.pop(args[0], None)
            if seq is not None:
                engine.abort(seq)
        elif method in ("reset_prefix_cache", "reset_stats"):
            getattr(engine, method)()
        else:
            raise ValueError(f"not a mirrored engine call: {method!r}")
