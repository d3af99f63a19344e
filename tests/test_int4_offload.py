"""Expert offload of int4 experts (GPTQ, AWQ): on a tiny Qwen3-MoE GPTQ and a tiny Mixtral AWQ checkpoint (Mixtral's
I = 48 gives w2 a partial last group of 32), every expert resident, one slot (evictions) and a host share that splits
an expert all give the greedy tokens of the same int4 model without offload; the slots hold uint8 codes, float16
scales and uint8 zeros, and each copy fetches the code, scale and zero bytes.  A split at an even row inside a group
gives exact partial sums, and the slots compute what the host stacks do.
"""
import pytest
import torch

from nanovllm import LLM
from nanovllm.kernels import int4_quant
from nanovllm.quant import held
from nanovllm.kernels.moe_reference import experts_reference
from nanovllm.models.expert_cache import ExpertCache, SplitScratch
from test_expert_offload import _stats, assert_copy_counters
from test_int4_models import moe_checkpoint
from test_moe_models import ENGINE, prompts_of, tokens

CPU = torch.device("cpu")
CHECKPOINTS = {"qwen3_moe-gptq": ("qwen3_moe", "gptq"), "mixtral-awq": ("mixtral", "awq")}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    """(checkpoint dir, prompts, greedy tokens of the int4 model without offload)."""
    path = moe_checkpoint(tmp_path_factory.mktemp(request.param), *CHECKPOINTS[request.param], group=32)
    prompts = prompts_of(4, seed=7, max_len=30)
    plain = LLM(path, enforce_eager=True, **ENGINE)
    assert held.format_of(plain.engine.runner.model.model.layers[0].mlp.experts) is held.INT4
    return path, prompts, tokens(plain, prompts, 8)


def copied_bytes(cache, k):
    """Bytes of rows [0, k) of one int4 expert (the whole expert at k = I), from the shapes: two codes per byte,
    a float16 scale and a uint8 zero per row and group of columns (w13's rows cut H, w2's columns cut I)."""
    hidden, g = cache.host_w2t.shape[2], cache.group
    codes = 2 * k * hidden // 2 + hidden * k // 2
    return codes + 3 * (2 * k * int4_quant.num_groups(hidden, g) + hidden * int4_quant.num_groups(k, g))


def offloaded(path, **options):
    return LLM(path, offload_experts=True, enforce_eager=True, **options, **ENGINE)


