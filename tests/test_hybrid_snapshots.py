"""How many prefix-cache snapshots a hybrid model keeps, and which (``engine/hybrid_state.py``): by default the
snapshot slots grow into half the memory the running sequences' KV blocks cannot use, once per measured budget and
in one count on every rank; a snapshot that a step's prompts restore outlives that step's captures, so a shared
system prompt stays a hit while many conversations' own boundaries are captured."""
from types import SimpleNamespace

import pytest
import torch

from conftest import STAGGERED_ENGINE as ENGINE, build_checkpoint, hf_greedy
from conftest import greedy_tokens as tokens
from nanovllm import LLM
from nanovllm.engine import hybrid_state, kv_cache
from nanovllm.engine.hybrid_state import StateSnapshots


class _Measured:
    """A platform that measures memory and always finds ``budget`` bytes for the cache."""
    measures_memory, device = True, torch.device("cpu")

    def __init__(self, budget: int):
        self.budget = budget

    def reset_peak_memory(self):
        pass

    def synchronize(self):
        pass

    def available_kv_bytes(self, utilization):
        return self.budget


def _spec(state_snapshots):
    """One attention layer (1,024 bytes a block of 16 tokens) and one linear one (560 bytes a state slot), sized
    for 4 sequences of 64 tokens."""
    spec = kv_cache.KVCacheSpec(2, 1, 8, 16, torch.float32, states=[None, ((4, 3), (2, 8, 8))],
                                state_dtype=torch.float32)
    config = SimpleNamespace(max_num_seqs=4, max_model_len=64, state_snapshots=state_snapshots, speculative=None)
    assert hybrid_state.size_state_pools(spec, config)
    assert (spec.bytes_per_block, spec.bytes_per_state_slot) == (1024, 560)
    return spec


def _plan(spec, budget: int, agree=lambda n: n) -> int:
    return kv_cache.plan_num_blocks(spec, fixed=None, utilization=0.9, platform=_Measured(budget),
                                    max_blocks_per_seq=4, max_model_len=64, probe=lambda: [], agree=agree)


def test_default_snapshots_take_half_the_memory_running_sequences_cannot_use():
    spec = _spec(None)
    base = 4 + 1 + 4 // 4 + 2  # running slots, scratch, the fixed snapshots
    blocks = _plan(spec, 100_000)
    spare = 100_000 - base * 560 - 4 * 4 * 1024  # past the states and 4 sequences' blocks at max_model_len
    assert spec.num_state_slots == base + spare // 2 // 560
    assert blocks == (100_000 - spec.state_bytes) // 1024 and blocks >= 16 + spare // 2 // 1024
    assert _plan(spec, 100_000) == blocks and spec.num_state_slots == base + spare // 2 // 560  # once, not twice
    assert _plan(spec, 100_000, agree=lambda n: min(n, 10)) and spec.num_state_slots == base + 10  # the ranks' min


def test_no_growth_without_spare_memory_or_with_state_snapshots_set():
    spec = _spec(None)
    _plan(spec, 20_000)  # less than the states and the running sequences' blocks
    assert spec.num_state_slots == 8
    spec = _spec(5)
    assert spec.grow_states is None
    _plan(spec, 100_000)
    assert spec.num_state_slots == 4 + 1 + 5


def test_a_snapshot_restored_in_a_step_is_not_evicted_by_its_captures():
    snaps = StateSnapshots(first=10, count=2)
    for h in (1, 2):
        snaps.take(h)
    snaps.commit()
    assert snaps.deepest([7, 2]) == 2  # this step restores hash 2 (now the most recent)
    assert snaps.take(3) == 10  # evicts hash 1, the least recent
    assert snaps.take(4) is None  # only hash 2 is left, and this step restores it
    snaps.commit()
    assert set(snaps.by_hash) == {2, 3}
    assert snaps.take(5) == 11  # a later step may evict it
    snaps.commit()
    assert set(snaps.by_hash) == {3, 5}


def test_a_prefix_kept_already_is_not_captured_again():
    snaps = StateSnapshots(first=10, count=2)
    assert snaps.take(1) == 10
    snaps.commit()
    assert snaps.take(1) is None and snaps.captured == 1  # a prompt still computing through it: no cut, no copy
    assert snaps.deepest([1]) == 1 and snaps.slot(1) == 10  # a new prompt of the same step restores it


