"""Expert offload of FP8 experts (``quantization="fp8"``): on a tiny Qwen3-MoE, every expert resident, one slot
(evictions) and a host share that splits an expert all give the greedy tokens of the same FP8 model without offload;
the slots hold float8 weights and float32 scales, and each copy fetches the FP8 bytes plus the scale bytes.  A split
at an intermediate row inside a scale group gives exact partial sums, and the slots compute what the host stacks do.
"""
import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM
from nanovllm.kernels import weight_quant
from nanovllm.kernels.moe_reference import experts_reference
from nanovllm.models.expert_cache import ExpertCache, SplitScratch
from test_expert_offload import _stats, assert_copy_counters
from test_moe_models import ENGINE, prompts_of, tokens

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint dir, prompts, greedy tokens of the FP8 model without offload)."""
    path = build_checkpoint(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")
    prompts = prompts_of(4, seed=7, max_len=30)
    return path, prompts, tokens(LLM(path, quantization="fp8", enforce_eager=True, **ENGINE), prompts, 8)


def copied_bytes(cache, k):
    """Bytes of rows [0, k) of one FP8 expert (the whole expert at k = I), from the shapes: float8 weights, float32
    scales per row and group of columns (w13's rows cut H, w2's columns cut I)."""
    hidden, g = cache.host_w13.shape[2], cache.group
    return 3 * k * hidden + 4 * (2 * k * weight_quant.num_groups(hidden, g) + hidden * weight_quant.num_groups(k, g))


def offloaded(path, **options):
    return LLM(path, quantization="fp8", offload_experts=True, enforce_eager=True, **options, **ENGINE)


@pytest.mark.parametrize("slots", [None, 1])
def test_fp8_experts_offloaded_change_no_token(checkpoint, slots):
    path, prompts, want = checkpoint
    llm = offloaded(path, experts_on_device=slots)
    assert tokens(llm, prompts, 8) == want
    caches = llm.engine.runner.expert_caches
    for c in caches:
        assert c.w13.dtype == c.w2t.dtype == c.host_w13.dtype == c.host_w2t.dtype == torch.float8_e4m3fn
        assert c.w13_scale.dtype == c.w2t_scale.dtype == torch.float32
        assert c.group == max(c.inter, c.host_w13.shape[2])  # one scale per row
        assert c.expert_bytes == copied_bytes(c, c.inter) < 3 * c.inter * c.host_w13.shape[2] * 4 / 2  # fp32's half
    stats = _stats(llm)
    assert_copy_counters(stats, slots, caches[0].expert_bytes)


def test_fp8_experts_split_with_the_host_change_no_token(checkpoint):
    """Two slots, share 0.5: a step missing an odd number of experts splits one at row I/2 (inside the one scale
    group of the tiny model's I), the host computes the rest."""
    path, prompts, want = checkpoint
    llm = offloaded(path, experts_on_device=2, offload_host_share=0.5)
    assert tokens(llm, prompts, 8) == want
    stats, c = _stats(llm), llm.engine.runner.expert_caches[0]
    assert stats["splits"] > 0 and stats["host_computed"] > 0
    assert stats["split_scratch_bytes"] == c.expert_bytes and c.scratch.w13.dtype == torch.float8_e4m3fn
    half = c.inter // 2
    host_whole = stats["host_computed"] - stats["splits"] / 2
    device_whole = stats["misses"] - stats["splits"] - host_whole
    assert stats["bytes_fetched"] == device_whole * c.expert_bytes + stats["splits"] * copied_bytes(c, half)


def _fp8_experts(num_experts, inter, hidden, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13, s13 = weight_quant.quantize(torch.randn(num_experts, 2 * inter, hidden, generator=g) / 4, group)
    w2, s2 = weight_quant.quantize(torch.randn(num_experts, hidden, inter, generator=g) / 4, group)
    x = torch.randn(5, hidden, generator=g)
    ids = torch.tensor([[2, 1], [0, 2], [3, 1], [2, 3], [1, 0]])
    return x, torch.rand(5, 2, generator=g), ids, (w13, w2, s13, s2, group)


def test_a_split_fp8_expert_cut_inside_a_scale_group_is_the_sum_of_its_parts():
    inter, hidden, group = 48, 40, 16  # 3 groups of I; H's last group partial
    x, weights, ids, (w13, w2, s13, s2, g) = _fp8_experts(4, inter, hidden, group)
    cache = ExpertCache(w13, w2, CPU, slots=1, pin=False, scratch=SplitScratch(inter, hidden, w13.dtype, CPU, g),
                        w13_scale=s13, w2_scale=s2, group=g)
    want = experts_reference(x, torch.where(ids == 2, weights, torch.zeros_like(weights)), ids, w13, w2, s13, s2, g)
    for k in (8, 16, 20, 40):
        before = cache.bytes_fetched
        device = cache.run_split(x, weights, ids, 2, k, experts_reference)
        host = cache.compute_on_host(x, weights, ids, [], (2, k))
        assert torch.allclose(device + host, want, atol=1e-5, rtol=1e-5), k
        assert cache.bytes_fetched - before == copied_bytes(cache, k), k


def test_fp8_slots_compute_what_the_host_stacks_do():
    inter, hidden, group = 32, 24, 16
    x, weights, ids, (w13, w2, s13, s2, g) = _fp8_experts(4, inter, hidden, group, seed=1)
    cache = ExpertCache(w13, w2, CPU, slots=2, pin=False, w13_scale=s13, w2_scale=s2, group=g)
    cache.ensure([3, 1])
    resident = torch.isin(ids, torch.tensor([3, 1]))
    masked = torch.where(resident, weights, torch.zeros_like(weights))
    want = experts_reference(x, masked, ids, w13, w2, s13, s2, g)
    assert torch.equal(experts_reference(x, masked, cache.slot_map()[ids], *cache.slot_weights()), want)
    on_host = cache.compute_on_host(x, weights, ids, [3, 1], None)
    assert torch.allclose(on_host, want, atol=1e-5, rtol=1e-5)
