"""Expert offload (``models/expert_offload.py``): with 1, 2 or every expert resident per layer, tiny Qwen3-MoE and
Mixtral give the same greedy float32 tokens as without offload and as transformers; the cache's counters: with
every expert resident nothing is fetched after start-up, with one slot the misses fetch whole experts; with a
host share, the host computes that share of the misses and the tokens stay the same; an offloaded model runs
eagerly and says why.
"""
import pytest

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM
from test_moe_models import ENGINE, prompts_of, tokens


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def checkpoint(request, tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    prompts = prompts_of(4, seed=7, max_len=30)
    return path, prompts, hf_greedy(path, prompts, 8)


def _stats(llm):
    return llm.engine.describe()["expert_offload"]


def assert_copy_counters(stats: dict, slots: int | None, expert_bytes: int) -> None:
    """Every expert resident (``slots`` None): no miss, nothing copied; fewer slots: each miss copied one expert."""
    if slots is None:
        assert stats["misses"] == stats["bytes_fetched"] == 0 and stats["hits"] > 0
    else:
        assert stats["misses"] > 0 and stats["bytes_fetched"] == stats["misses"] * expert_bytes


@pytest.mark.parametrize("slots", [1, 2, None])
def test_offload_changes_no_token(checkpoint, slots):
    path, prompts, want = checkpoint
    plain = LLM(path, enforce_eager=True, **ENGINE)
    llm = LLM(path, offload_experts=True, experts_on_device=slots, **ENGINE)
    assert llm.engine.runner.mode == "eager"
    assert tokens(llm, prompts, 8) == tokens(plain, prompts, 8) == want
    stats = _stats(llm)
    if slots is None:
        assert stats["misses"] == stats["bytes_fetched"] == 0 and stats["hits"] > 0
    else:
        assert stats["misses"] > 0 and stats["bytes_fetched"] > 0


def test_counters_count_whole_experts(checkpoint):
    path, prompts, _ = checkpoint
    llm = LLM(path, offload_experts=True, experts_on_device=1, **ENGINE)
    caches = llm.engine.runner.expert_caches
    tokens(llm, prompts, 4)
    stats = _stats(llm)
    assert stats["misses"] > 0
    assert stats["bytes_fetched"] == sum(c.misses * c.expert_bytes for c in caches)
    layer = llm.engine.runner.model.model.layers[0].mlp
    w13 = layer.cache.host_w13
    assert stats["expert_cache_bytes"] * w13.shape[0] == stats["expert_host_bytes"]  # 1 slot of E, every layer


def test_the_host_computes_no_expert_by_default_off_cuda(checkpoint):
    path, prompts, want = checkpoint
    llm = LLM(path, offload_experts=True, experts_on_device=1, **ENGINE)  # offload_host_share=None: 0 on the CPU
    assert tokens(llm, prompts, 8) == want
    assert all(c.host_share == 0 for c in llm.engine.runner.expert_caches)
    stats = _stats(llm)
    assert stats["misses"] > 0 and stats["host_computed"] == 0
    assert stats["split_scratch_bytes"] == 0  # no host share, no scratch on the device


@pytest.mark.parametrize("share", [0.5, 1.0])
@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.slow
def test_experts_computed_on_the_host_change_no_token(checkpoint, share, slots):
    path, prompts, want = checkpoint
    copying = LLM(path, offload_experts=True, experts_on_device=slots, **ENGINE)
    llm = LLM(path, offload_experts=True, experts_on_device=slots, offload_host_share=share, **ENGINE)
    assert tokens(llm, prompts, 8) == tokens(copying, prompts, 8) == want
    stats, copied = _stats(llm), _stats(copying)
    assert stats["host_computed"] > 0 and copied["host_computed"] == 0
    assert stats["host_seconds"] > 0 and copied["host_seconds"] == copied["join_seconds"] == 0
    caches = llm.engine.runner.expert_caches
    # a split expert's device rows are fetched, the rest computed on the host: the two add up to the misses
    assert stats["bytes_fetched"] == pytest.approx((stats["misses"] - stats["host_computed"]) * caches[0].expert_bytes)
    if share == 1.0:  # every miss computed on the host: nothing copied after start-up
        assert stats["bytes_fetched"] == 0 and stats["misses"] == stats["host_computed"]
    else:
        assert 0 < stats["bytes_fetched"] < copied["bytes_fetched"]


@pytest.mark.parametrize("share", [0.25, 0.5, 0.6])
@pytest.mark.slow
def test_a_split_expert_changes_no_token(checkpoint, share):
    """One slot and top-2: most layers miss one or two experts, so the share splits an expert along its
    intermediate rows in most steps; the tokens stay the transformers ones."""
    path, prompts, want = checkpoint
    llm = LLM(path, offload_experts=True, experts_on_device=1, offload_host_share=share, **ENGINE)
    assert tokens(llm, prompts, 8) == want
    stats = _stats(llm)
    assert stats["splits"] > 0 and 0 < stats["bytes_fetched"]
    assert stats["split_scratch_bytes"] == llm.engine.runner.expert_caches[0].expert_bytes


def test_the_plan_splits_the_boundary_expert_at_the_share():
    import torch

    from nanovllm.models.expert_cache import ExpertCache, SplitScratch
    inter, hidden = 64, 8
    cache = ExpertCache(torch.randn(6, 2 * inter, hidden), torch.randn(6, hidden, inter), torch.device("cpu"),
                        slots=2, pin=False, scratch=SplitScratch(inter, hidden, torch.float32, torch.device("cpu")))
    cache.ensure([0, 1])
    cases = {  # share: needed [0, 2, 3, 4] (0 resident, 3 missing) -> (device whole, split, host whole)
        0.0: ([0, 2, 3, 4], None, []),
        1.0: ([0], None, [2, 3, 4]),
        0.5: ([0, 2], (3, 32), [4]),  # 1.5 experts each: expert 3 split at row 32 of 64
        0.25: ([0, 2, 3], (4, 16), []),  # device 2.25
        0.33: ([0, 2, 3], None, [4]),  # device 2.01: 0.64 rows round to 0, so expert 4 goes whole to the host
        0.01: ([0, 2, 3, 4], None, []),  # device 2.97: 62.08 rows round to 64, so expert 4 stays whole on the device
    }
    for share, want in cases.items():
        cache.host_share = share
        assert cache.plan([0, 2, 3, 4]) == want, share
    cache.scratch = None  # without a scratch the boundary expert goes whole to the host
    cache.host_share = 0.5
    assert cache.plan([0, 2, 3, 4]) == ([0, 2], None, [3, 4])


def test_a_split_expert_is_the_sum_of_its_device_and_host_rows():
    import torch

    from nanovllm.kernels.moe_reference import experts_reference
    from nanovllm.models.expert_cache import ExpertCache, SplitScratch
    g = torch.Generator().manual_seed(0)
    inter, hidden, tokens_ = 48, 16, 5
    w13, w2 = torch.randn(4, 2 * inter, hidden, generator=g), torch.randn(4, hidden, inter, generator=g)
    cache = ExpertCache(w13, w2, torch.device("cpu"), slots=1, pin=False,
                        scratch=SplitScratch(inter, hidden, torch.float32, torch.device("cpu")))
    x = torch.randn(tokens_, hidden, generator=g)
    ids = torch.tensor([[2, 1], [0, 2], [3, 1], [2, 3], [1, 0]])
    weights = torch.rand(tokens_, 2, generator=g)
    want = experts_reference(x, torch.where(ids == 2, weights, torch.zeros_like(weights)), ids, w13, w2)
    for k in (16, 32):
        device = cache.run_split(x, weights, ids, 2, k, experts_reference)
        host = cache.compute_on_host(x, weights, ids, [], (2, k))
        assert torch.allclose(device + host, want, atol=1e-4, rtol=1e-4), k


def test_bad_offload_options_name_the_value(checkpoint):
    path = checkpoint[0]
    with pytest.raises(ValueError, match="offload_host_share=0.5 needs offload_experts=True"):
        LLM(path, offload_host_share=0.5, **ENGINE)
    with pytest.raises(ValueError, match="offload_host_share must be a number in \\[0, 1\\], got 1.5"):
        LLM(path, offload_experts=True, offload_host_share=1.5, **ENGINE)
    with pytest.raises(ValueError, match="experts_on_device=2 needs offload_experts=True"):
        LLM(path, experts_on_device=2, **ENGINE)
    with pytest.raises(ValueError, match="experts_on_device=99"):
        LLM(path, offload_experts=True, experts_on_device=99, **ENGINE)


@pytest.mark.slow
def test_offload_bench_runs_at_tiny_size(checkpoint, tmp_path):
    import json
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import offload_bench
    rows = {}
    for share in (0, 1):
        out = tmp_path / f"share{share}"
        result = offload_bench.main(["--model", checkpoint[0], "--load-format", "safetensors", "--device", "cpu",
                                     "--dtype", "float32", "--batch-sizes", "1,2", "--max-tokens", "4",
                                     "--prompt-len", "6", "--host-share", str(share), "--out", str(out)])
        rows[share] = json.load(open(out / "offload_bench.json"))["rows"]
        assert [r["batch"] for r in rows[share]] == [1, 2]
        assert all(r["decode_tokens"] == 3 * r["batch"] and 0 <= r["hit_rate"] <= 1 for r in rows[share])
        assert result["expert_offload"]["expert_cache_bytes"] > 0
        assert "| batch |" in (out / "offload_bench.md").read_text()
    copying, on_host = rows[0], rows[1]
    assert all(r["bytes_fetched_per_step"] > 0 and r["pct_of_floor"] > 0 for r in copying)  # 1 slot for top-2
    # copying every miss, the missed bytes are the fetched ones, and the host's link only lowers the floor
    assert all(0 < r["two_link_floor_ms"] < r["floor_step_ms"] for r in copying)
    assert all(r["missed_bytes_per_step"] == r["bytes_fetched_per_step"] and r["splits_per_step"] == 0
               for r in copying)
    assert all(r["host_ms_per_step"] == r["join_ms_per_step"] == 0 for r in copying)  # no host compute, no join
    assert all(r["bytes_fetched_per_step"] == 0 and r["host_computed_per_step"] > 0 for r in on_host)


@pytest.mark.parametrize("num_tokens", [3, 200])  # one routing chunk, several
def test_slot_experts_in_triton_match_the_twin(num_tokens):
    import torch
    from nanovllm.kernels.moe_reference import experts_reference, route_reference
    from nanovllm.kernels.triton_moe import moe_experts_triton
    g = torch.Generator().manual_seed(0)
    slots, hidden, inter = 3, 32, 16
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(slots, 2 * inter, hidden, generator=g) / 8
    w2 = torch.randn(slots, hidden, inter, generator=g) / 8
    weights, ids = route_reference(torch.randn(num_tokens, slots, generator=g), 2, True)
    weights = torch.where(ids == 2, torch.zeros_like(weights), weights)  # a masked-out round
    want = experts_reference(x, weights, ids, w13, w2)
    got = moe_experts_triton(x, weights, ids, w13, w2)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    w2_view = w2.transpose(1, 2).contiguous().transpose(1, 2)  # an expert cache's layout: [S, I, H] memory
    assert w2_view.stride(2) != 1
    assert torch.allclose(moe_experts_triton(x, weights, ids, w13, w2_view), want, atol=1e-4, rtol=1e-4)



def test_start_up_line_says_what_each_part_takes(checkpoint, caplog):
    import logging
    log = logging.getLogger("nanovllm")
    log.addHandler(caplog.handler)
    try:
        LLM(checkpoint[0], offload_experts=True, experts_on_device=1, **ENGINE)
    finally:
        log.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("expert offload:")]
    assert len(lines) == 1 and "non-expert weights" in lines[0] and "expert cache" in lines[0]
    assert "KV cache" in lines[0] and "in host memory" in lines[0]
    reasons = [r.getMessage() for r in caplog.records if "runs eagerly" in r.getMessage()]
    assert reasons == ["the model runs eagerly: experts are offloaded to host memory (offload_experts=True): "
                       "routing decides the copies"]


def test_a_step_needing_more_experts_than_slots_uses_the_resident_ones_before_copying():
    import torch

    from nanovllm.models.expert_cache import ExpertCache
    cache = ExpertCache(torch.randn(4, 6, 3), torch.randn(4, 3, 3), torch.device("cpu"), slots=1, pin=False)
    cache.ensure([3])  # expert 3 resident, as after a step whose last round was expert 3
    cache.hits = cache.misses = 0
    order, split, on_host = cache.plan([0, 1, 2, 3])  # host share 0: all on the device
    assert order == [3, 0, 1, 2] and split is None and on_host == []
    for e in order:  # the rounds of one slot
        cache.ensure([e])
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.plan([0, 1])[0] == [0, 1] and cache.plan([1, 2, 0])[0] == [2, 1, 0]
