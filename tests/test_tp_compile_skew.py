"""Ranks whose compiles end far apart still start (``liveness.meet`` in ``nanovllm/compile/saved_step.py``): on two
CPU ranks (gloo) in graph mode, from a cold compile cache, rank 1 compiles its step ``DELAY_S`` later than rank 0,
longer than a collective may wait (``NANOVLLM_TP_TIMEOUT_S``); the engine still starts, generates and closes, leaving
no worker.  Before, rank 0 ran the compiled step's first collective while rank 1 was still compiling, and gloo's
timeout failed the start (seen in CI on an overloaded two-core machine).  Every other way to obtain the step (loaded,
traced) meets the same way: ``test_saved_step.py``."""
import functools
import os
import time
from pathlib import Path

import pytest

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams, distributed
from nanovllm.compile import saved_step
from nanovllm.distributed import liveness, rendezvous
from nanovllm.engine.engine import Engine
from test_tp_sizes import spawned_workers

TIMEOUT_S = 10  # 10x the longest gap between two beats measured on a two-core machine (1.0 s, docs/PERFORMANCE.md)
DELAY_S = 2.5 * TIMEOUT_S  # how much later rank 1 compiles
MARKER = "NANOVLLM_TEST_LATE_COMPILE"  # the file the late rank writes (the spawned rank inherits the variable)
ENGINE = dict(max_num_seqs=2, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64,
              graph_batch_sizes=[1, 2], device="cpu")


def _late(original, *args, **kwargs):
    Path(os.environ[MARKER]).write_text(original.__name__)
    time.sleep(DELAY_S)
    return original(*args, **kwargs)


class CompilesLateOnRankOne(Engine):
    """Rank 1 sleeps ``DELAY_S`` before it compiles its step or loads it from the compile cache."""

    def __init__(self, config):
        if distributed.current().rank == 1:
            for name in ("aot_compile", "load"):
                setattr(saved_step, name, functools.partial(_late, getattr(saved_step, name)))
        super().__init__(config)


class CompilesLateOnRankOneLLM(LLM):
    engine_class = CompilesLateOnRankOne


def test_ranks_whose_compiles_end_further_apart_than_a_collective_waits_still_start(tmp_path, monkeypatch):
    model = build_checkpoint(tmp_path / "qwen3", "qwen3")
    monkeypatch.setenv("NANOVLLM_TP_TIMEOUT_S", str(TIMEOUT_S))
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path / "cache"))  # a cold start on every run
    monkeypatch.setenv(MARKER, str(tmp_path / "late"))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with CompilesLateOnRankOneLLM(model, tensor_parallel_size=2, **ENGINE) as llm:
        assert llm.engine.describe()["mode"] == "graph"
        outputs = llm.generate([[5, 9, 33, 100], [3, 4]], params, use_tqdm=False)
    late = tmp_path / "late"
    assert late.exists() and late.read_text() == "aot_compile", "rank 1 compiled without the delay"
    assert [len(o["token_ids"]) for o in outputs] == [6, 6]
    assert spawned_workers() == [] and distributed.current() == distributed.TensorParallel(0, 1)


class _Watch:  # what ``meet`` reads of a liveness watch
    def __init__(self, size):
        self.size, self.rank, self.activity = size, 0, ""


def test_meet_clears_its_keys_raises_once_a_peer_failed_and_is_a_no_op_at_one_rank(monkeypatch):
    store = rendezvous.host(1, 5.0)
    monkeypatch.setattr(liveness, "group_store", lambda: store)
    monkeypatch.setattr(liveness, "_meetings", 0)
    monkeypatch.setattr(liveness, "_failure", None)
    monkeypatch.setattr(liveness, "_watch", None)
    liveness.meet("compiling")  # no watch: returns at once, counts nothing
    assert liveness._meetings == 0
    monkeypatch.setattr(liveness, "_watch", _Watch(1))
    liveness.meet("compiling")
    assert liveness._meetings == 1 and not store.check(["nanovllm/meet/1/arrived", "nanovllm/meet/1/left"])
    monkeypatch.setattr(liveness, "_watch", _Watch(2))  # the peer never comes, and rank 0's watch finds it dead
    monkeypatch.setattr(liveness, "_failure", "tensor-parallel worker(s) died: rank 1 (exit code -9)")
    with pytest.raises(liveness.PeerFailed, match="rank 1 \\(exit code -9\\)"):
        liveness.meet("running the compiled step")
    assert liveness._watch.activity == "running the compiled step"
