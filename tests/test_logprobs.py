"""Logprobs come out of the step: graph mode builds the step's logprobs variant only when a batch asks for them,
then replays it per bucket without compiling again; its logprobs equal eager mode's and transformers'; a batch
mixing requests with and without logprobs (and different ``k``) reports each request's own, as when run alone.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import build_checkpoint, check_against_transformers
from nanovllm import LLM, SamplingParams
from nanovllm.compile.cache import key_of
from nanovllm.compile.variant_graphs import variant_key

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=48, max_model_len=128)
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [30, 31, 32]]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("logprobs"), "qwen3")


@pytest.fixture(scope="module")
def graph_llm(path, tmp_path_factory):
    """Graph mode (pipeline depth 3, the default), with a compile cache of its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOVLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("NANOVLLM_DISABLE_COMPILE_CACHE", raising=False)
        yield LLM(path, graph_batch_sizes=[1, 2, 4], **ENGINE)


@pytest.fixture(scope="module")
def eager_llm(path):
    return LLM(path, enforce_eager=True, pipeline_depth=1, **ENGINE)


def _count_runs(monkeypatch, graph) -> list:
    runs = []
    run = graph.run
    monkeypatch.setattr(graph, "run", lambda inputs: runs.append(1) or run(inputs))
    return runs


@pytest.mark.slow
def test_the_variant_is_built_when_first_asked_for_then_replayed_per_bucket(graph_llm, monkeypatch):
    ex = graph_llm.engine.runner.executor
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    graph_llm.generate(PROMPTS[:3], plain, use_tqdm=False)
    # no cost without logprobs
    assert ex.variant_graphs["logprobs"].compiled is None and ex.variant_graph_sizes("logprobs") == []

    with_lp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
    graph_llm.generate(PROMPTS[:1], with_lp, use_tqdm=False)
    assert ex.variant_graph_sizes("logprobs") == [2]  # bucket 1 is padded to 2 rows
    compiled = ex.variant_graphs["logprobs"].compiled
    # its own cache entry, next to the plain step's, which it leaves as it was
    assert ex.variant_graphs["logprobs"].cache.key == key_of(variant_key(ex.spec.cache_key, "logprobs")) != ex.cache.key
    assert ex.variant_graphs["logprobs"].cache.entry.parent == ex.cache.entry.parent
    assert (ex.variant_graphs["logprobs"].cache.entry / "manifest.json").is_file()

    # a batch of 3 (bucket 4), with and without logprobs: one variant replay per decode step, nothing compiled
    graphs_before = counters["stats"]["unique_graphs"]
    ex.variant_graphs["logprobs"].graph(4)
    plain_runs = _count_runs(monkeypatch, ex.graphs[4])
    variant_runs = _count_runs(monkeypatch, ex.variant_graphs["logprobs"].graphs[4])
    out = graph_llm.generate(PROMPTS[:3], [with_lp, plain, plain], use_tqdm=False)
    assert len(variant_runs) == 3 and plain_runs == []  # 4 tokens: one from the prefill, 3 decode steps
    assert counters["stats"]["unique_graphs"] == graphs_before and ex.variant_graphs["logprobs"].compiled is compiled
    assert ex.variant_graph_sizes("logprobs") == [2, 4] and ex.describe()["variant_graph_sizes"] == {"logprobs": [2, 4]}
    assert len(out[0]["logprobs"]) == 4 and "logprobs" not in out[1]

    graph_llm.generate(PROMPTS[:3], plain, use_tqdm=False)  # without logprobs: the plain graph again
    assert len(plain_runs) == 3 and len(variant_runs) == 3


def test_graph_logprobs_equal_eager_and_transformers(graph_llm, eager_llm, path):
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5),
              SamplingParams(temperature=1.0, top_k=8, seed=11, max_tokens=6, ignore_eos=True, logprobs=5),
              SamplingParams(temperature=0.8, seed=5, max_tokens=6, ignore_eos=True, logprobs=5)]
    graph = graph_llm.generate(PROMPTS[:3], params, use_tqdm=False)
    eager = eager_llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for prompt, g, e in zip(PROMPTS, graph, eager):
        assert g["token_ids"] == e["token_ids"]
        for a, b in zip(g["logprobs"], e["logprobs"], strict=True):
            assert list(a) == list(b)  # the same ids in the same order
            torch.testing.assert_close(torch.tensor(list(a.values())), torch.tensor(list(b.values())),
                                       rtol=0, atol=1e-5)
        check_against_transformers(path, prompt, g, 5)
    # the top-k (top_k=8) request drew outside the top token somewhere: its logprob is the drawn token's
    assert any(next(iter(entry.values())) < max(entry.values()) for entry in graph[1]["logprobs"])


def test_a_mixed_batch_reports_each_requests_own_logprobs(graph_llm, eager_llm, path):
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=7, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=20)]
    mixed = graph_llm.generate(PROMPTS, params, use_tqdm=False)
    assert "logprobs" not in mixed[0]
    for prompt, p, out in zip(PROMPTS[1:], params[1:], mixed[1:]):
        assert len(out["logprobs"]) == len(out["token_ids"]) == p.max_tokens
        for token, entry in zip(out["token_ids"], out["logprobs"]):
            assert next(iter(entry)) == token and len(entry) in (max(p.logprobs, 1), p.logprobs + 1)
        alone = eager_llm.generate([prompt], p, use_tqdm=False)[0]
        assert out["token_ids"] == alone["token_ids"] and [list(e) for e in out["logprobs"]] == \
            [list(e) for e in alone["logprobs"]]
        for a, b in zip(out["logprobs"], alone["logprobs"]):
            assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
    check_against_transformers(path, PROMPTS[3], mixed[3], 20)


def test_the_variant_key_differs_per_step_and_bucket():
    fields = {"model_config": {"a": 1}, "buckets": [1, 2]}
    keys = {key_of(fields), key_of(variant_key(fields, "logprobs")), key_of(variant_key(fields, "logprobs", bucket=2)),
            key_of(variant_key(fields, "logprobs", bucket=1))}
    assert len(keys) == 4
