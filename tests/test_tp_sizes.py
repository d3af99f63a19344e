"""Tensor-parallel sizes other than 2, from ``LLM(...)`` on the CPU (gloo): four ranks on a model with 8 query heads and
2 KV heads (each KV head replicated on two ranks), and on a hybrid one split by its linear-attention heads, give
TP=1's and transformers' greedy float32 tokens; a size that does not divide the query heads (3) raises a
``ValueError`` naming both numbers, and an engine that fails to build on rank 0 alone stops its workers: either way
no worker process is left and rank 0 is a rank of one again."""
import time

import psutil
import pytest

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams, distributed
from nanovllm.engine.engine import Engine

pytestmark = pytest.mark.slow

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64, enforce_eager=True,
              device="cpu")
PROMPTS = [[5, 9, 13, 2, 7], [11, 3], list(range(20, 45))]
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # intermediate_size 192 splits over 3 ranks too, so that at TP=3 the query heads are what does not split
    return build_checkpoint(tmp_path_factory.mktemp("qwen3_8h"), "qwen3", num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=192)


def spawned_workers() -> list[int]:
    """This process's live children that multiprocessing spawned (not its resource tracker, not zombies)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def tokens(llm) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_four_ranks_replicate_kv_heads_and_match_one_rank(model):
    want = hf_greedy(model, PROMPTS, 5)
    assert tokens(LLM(model, **ENGINE)) == want  # TP=1, before this process joins a group
    llm = LLM(model, tensor_parallel_size=4, **ENGINE)
    try:
        attn = llm.engine.runner.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)  # 8 / 4 query heads; KV head 0 of 2 for rank 0
        assert len(llm.engine.peers.procs) == 3
        assert tokens(llm) == want
    finally:
        llm.close()
    assert spawned_workers() == [] and distributed.current() == distributed.TensorParallel(0, 1)


def test_a_size_that_does_not_divide_the_heads_is_refused_and_leaves_no_worker(model):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide num_attention_heads=8"):
        LLM(model, tensor_parallel_size=3, **ENGINE)
    assert spawned_workers() == []
    assert distributed.current() == distributed.TensorParallel(0, 1)


class FailsOnRankZero(Engine):
    def __init__(self, config):
        if distributed.current().rank == 0:
            raise RuntimeError("rank 0 cannot build its engine")
        super().__init__(config)


class FailsOnRankZeroLLM(LLM):
    engine_class = FailsOnRankZero


def test_an_engine_that_fails_on_rank_0_alone_stops_its_workers(model, monkeypatch):
    """The worker builds its engine and waits in a collective for rank 0, which never comes, so it would not hear
    a close message: ``LLM`` must end it at once, not wait out the group's timeout (60 s here, so that a
    regression fails this test instead of hanging it)."""
    monkeypatch.setenv("NANOVLLM_TP_TIMEOUT_S", "60")  # the worker inherits it
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 0 cannot build its engine"):
        FailsOnRankZeroLLM(model, tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - start < 45  # not the timeout
    assert spawned_workers() == []
    assert distributed.current() == distributed.TensorParallel(0, 1)


def test_four_ranks_split_a_hybrid_model_by_its_linear_attention_heads(tmp_path):
    """Qwen3-Next (Gated DeltaNet and full attention, MoE) with 4 key and 8 value heads in its linear layers: each
    of four ranks holds one key head and two value heads, a quarter of the state, and greedy float32 tokens are
    transformers'."""
    path = build_checkpoint(tmp_path, "qwen3_next", linear_num_key_heads=4, linear_num_value_heads=8)
    want = hf_greedy(path, PROMPTS, 5)
    llm = LLM(path, tensor_parallel_size=4, **ENGINE)
    try:
        linear = next(layer.linear_attn for layer in llm.engine.runner.model.model.layers
                      if hasattr(layer, "linear_attn"))
        assert (linear.la.num_k_heads, linear.la.num_v_heads) == (1, 2)
        assert tokens(llm) == want
    finally:
        llm.close()
    assert spawned_workers() == [] and distributed.current() == distributed.TensorParallel(0, 1)
