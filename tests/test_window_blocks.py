"""The window pool's bookkeeping (``engine/window_blocks.py``), driven by the scheduler without a model: a sequence
holds only the blocks its window and its new tokens need, blocks fall back to the pool as the window moves, prefix
hits go only as deep as the cached window reaches, and everything comes back on finish and preemption."""
import random

import pytest

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.window_blocks import NULL, WindowBlocks, pool_size, window_bound
from nanovllm.sampling_params import SamplingParams

BS, W = 4, 6  # a window of 6 keys over blocks of 4: at most 2 blocks before a step's new tokens


def _engine(full_blocks: int, max_num_seqs: int = 4, budget: int = 16, window_blocks: int | None = None,
            mixed_prefill: bool = False) -> Scheduler:
    bound = window_bound(W, BS, max_num_seqs, budget)
    window = WindowBlocks(window_blocks or pool_size(bound, 3, full_blocks), BS, W)
    scheduler = Scheduler(BlockManager(full_blocks, BS, window=window), max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=budget, max_model_len=256, eos_token_ids=(),
                          mixed_prefill=mixed_prefill)
    scheduler.window_bound = bound  # (for ``_check_step``)
    return scheduler


def _check_step(scheduler: Scheduler, batch) -> None:
    """What the step reads is held, nothing wholly before its window is, and the reference counts add up."""
    bm = scheduler.block_manager
    wb = bm.window
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start = seq.num_computed_tokens
        first, last = wb.first_needed(start), (start + n - 1) // BS
        table = seq.window_table
        assert all(b == NULL for b in table[:first]), (start, table)
        assert all(b != NULL for b in table[first:last + 1]) and len(table) == last + 1, (start, n, table)
        assert wb.held_by(seq) <= -(-(W - 1) // BS) + 1 + -(-n // BS) + 1
    refs = {}
    for seq in scheduler.running:
        for b in seq.window_table:
            if b != NULL:
                refs[b] = refs.get(b, 0) + 1
    assert all(wb.ref_counts[b] == refs.get(b, 0) for b in range(1, wb.num_blocks))
    assert wb.ref_counts[NULL] == 0 and NULL not in wb.free_blocks
    full_held = bm.num_blocks - bm.num_free_blocks
    assert wb.num_held_blocks <= full_held  # a sequence holds window blocks only where it holds full ones
    assert wb.num_held_blocks <= scheduler.window_bound
    for seq in scheduler.running:  # between its steps a sequence holds its window's blocks and its new ones' only
        if seq not in batch.seqs and seq.window_table:
            assert all(b == NULL for b in seq.window_table[:wb.first_needed(seq.num_computed_tokens)])


def _drive(scheduler: Scheduler, seqs: list[Sequence], rng: random.Random, depth: int = 2, on_step=None) -> int:
    """Run the sequences to the end, ``depth`` steps launched ahead of their tokens; returns the steps taken."""
    for seq in seqs:
        scheduler.add(seq)
    in_flight, steps = [], 0
    while scheduler.has_work() or in_flight:
        batch = scheduler.schedule()
        if batch.seqs:
            _check_step(scheduler, batch)
            if on_step is not None:
                on_step(batch)
            scheduler.advance(batch)
            in_flight.append(batch)
            steps += 1
        if in_flight and (len(in_flight) > depth or not batch.seqs):
            done = in_flight.pop(0)
            scheduler.resolve(done, [rng.randint(3, 99) for _ in done.seqs])
    return steps


def _seq(seq_id: int, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), seed=seq_id)


