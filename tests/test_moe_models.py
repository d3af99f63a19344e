"""Mixture-of-experts models (Qwen3-MoE with a dense layer between sparse ones, Mixtral, Qwen2-MoE's shared expert):
greedy float32 tokens identical to transformers in eager and graph mode on mixed-length batches (Qwen2-MoE: one),
with prefix-cache hits and forced preemption; graph mode with no graph break and no recompile across batch sizes;
the eager fallback of a model that declares itself not capturable.

Both engines of an architecture get a small KV cache (16 blocks of 16 tokens for up to 7 sequences), so that
the preemption test must preempt; the other tests assert tokens, which preemption must not change.
"""
import logging
import random

import pytest
import torch

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.models import registry
from nanovllm.step import make_step

ENGINE = dict(max_num_seqs=7, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=128)
BUCKETS = [1, 2, 4]


def prompts_of(n, seed, max_len):
    rng = random.Random(seed)
    return [[rng.randint(3, 383) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def tokens(llm, prompts, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module", params=["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def engines(request, tmp_path_factory):
    """(checkpoint dir, eager LLM, graph LLM) of one architecture."""
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return path, LLM(path, enforce_eager=True, **ENGINE), LLM(path, graph_batch_sizes=BUCKETS, **ENGINE)


def test_graph_mode_is_the_default_and_dense_layers_sit_where_the_config_says(engines):
    _, eager, graph = engines
    assert (eager.engine.runner.mode, graph.engine.runner.mode) == ("eager", "graph")
    dense = graph.config.hf_config.get("mlp_only_layers", [])  # Qwen3-MoE's [1]; Mixtral has none
    kinds = [type(layer.mlp).__name__ for layer in graph.engine.runner.model.model.layers]
    assert kinds == ["MLP" if i in dense else "SparseMoe" for i in range(len(kinds))] and "SparseMoe" in kinds


def test_mixed_length_batch_matches_transformers_in_both_modes(engines):
    path, eager, graph = engines
    prompts = prompts_of(6, seed=0, max_len=40)
    want = hf_greedy(path, prompts, 10)
    assert tokens(eager, prompts, 10) == want
    with torch.compiler.set_stance("fail_on_recompile"):
        assert tokens(graph, prompts, 10) == want


def test_prefix_cache_hits_match_transformers_in_both_modes(engines):
    path, eager, graph = engines
    shared = prompts_of(1, seed=2, max_len=1)[0] + [7] * 47  # three full blocks of 16
    prompts = [shared + [11, 12, 13], shared + [21], shared]
    want = hf_greedy(path, prompts, 6)
    for llm in (eager, graph):
        hits = llm.engine.block_manager.cache_hit_tokens
        assert tokens(llm, prompts, 6) == tokens(llm, prompts, 6) == want
        assert llm.engine.block_manager.cache_hit_tokens - hits >= 48 + 48 + 32  # every full block, again


@pytest.mark.slow
def test_forced_preemption_matches_transformers_in_both_modes(engines):
    path, eager, graph = engines
    prompts = prompts_of(8, seed=3, max_len=40)
    want = hf_greedy(path, prompts, 32)
    for llm in (eager, graph):
        before = llm.engine.scheduler.num_preemptions
        assert tokens(llm, prompts, 32) == want
        assert llm.engine.scheduler.num_preemptions > before


@pytest.mark.slow
def test_every_batch_size_matches_eager_without_recompiling(engines):
    from torch._dynamo.utils import counters
    _, eager, graph = engines
    rng = random.Random(1)
    compiles = counters["stats"]["unique_graphs"]
    for n in range(1, BUCKETS[-1] + 4):  # every bucket, sizes between, and splits past the largest
        prompts = [[rng.randint(3, 383) for _ in range(rng.randint(1, 20))] for _ in range(n)]
        with torch.compiler.set_stance("fail_on_recompile"):
            got = tokens(graph, prompts, 5)
        assert got == tokens(eager, prompts, 5), f"batch of {n}"
    assert counters["stats"]["unique_graphs"] == compiles


def test_decode_and_prefill_steps_trace_with_zero_graph_breaks(engines):
    runner = engines[1].engine.runner
    seq = Sequence(0, [5, 6, 7], SamplingParams(), seed=0)
    seq.block_table = [0]
    for inputs in (runner.decode_builder.build([seq], 4), runner.prefill_builder.dummy()):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(make_step(runner.model, runner.kv_caches, runner.token_buffer))(inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.slow
def test_qwen2_moe_shared_expert_matches_transformers_in_both_modes(tmp_path):
    path = build_checkpoint(tmp_path, "qwen2_moe")
    prompts = prompts_of(5, seed=4, max_len=40)
    want = hf_greedy(path, prompts, 10)
    for eager in (True, False):
        llm = LLM(path, enforce_eager=eager, graph_batch_sizes=BUCKETS, **ENGINE)
        layers = llm.engine.runner.model.model.layers
        assert type(layers[0].mlp).__name__ == "MLP" and layers[1].mlp.shared_expert is not None
        assert llm.engine.describe()["mode"] == ("eager" if eager else "graph")
        assert tokens(llm, prompts, 10) == want


def test_qwen2_moe_follows_the_configs_qkv_bias(tmp_path):
    path = build_checkpoint(tmp_path, "qwen2_moe", qkv_bias=False)
    llm = LLM(path, enforce_eager=True, **ENGINE)
    assert llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.bias is None
    prompts = prompts_of(3, seed=6, max_len=30)
    assert tokens(llm, prompts, 6) == hf_greedy(path, prompts, 6)


def test_a_model_that_cannot_be_captured_runs_eagerly_and_says_why_once(tmp_path, monkeypatch, caplog):
    base = registry.MODEL_REGISTRY["MixtralForCausalLM"]

    class UncapturableMixtral(base):  # stands for a model with host-side expert fetches
        graph_capturable = False
        not_capturable_reason = "experts are fetched from host memory (test model)"

    monkeypatch.setitem(registry.MODEL_REGISTRY, "MixtralForCausalLM", UncapturableMixtral)
    path = build_checkpoint(tmp_path, "mixtral", seed=1)
    nanovllm_logger = logging.getLogger("nanovllm")
    nanovllm_logger.addHandler(caplog.handler)
    try:
        llm = LLM(path, **ENGINE)  # graph mode not turned off: the model turns it off
        prompts = prompts_of(3, seed=5, max_len=20)
        got = tokens(llm, prompts, 6)
    finally:
        nanovllm_logger.removeHandler(caplog.handler)
    assert llm.engine.runner.mode == "eager" and llm.engine.describe()["mode"] == "eager"
    reasons = [r.getMessage() for r in caplog.records if "runs eagerly" in r.getMessage()]
    assert reasons == ["the model runs eagerly: experts are fetched from host memory (test model)"]
    assert got == hf_greedy(path, prompts, 6)
