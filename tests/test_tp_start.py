"""A tensor-parallel worker that dies before it joins the group (``nanovllm/parallel/launch.py``, the start-up
rendezvous in ``nanovllm/distributed/rendezvous.py``): ``LLM(..., tensor_parallel_size=2)`` raises ``RuntimeError``
naming rank 1 and its exit code within seconds, not after the group's timeout, leaves no worker process, and leaves
this process a rank of one, so a TP=2 LLM built next works.  The worker dies as it would for an ``engine_class``
defined where its spawned process cannot import it: the class lives in a module only this process has
(``sys.modules``), so it pickles here and fails to unpickle there.  Also the rendezvous's wait on its own: every rank announced, a rank
that never does (the timeout), a dead rank."""
import sys
import time
import types

import pytest
import torch.distributed as dist

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams, distributed
from nanovllm.distributed import rendezvous
from nanovllm.engine.engine import Engine
from test_tp_sizes import spawned_workers

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64, enforce_eager=True,
              device="cpu")
PROMPTS = [[5, 9, 13, 2, 7], [11, 3]]
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture
def ghost_class(monkeypatch):
    """An ``LLM`` subclass whose engine class lives in a module that exists in this process only."""
    module = types.ModuleType("nanovllm_test_ghost_module")
    module.GhostEngine = type("GhostEngine", (Engine,), {"__module__": module.__name__})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return type("GhostLLM", (LLM,), {"engine_class": module.GhostEngine})


def test_a_worker_that_dies_before_joining_raises_at_once_and_leaves_nothing(tmp_path, ghost_class):
    model = build_checkpoint(tmp_path / "qwen3", "qwen3")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"tensor-parallel worker\(s\) died: rank 1 \(exit code 1\)"):
        ghost_class(model, tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - start < 30  # the group's timeout is 600 s
    assert spawned_workers() == []
    assert distributed.current() == distributed.TensorParallel(0, 1) and not dist.is_initialized()

    want = [o["token_ids"] for o in LLM(model, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    try:
        assert [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
    finally:
        llm.close()
    assert spawned_workers() == [] and distributed.current() == distributed.TensorParallel(0, 1)


def test_the_wait_returns_once_every_rank_announced_and_raises_for_the_rest():
    store = rendezvous.host(3, 5.0)
    peer = rendezvous.connect(store.port, 3, 5.0)
    rendezvous.announce(peer, 1)
    rendezvous.announce(peer, 2)
    rendezvous.wait_for_ranks(store, [1, 2], lambda: [], 5.0)  # returns at once

    store = rendezvous.host(3, 5.0)
    rendezvous.announce(rendezvous.connect(store.port, 3, 5.0), 1)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) 2 did not start within 0.3 s"):
        rendezvous.wait_for_ranks(store, [1, 2], lambda: [], 0.3)
    assert 0.3 <= time.monotonic() - start < 5
    with pytest.raises(RuntimeError, match=r"died: rank 2 \(exit code -9\), rank 1 \(exit code 1\)"):
        rendezvous.wait_for_ranks(store, [1, 2], lambda: [(2, -9), (1, 1)], 5.0)