def test_prompts_arriving_together_wait_a_step_and_hit_the_prefix_one_of_them_computes(tmp_path):
    """Four prompts on a 64-token system prompt at once.  A computes it and snapshots it inside its chunk (64 tokens
    in, no cut); B, C and D share 64 of their 84 tokens with it, so they wait a step (``shared_prefix.py``) and
    restore it.  Before, they computed it beside A and missed (as 64 conversations on a GPU missed their system
    prompt for 12.8 s).  Every prompt gets transformers' tokens."""
    path = build_checkpoint(tmp_path, "qwen3_5")
    system = list(range(100, 164))
    prompts = [system + [t] * 20 for t in (7, 8, 9, 10)]
    want = hf_greedy(path, prompts, 3)
    llm = LLM(path, enforce_eager=True, **dict(ENGINE, max_num_batched_tokens=256))
    bm = llm.engine.block_manager
    assert tokens(llm, prompts, [3] * 4) == want
    assert bm.cache_hit_tokens == 3 * 64 and llm.engine.scheduler.sharing.deferred == 3
    assert bm.snapshots.captured == 1  # the shared prefix's; each prompt's own last block is < 64 tokens past it


def test_a_shared_prefix_stays_a_hit_while_its_steps_captures_want_its_slot(tmp_path):
    """Two snapshot slots, a 64-token system prompt, 70 tokens after it.  A snapshots its last full block (128
    tokens in); B the shared prefix and its own last block (evicting A's); C and D restore the prefix in one step, C's
    last block takes B's slot and D's finds none (the prefix's is kept); E hits the prefix still.  Every prompt gets
    transformers' tokens."""
    path = build_checkpoint(tmp_path, "qwen3_next")
    system = list(range(100, 164))
    prompts = [system + [t] * 70 for t in (7, 8, 9, 10, 11)]
    want = hf_greedy(path, prompts, 3)
    llm = LLM(path, enforce_eager=True, state_snapshots=2, **dict(ENGINE, max_num_batched_tokens=256))
    bm = llm.engine.block_manager
    assert tokens(llm, prompts[:1], [3]) == want[:1] and tokens(llm, prompts[1:2], [3]) == want[1:2]
    assert bm.cache_hit_tokens == 0 and bm.snapshots.captured == 3
    before = bm.cache_hit_tokens
    assert tokens(llm, prompts[2:4], [3, 3]) == want[2:4]
    assert bm.cache_hit_tokens - before == 128 and bm.snapshots.captured == 4  # both restored the shared prefix
    before = bm.cache_hit_tokens
    assert tokens(llm, prompts[4:], [3]) == want[4:]
    assert bm.cache_hit_tokens - before == 64


@pytest.mark.parametrize("snapshots", [None, 2])
def test_the_start_up_description_names_the_state_pools(tmp_path, snapshots):
    path = build_checkpoint(tmp_path, "qwen3_next")
    llm = LLM(path, enforce_eager=True, state_snapshots=snapshots, **ENGINE)
    d = llm.engine.describe()
    assert (d["state_slots"], d["state_snapshots"]) == (5, 3 if snapshots is None else 2)
    assert d["state_bytes"] > 0


def test_a_boundary_inside_a_chunk_is_snapshotted_in_the_step_without_a_cut(tmp_path):
    """64-token blocks: a 150-token prompt's last full block ends 128 tokens in, a multiple of CAPTURE_ALIGN from its
    chunk's start, so the kernels snapshot it during the one prefill step (before: a step to 128, then one to 150).
    The same prompt again restores it: 128 hit tokens, and both match transformers."""
    path = build_checkpoint(tmp_path, "qwen3_5")
    prompt = [(7 * i) % 200 + 3 for i in range(150)]
    want = hf_greedy(path, [prompt], 3)
    llm = LLM(path, enforce_eager=True, kvcache_block_size=64, max_num_seqs=2, max_model_len=256)
    engine, bm = llm.engine, llm.engine.block_manager
    assert tokens(llm, [prompt], [3]) == want and engine.stats["prefill_steps"] == 1
    assert bm.snapshots.captured == 1 and bm.cache_hit_tokens == 0
    assert tokens(llm, [prompt], [3]) == want and bm.cache_hit_tokens == 128
