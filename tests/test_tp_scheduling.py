"""Tensor parallelism through the scheduler's harder paths, on two CPU ranks (gloo) in eager and graph mode: prompts
that hit the prefix cache and a KV cache so small that sequences are preempted give TP=1's and transformers'
greedy float32 tokens, and both ranks' counters (cache-hit tokens, preemptions) move alike, so each rank's
scheduler made the same decisions.  ``llm.engine.reset_prefix_cache()`` (what ``bench.py`` and
``benchmarks/profile_run.py`` call) empties the worker's cache too, and a ``step_log`` set on ``llm.engine`` (as
``bench.py`` does) records the steps ``generate`` runs.

Each rank's counters come from ``CountingEngine``, the ``engine_class`` every rank builds: it writes them to a file
at each ``reset_stats``, a call rank 0 mirrors like any other."""
import json
import os
import random
import time

import pytest

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams, distributed
from nanovllm.engine.engine import Engine

pytestmark = pytest.mark.slow

# 10 blocks of 16 tokens: the prefix workload fits at once (3 blocks a prompt), the preemption one cannot (4)
ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=10, max_model_len=64, device="cpu")
SHARED = [3] + [7] * 31  # two full blocks
PREFIX = [SHARED + [11, 12, 13], SHARED + [21], SHARED]  # the last is all cached prefix but its last block
PREFIX_HITS = 32 + 32 + 16  # a hit leaves at least the last token to compute
rng = random.Random(3)
PREEMPT = [[rng.randint(3, 383) for _ in range(rng.randint(10, 30))] for _ in range(4)]
PREEMPT_TOKENS = 24


COUNTERS_DIR = "NANOVLLM_TEST_COUNTERS_DIR"  # where CountingEngine writes (the spawned rank inherits it)


class CountingEngine(Engine):
    """At its n-th ``reset_stats`` writes its cache-hit tokens and preemptions to ``rank{r}-{n}.json``."""

    def __init__(self, config):
        self.resets = 0
        super().__init__(config)

    def reset_stats(self) -> None:
        super().reset_stats()
        path = os.path.join(os.environ[COUNTERS_DIR], f"rank{distributed.current().rank}-{self.resets}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"hits": self.block_manager.cache_hit_tokens, "preemptions": self.scheduler.num_preemptions}, f)
        os.replace(path + ".tmp", path)
        self.resets += 1


class CountingLLM(LLM):
    engine_class = CountingEngine


def both_ranks(llm) -> list[dict]:
    """[rank 0's counters, rank 1's] once every call sent before has run on both."""
    llm.engine.reset_stats()
    n = llm.engine._engine.resets - 1
    paths = [os.path.join(os.environ[COUNTERS_DIR], f"rank{r}-{n}.json") for r in (0, 1)]
    deadline = time.monotonic() + 60
    while not os.path.exists(paths[1]):
        assert time.monotonic() < deadline, "rank 1 did not write its counters"
        time.sleep(0.05)
    out = []
    for path in paths:
        with open(path) as f:
            out.append(json.load(f))
    return out


def tokens(llm, prompts, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoint and, per workload, transformers' tokens, asserted equal to TP=1's, and TP=1's preemptions
    (built before any TP LLM: this process can be in one group at a time)."""
    path = build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")
    one = LLM(path, enforce_eager=True, **ENGINE)
    want = {"prefix": hf_greedy(path, PREFIX, 6), "preempt": hf_greedy(path, PREEMPT, PREEMPT_TOKENS)}
    assert tokens(one, PREFIX, 6) == want["prefix"]
    assert tokens(one, PREEMPT, PREEMPT_TOKENS) == want["preempt"]
    assert one.engine.scheduler.num_preemptions > 0
    return path, want, one.engine.scheduler.num_preemptions


@pytest.fixture(scope="module", params=["eager", "graph"])
def tp(request, reference, tmp_path_factory):
    graph = dict(graph_batch_sizes=[1, 2, 4]) if request.param == "graph" else dict(enforce_eager=True)
    with pytest.MonkeyPatch.context() as m:
        m.setenv(COUNTERS_DIR, str(tmp_path_factory.mktemp("counters")))
        with CountingLLM(reference[0], tensor_parallel_size=2, **graph, **ENGINE) as llm:
            assert llm.engine.runner.mode == request.param
            yield llm


def test_prefix_hits_match_one_rank_and_the_reset_reaches_every_rank(tp, reference):
    want = reference[1]["prefix"]
    tp.engine.reset_prefix_cache()
    start = both_ranks(tp)
    assert tokens(tp, PREFIX, 6) == want  # the second waits a step for the first's 32 tokens (shared_prefix.py)
    cold = both_ranks(tp)
    assert [c["hits"] - s["hits"] for c, s in zip(cold, start)] == [32, 32]
    assert tokens(tp, PREFIX, 6) == want  # now every full block hits
    hit = both_ranks(tp)
    assert [h["hits"] - c["hits"] for h, c in zip(hit, cold)] == [PREFIX_HITS, PREFIX_HITS]
    tp.engine.reset_prefix_cache()  # mirrored: a worker that kept its cache would hit alone, out of step
    assert tokens(tp, PREFIX, 6) == want
    assert [a["hits"] - h["hits"] for a, h in zip(both_ranks(tp), hit)] == [32, 32]  # as cold as the first run


def test_preemption_matches_one_rank(tp, reference):
    before = both_ranks(tp)
    assert tokens(tp, PREEMPT, PREEMPT_TOKENS) == reference[1]["preempt"]
    after = both_ranks(tp)
    preempted = [a["preemptions"] - b["preemptions"] for a, b in zip(after, before)]
    assert preempted == [reference[2], reference[2]]  # both ranks preempted as often as TP=1 did


def test_a_step_log_set_on_the_mirrored_engine_records_generate(tp):
    tp.engine.step_log = []
    try:
        tokens(tp, PREFIX[:2], 3)
        log = tp.engine.step_log
        assert log is tp.engine._engine.step_log and {r.kind for r in log} == {"prefill", "decode"}
    finally:
        tp.engine.step_log = None
    assert tp.engine._engine.step_log is None