def test_a_long_decode_holds_only_its_window_and_the_pool_gets_blocks_back_as_it_moves():
    scheduler = _engine(full_blocks=64)
    wb = scheduler.block_manager.window
    seq = _seq(0, list(range(10, 40)), max_tokens=120)  # 30 prompt tokens in two chunks, then 120 decoded
    held, free = [], []

    def note(batch):
        held.append(wb.held_by(seq))
        free.append(wb.num_free_blocks)

    _drive(scheduler, [seq], random.Random(0), on_step=note)
    decode_held = held[2:]
    assert max(decode_held) <= -(-(W - 1) // BS) + 1 + 1  # the window's blocks and the new token's
    assert max(held) <= 2 + 16 // BS + 1  # a chunk of 16 tokens and the window before it
    assert len(seq) == 150 and -(-150 // BS) == 38  # the full pool held 38 blocks at the end; the window pool 3
    assert min(free[2:]) >= wb.num_blocks - 1 - 3
    assert wb.num_free_blocks == wb.num_blocks - 1 and wb.peak_held <= 2 + 4 + 1


def test_many_sequences_with_preemption_stay_within_the_bound_and_give_every_block_back():
    """A small full pool forces preemption; mixed prefill and a pipeline of two steps; prompts that share a prefix
    hit each other's blocks in both pools."""
    rng = random.Random(1)
    scheduler = _engine(full_blocks=24, max_num_seqs=4, budget=16, mixed_prefill=True)
    bm, wb = scheduler.block_manager, scheduler.block_manager.window
    shared = [rng.randint(3, 99) for _ in range(13)]
    seqs = [_seq(i, shared[:rng.randint(9, 13)] + [rng.randint(3, 99) for _ in range(rng.randint(1, 12))],
                 max_tokens=rng.randint(8, 40)) for i in range(10)]
    steps = _drive(scheduler, seqs, rng)
    assert steps > 60 and scheduler.num_preemptions > 0 and bm.cache_hit_tokens > 0
    assert wb.peak_held <= min(window_bound(W, BS, 4, 16), bm.num_blocks)
    assert wb.num_free_blocks == wb.num_blocks - 1 and all(r == 0 for r in wb.ref_counts)
    assert bm.num_free_blocks == bm.num_blocks


def _computed(bm: BlockManager, seq: Sequence) -> None:
    """Admit ``seq`` and compute its whole prompt in one step (its blocks published)."""
    assert bm.try_allocate(seq)
    bm.reserve_window(seq, seq.num_computed_tokens, len(seq))
    seq.num_computed_tokens = len(seq)
    bm.register_computed(seq)


def test_a_whole_prompt_hit_needs_the_window_before_its_first_new_token():
    bm = BlockManager(32, BS, window=WindowBlocks(12, BS, W))
    prompt = list(range(3, 33))  # 30 tokens: a hit covers 7 blocks (28 tokens), its window is blocks 5 and 6
    first = _seq(0, prompt, 1)
    _computed(bm, first)
    assert bm.window.held_by(first) == 8
    bm.free(first)
    again = _seq(1, prompt, 1)
    assert bm.try_allocate(again) and again.num_cached_tokens == 28
    assert again.window_table[:5] == [NULL] * 5 and all(b != NULL for b in again.window_table[5:7])
    bm.free(again)
    wb = bm.window
    lost = wb.hash_to_block[bm.prefix_hash(again, 6)]  # block 5's window copy is reused by someone else
    wb.free_blocks.move_to_end(lost, last=False)
    other = _seq(2, [1, 2], 1)
    assert bm.try_allocate(other)
    bm.reserve_window(other, 0, 2)
    assert lost in other.window_table
    third = _seq(3, prompt, 1)
    assert bm.try_allocate(third) and third.num_cached_tokens == 5 * BS  # blocks 3 and 4 are the window of 5
    assert bm.cache_hit_tokens == 28 + 20


def test_a_window_block_released_before_it_is_published_is_never_published():
    """A chunk's blocks that fall out of the window before their tokens are published are not registered later
    (they may belong to another sequence by then)."""
    bm = BlockManager(32, BS, window=WindowBlocks(12, BS, W))
    seq = _seq(0, list(range(3, 33)), 1)
    assert bm.try_allocate(seq)
    bm.reserve_window(seq, 0, 16)
    seq.num_computed_tokens = 16
    bm.reserve_window(seq, 16, 30)  # blocks 0..1 leave the window (keys from 11 on)
    seq.num_computed_tokens = 30
    assert seq.window_table[:2] == [NULL, NULL]
    bm.register_computed(seq)
    published = set(bm.window.hash_to_block.values())
    assert published == set(seq.window_table[2:7])


def test_sizing_the_pool_bounds_it_by_the_full_pool_and_keeps_extra_blocks():
    assert window_bound(6, 4, 4, 16) == 4 * (2 + 1) + 4 + 4
    assert pool_size(bound=20, kept=3, num_full_blocks=100) == 24
    assert pool_size(bound=20, kept=3, num_full_blocks=8) == 12  # never more held than full blocks are


def test_reset_prefix_cache_forgets_window_blocks_too():
    bm = BlockManager(32, BS, window=WindowBlocks(12, BS, W))
    seq = _seq(0, list(range(3, 20)), 1)
    _computed(bm, seq)
    bm.free(seq)
    assert bm.window.hash_to_block
    bm.reset_prefix_cache()
    assert not bm.window.hash_to_block
    again = _seq(1, list(range(3, 20)), 1)
    assert bm.try_allocate(again) and again.num_cached_tokens == 0


@pytest.mark.parametrize("depth", [1, 3])
def test_a_decode_only_engine_never_runs_the_window_pool_out_at_its_bound(depth):
    """Every sequence at its widest at once: the pool of exactly the bound's blocks suffices."""
    rng = random.Random(depth)
    bound = window_bound(W, BS, 4, 16)
    scheduler = _engine(full_blocks=200, max_num_seqs=4, budget=16, window_blocks=bound + 1)
    seqs = [_seq(i, [rng.randint(3, 99) for _ in range(rng.randint(5, 30))], rng.randint(20, 50)) for i in range(8)]
    _drive(scheduler, seqs, rng, depth=depth)
    assert scheduler.block_manager.window.peak_held <= bound


def test_sequences_waiting_through_prefill_steps_hold_only_their_windows():
    """Without mixed prefill, a sequence whose prompt was just prefilled waits while later prompts are: it holds its
    window only, not its last chunk's blocks, so four whole 64-token prompts fit a pool of the bound's size."""
    bound = window_bound(W, BS, 4, 64)
    scheduler = _engine(full_blocks=200, max_num_seqs=4, budget=64, window_blocks=bound + 1)
    rng = random.Random(7)
    seqs = [_seq(i, [rng.randint(3, 99) for _ in range(64)], 3) for i in range(4)]
    _drive(scheduler, seqs, rng)
    assert scheduler.block_manager.window.peak_held <= bound
