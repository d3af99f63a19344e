"""Prompts arriving together on a prefix no cache holds (``engine/shared_prefix.py``): the first computes it, those
sharing at least half of what they would compute wait a step and hit it, with transformers' tokens; a short shared
prefix keeps nobody waiting.  A hybrid model's leader snapshots the shared depth on a ``CAPTURE_ALIGN`` boundary
(``hybrid_state.capture_depths``)."""
import pytest

from conftest import STAGGERED_ENGINE as ENGINE, build_checkpoint, hf_greedy
from conftest import greedy_tokens as tokens
from nanovllm import LLM
from nanovllm.engine.hybrid_state import capture_depths
from nanovllm.engine.shared_prefix import common_blocks


def test_common_blocks_is_the_shared_leading_run():
    assert common_blocks([1, 2, 3, 4], [1, 2, 3, 9, 10]) == 3
    assert common_blocks([1, 2], [1, 2, 3]) == 2
    assert common_blocks([5], [1]) == 0 and common_blocks([], [1]) == 0


def test_capture_depths_move_down_to_the_kernels_boundaries():
    # 16-token blocks, CAPTURE_ALIGN 64: every fourth block past the hit
    assert capture_depths(0, (5, 9), 16) == [4, 8]
    assert capture_depths(2, (5, 13), 16) == [10]  # 3 blocks past the hit: none there
    assert capture_depths(0, (8, 8), 16) == [8]
    assert capture_depths(3, (5, 9), 64) == [5, 9]  # 64-token blocks: every boundary


def _run(tmp_path, arch, prompts, **engine):
    path = build_checkpoint(tmp_path, arch)
    want = hf_greedy(path, prompts, 3)
    llm = LLM(path, enforce_eager=True, **dict(ENGINE, **engine))
    got = tokens(llm, prompts, [3] * len(prompts))
    return llm, got, want


def test_full_attention_prompts_wait_for_the_prefix_they_share(tmp_path):
    """48 shared tokens of 58: A computes them in the first step, B, C and D hit them in the second."""
    system = list(range(100, 148))
    llm, got, want = _run(tmp_path, "qwen3", [system + [t] * 10 for t in (7, 8, 9, 10)], max_num_batched_tokens=256)
    assert got == want
    engine = llm.engine
    assert engine.block_manager.cache_hit_tokens == 3 * 48 and engine.scheduler.sharing.deferred == 3
    assert engine.stats["prefill_steps"] == 2


def test_a_short_shared_prefix_keeps_nobody_waiting(tmp_path):
    """16 shared tokens of 58 are less than half of what each would compute: all four go in the first step."""
    llm, got, want = _run(tmp_path, "qwen3", [[100] * 16 + [t] * 42 for t in (7, 8, 9, 10)],
                          max_num_batched_tokens=256)
    assert got == want
    assert llm.engine.scheduler.sharing.deferred == 0 and llm.engine.stats["prefill_steps"] == 1


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3"])
def test_followers_wait_while_a_chunked_leader_computes_the_prefix(tmp_path, arch):
    """48 tokens a step: A's 128 shared tokens take it three chunks, the budget all its own.  A hybrid A's third
    is cut at 128 for its snapshot, leaving room: B and C are looked at then and wait.  Either way B and C then
    restore 128 tokens each."""
    system = [(11 * i) % 150 + 5 for i in range(128)]
    llm, got, want = _run(tmp_path, arch, [system + [t] * 20 for t in (7, 8, 9)])
    assert got == want
    engine = llm.engine
    assert engine.block_manager.cache_hit_tokens == 2 * 128
    assert engine.scheduler.sharing.deferred == (2 if arch == "qwen3_5" else 0)