def _assert_int4_slots(cache):
    inter, hidden, slots = cache.inter, cache.host_w2t.shape[2], cache.num_slots
    assert cache.int4 and cache.group == 32
    assert cache.w13.shape == (slots, 2 * inter, hidden // 2) and cache.w2t.shape == (slots, inter // 2, hidden)
    assert cache.slot_w2.shape == (slots, hidden, inter // 2)  # w2's packed layout, as a transposed view
    for t in (cache.w13, cache.w2t, cache.host_w13, cache.host_w2t, cache.w13_zero, cache.w2t_zero):
        assert t.dtype == torch.uint8
    assert cache.w13_scale.dtype == cache.w2t_scale.dtype == torch.float16
    assert cache.w13_scale.shape == cache.w13_zero.shape == (slots, 2 * inter, int4_quant.num_groups(hidden, 32))
    assert cache.w2t_scale.shape == cache.w2t_zero.shape == (slots, int4_quant.num_groups(inter, 32), hidden)
    assert cache.expert_bytes == copied_bytes(cache, inter) < 3 * inter * hidden  # under a quarter of float32's


@pytest.mark.parametrize("slots", [None, 1])
def test_int4_experts_offloaded_change_no_token(checkpoint, slots):
    path, prompts, want = checkpoint
    llm = offloaded(path, experts_on_device=slots)
    assert tokens(llm, prompts, 8) == want
    caches = llm.engine.runner.expert_caches
    for c in caches:
        _assert_int4_slots(c)
    stats = _stats(llm)
    assert stats["expert_host_bytes"] == sum(copied_bytes(c, c.inter) * c.host_w13.shape[0] for c in caches)
    assert_copy_counters(stats, slots, caches[0].expert_bytes)


@pytest.mark.parametrize("slots", [1, 2])
def test_int4_experts_computed_and_split_on_the_host_change_no_token(checkpoint, slots):
    """Share 0.5: a step missing an odd number of experts splits one at row I/2 rounded to the split step (Qwen3-MoE:
    16 of 32, inside a group of 32; Mixtral: 32 of 48), the host computes the rest.  Mixtral's 4 experts over 2 slots
    miss 0 or 2 per layer in these steps (top-2), so there the host takes whole experts only."""
    path, prompts, want = checkpoint
    llm = offloaded(path, experts_on_device=slots, offload_host_share=0.5)
    assert tokens(llm, prompts, 8) == want
    stats, c = _stats(llm), llm.engine.runner.expert_caches[0]
    _assert_int4_slots(c)
    assert stats["host_computed"] > 0 and stats["host_seconds"] > 0
    assert (stats["splits"] > 0) == (slots == 1 or "qwen3_moe" in path)
    assert stats["split_scratch_bytes"] == c.expert_bytes and c.scratch.w13.dtype == torch.uint8
    assert c.scratch.w13_zero.dtype == torch.uint8 and c.scratch.w13_scale.dtype == torch.float16
    k = round(c.inter / 2 / c.split_step) * c.split_step
    assert k % 2 == 0 and 0 < k < c.inter
    host_whole = stats["host_computed"] - stats["splits"] * (c.inter - k) / c.inter
    device_whole = round(stats["misses"] - stats["splits"] - host_whole)
    assert stats["bytes_fetched"] == device_whole * c.expert_bytes + stats["splits"] * copied_bytes(c, k)


def _int4_experts(num_experts, inter, hidden, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = int4_quant.quantize(torch.randn(num_experts, 2 * inter, hidden, generator=g) / 4, group, sym=False)
    w2 = int4_quant.quantize(torch.randn(num_experts, hidden, inter, generator=g) / 4, group)
    x = torch.randn(5, hidden, generator=g)
    ids = torch.tensor([[2, 1], [0, 2], [3, 1], [2, 3], [1, 0]])
    args = dict(w13_scale=w13[1], w2_scale=w2[1], group=group, w13_zero=w13[2], w2_zero=w2[2])
    return x, torch.rand(5, 2, generator=g), ids, w13[0], w2[0], args


def test_a_split_int4_expert_cut_inside_a_group_is_the_sum_of_its_parts():
    inter, hidden, group = 40, 24, 16  # I: groups 16, 16, 8; H: 16, 8; I % 16 != 0, so splits step by 2 rows
    x, weights, ids, w13, w2, q = _int4_experts(4, inter, hidden, group)
    cache = ExpertCache(w13, w2, CPU, slots=1, pin=False, scratch=SplitScratch(inter, hidden, w13.dtype, CPU, group,
                                                                               int4=True), **q)
    assert cache.split_step == 2 and cache.scratch.nbytes == cache.expert_bytes == copied_bytes(cache, inter)
    masked = torch.where(ids == 2, weights, torch.zeros_like(weights))
    want = experts_reference(x, masked, ids, w13, w2, q["w13_scale"], q["w2_scale"], group, q["w13_zero"],
                             q["w2_zero"])
    for k in (8, 16, 20, 34):
        before = cache.bytes_fetched
        device = cache.run_split(x, weights, ids, 2, k, experts_reference)
        host = cache.compute_on_host(x, weights, ids, [], (2, k))
        assert torch.allclose(device + host, want, atol=1e-5, rtol=1e-5), k
        assert cache.bytes_fetched - before == copied_bytes(cache, k), k
    cache.host_share = 0.5  # one missing expert, half of it on the device: row 20, even
    assert cache.plan([3]) == ([], (3, 20), [])
    with pytest.raises(AssertionError, match="even row .* not 7"):
        cache.run_split(x, weights, ids, 2, 7, experts_reference)


def test_int4_slots_compute_what_the_host_stacks_do():
    inter, hidden, group = 32, 48, 32
    x, weights, ids, w13, w2, q = _int4_experts(4, inter, hidden, group, seed=1)
    cache = ExpertCache(w13, w2, CPU, slots=2, pin=False, **q)
    cache.ensure([3, 1])
    assert cache.bytes_fetched == 2 * cache.expert_bytes
    resident = torch.isin(ids, torch.tensor([3, 1]))
    masked = torch.where(resident, weights, torch.zeros_like(weights))
    want = experts_reference(x, masked, ids, w13, w2, q["w13_scale"], q["w2_scale"], group, q["w13_zero"],
                             q["w2_zero"])
    assert torch.equal(experts_reference(x, masked, cache.slot_map()[ids], *cache.slot_weights()), want)
    on_host = cache.compute_on_host(x, weights, ids, [3, 1], None)
    assert torch.allclose(on_host, want, atol=1e-5, rtol=1e-5)
