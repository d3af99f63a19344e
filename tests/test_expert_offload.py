"""Expert offload (``models/expert_offload.py``): with 1, 2 or every expert resident per layer, tiny Qwen3-MoE and
Mixtral give the same greedy float32 tokens as without offload and as transformers; the cache's counters: with
every expert resident nothing is fetched after start-up, with one slot the misses fetch whole experts; an
offloaded model runs eagerly and says why.
"""
import pytest

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from test_moe_models import ENGINE, prompts_of, tokens


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def checkpoint(request, tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    prompts = prompts_of(4, seed=7, max_len=30)
    return path, prompts, hf_greedy(path, prompts, 8)


def _stats(llm):
    return llm.engine.describe()["expert_offload"]


@pytest.mark.parametrize("slots", [1, 2, None])
@pytest.mark.parametrize("prefetch", [True, False])
def test_offload_changes_no_token(checkpoint, slots, prefetch):
    path, prompts, want = checkpoint
    plain = LLM(path, enforce_eager=True, **ENGINE)
    llm = LLM(path, offload_experts=True, experts_on_device=slots, offload_prefetch=prefetch, **ENGINE)
    assert llm.engine.runner.mode == "eager"
    assert tokens(llm, prompts, 8) == tokens(plain, prompts, 8) == want
    stats = _stats(llm)
    if slots is None:
        assert stats["misses"] == stats["prefetched"] == stats["bytes_fetched"] == 0 and stats["hits"] > 0
    else:
        assert stats["misses"] + stats["prefetched"] > 0 and stats["bytes_fetched"] > 0


def test_counters_count_whole_experts(checkpoint):
    path, prompts, _ = checkpoint
    llm = LLM(path, offload_experts=True, experts_on_device=1, offload_prefetch=False, **ENGINE)
    caches = llm.engine.runner.expert_caches
    tokens(llm, prompts, 4)
    stats = _stats(llm)
    assert stats["prefetched"] == 0 and stats["misses"] > 0
    assert stats["bytes_fetched"] == sum(c.misses * c.expert_bytes for c in caches)
    layer = llm.engine.runner.model.model.layers[0].mlp
    w13 = layer.cache.host_w13
    assert stats["expert_cache_bytes"] * w13.shape[0] == stats["expert_host_bytes"]  # 1 slot of E, every layer


def test_bad_offload_options_name_the_value(checkpoint):
    path = checkpoint[0]
    with pytest.raises(ValueError, match="experts_on_device=2 needs offload_experts=True"):
        LLM(path, experts_on_device=2, **ENGINE)
    with pytest.raises(ValueError, match="experts_on_device=99"):
        LLM(path, offload_experts=True, experts_on_device=99, **ENGINE)
