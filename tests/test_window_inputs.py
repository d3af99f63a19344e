"""A window pool's step inputs and sizing: ``WindowStepInputs`` moves like ``StepInputs``, the builders fill the window
tables and slots from each sequence's ``window_table``, and ``KVCacheSpec`` gives the window pool its blocks from the
same budget (no model)."""
import dataclasses
import random

import numpy as np
import torch
import torch.utils._pytree as pytree

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.decode_inputs import DecodeInputBuilder
from nanovllm.engine.kv_cache import KVCacheSpec
from nanovllm.engine.prefill_inputs import PrefillInputBuilder
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.window_blocks import WindowBlocks, pool_size, window_bound
from nanovllm.sampling_params import SamplingParams
from nanovllm.step import StepInputs, WindowStepInputs

BS, W, WIDTH = 4, 6, 16
CPU = torch.device("cpu")


def _builders(window: int = W):
    args = dict(device=CPU, pin_memory=False, block_size=BS, table_width=WIDTH, scratch_slot=6, window=window)
    return PrefillInputBuilder(max_model_len=64, **args), DecodeInputBuilder(**args)


def _expected_window(seq, positions, start):
    """(window-table row, window slots) a step of ``seq`` from ``start`` must carry."""
    row = np.zeros(WIDTH, np.int32)
    first = max(0, start - W + 1) // BS
    row[first:len(seq.window_table)] = seq.window_table[first:]
    return row, row[np.asarray(positions) // BS].astype(np.int64) * BS + np.asarray(positions) % BS


def test_window_inputs_pack_move_and_pick_the_window_pool_for_sliding_layers():
    inputs = StepInputs.packed(WindowStepInputs.shaped(5, 3, WIDTH, device="cpu"))
    assert type(inputs) is WindowStepInputs and inputs.window_tables.shape == (3, WIDTH)
    inputs.pad_rows(0, 0, 9)
    assert inputs.window_slot_mapping.tolist() == [-1] * 5 and inputs.window_tables.abs().sum() == 0
    inputs.window_tables[1, 2] = 7
    for moved in (inputs.clone(), inputs.to("cpu"), inputs.packed_copy()):
        assert type(moved) is WindowStepInputs and moved.window_tables[1, 2] == 7
    assert len(pytree.tree_leaves(inputs)) == len(dataclasses.fields(StepInputs)) + 2
    assert inputs.kv_tables(W)[0] is inputs.window_tables and inputs.kv_tables(0)[0] is inputs.block_tables
    plain = StepInputs.shaped(5, 3, WIDTH, device="cpu")
    assert plain.kv_tables(W) == (plain.block_tables, plain.slot_mapping)  # no window pool: one pool for all


def test_builders_fill_window_tables_and_slots_from_each_sequences_window():
    """Drive the scheduler (chunked prefill, mixed decode rows, preemption): every step's window fields are the
    held blocks from the window of its first token on, and a decode builder that reuses its batches agrees with
    a fresh one."""
    rng = random.Random(0)
    scheduler = Scheduler(BlockManager(20, BS, window=WindowBlocks(40, BS, W)), max_num_seqs=4,
                          max_num_batched_tokens=12, max_model_len=64, eos_token_ids=(), mixed_prefill=True)
    for i in range(7):
        scheduler.add(Sequence(i, [rng.randint(3, 99) for _ in range(rng.randint(3, 20))],
                               SamplingParams(max_tokens=rng.randint(5, 30), ignore_eos=True), seed=i))
    prefill, decode = _builders()
    checked = 0
    while scheduler.has_work():
        batch = scheduler.schedule()
        if batch.is_prefill:
            inputs = prefill.build(batch)
            offset = 0
            for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
                start = seq.num_computed_tokens
                row, slots = _expected_window(seq, range(start, start + n), start)
                held = inputs.window_tables[i].numpy()
                assert (held[row != 0] == row[row != 0]).all()  # prefill rows carry the list as it is (NULLs)
                assert inputs.window_slot_mapping[offset:offset + n].tolist() == slots.tolist()
                offset += n
            assert inputs.window_slot_mapping[offset:].tolist() == [-1] * (len(inputs.input_ids) - offset)
        else:
            inputs = decode.build(batch.seqs, 8)
            fresh = _builders()[1].build(batch.seqs, 8)
            for f in dataclasses.fields(fresh):
                assert torch.equal(getattr(inputs, f.name), getattr(fresh, f.name)), f.name
            for i, seq in enumerate(batch.seqs):
                row, slots = _expected_window(seq, [len(seq) - 1], len(seq) - 1)
                assert inputs.window_tables[i].tolist() == row.tolist()
                assert inputs.window_slot_mapping[i].item() == slots[0]
            assert inputs.window_slot_mapping[len(batch.seqs):].tolist() == [-1] * (8 - len(batch.seqs))
        checked += 1
        scheduler.advance(batch)
        scheduler.resolve(batch, [rng.randint(3, 99) for _ in batch.seqs])
    assert checked > 40 and scheduler.num_preemptions > 0


def test_start_up_inputs_carry_the_full_pools_blocks_in_both():
    prefill, decode = _builders()
    probe = prefill.probe(2, 9)
    assert torch.equal(probe.window_tables, probe.block_tables)
    assert torch.equal(probe.window_slot_mapping, probe.slot_mapping)
    dummy = prefill.dummy(7, 3)
    assert type(dummy) is WindowStepInputs and (dummy.window_slot_mapping == -1).all()
    assert type(decode.build([], 4)) is WindowStepInputs
    plain_prefill, plain_decode = _builders(window=0)
    assert type(plain_prefill.dummy()) is StepInputs and type(plain_decode.build([], 4)) is StepInputs


def _config(max_model_len: int, max_num_seqs: int):
    from types import SimpleNamespace
    return SimpleNamespace(max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_step_tokens=16)


def _spec(windows, max_model_len=256) -> KVCacheSpec:
    spec = KVCacheSpec(len(windows), 2, 8, BS, torch.float32, windows=windows)
    spec.plan_window_pool(_config(max_model_len, 4))
    return spec


def test_the_window_pool_takes_its_blocks_from_the_budget_and_is_allocated_per_layer():
    spec = _spec([W, W, 0, W])
    assert spec.window == W and spec.attention_layers == 1 and spec.window_layers == 3
    block = 2 * 2 * 8 * BS * 4
    assert spec.bytes_per_block == block and spec.bytes_per_window_block == 3 * block
    bound = window_bound(W, BS, 4, 16)
    assert spec.window_bound == bound and spec.window_kept == 4 * 3  # a window of each sequence
    assert spec.blocks_within(10 * block) == 0  # the pool's kept blocks alone take more
    for budget in (50 * block, 200 * block, 5000 * block, 1 << 20):
        n = spec.blocks_within(budget)
        used = n * block + spec.num_window_blocks(n) * 3 * block
        assert used <= budget < (n + 1) * block + spec.num_window_blocks(n + 1) * 3 * block, budget
    assert spec.num_window_blocks(100) == pool_size(bound, 12, 100) == bound + 13
    caches = spec.allocate(50, CPU)
    assert [k.shape[0] for k, _ in caches] == [spec.num_window_blocks(50)] * 2 + [50, spec.num_window_blocks(50)]
    assert [k.shape[0] for k, _ in spec.allocate(30, CPU, 30)] == [30] * 4  # the start-up probe's


def test_no_window_pool_without_a_window_shorter_than_max_model_len():
    for spec in (_spec([0, 0]), _spec([W, 0], max_model_len=W)):
        assert spec.window == 0 and spec.attention_layers == 2 and spec.num_window_blocks(40) == 0
        assert spec.blocks_within(1000 * spec.bytes_per_block + 5) == 1000
        assert [k.shape[0] for k, _ in spec.allocate(40, CPU)] == [40, 40]


def test_a_budget_keeps_the_window_pool_only_where_it_holds_more_full_blocks():
    """1 GiB (the CPU's default budget) over blocks of 0.5 MiB a layer: with four sequences the never-run-out pool's
    33 blocks leave room for 1949 full blocks (512 without a pool); with 256 sequences that pool alone would not
    fit, so the pool may run out (``pressured``): 108 blocks beside 1721 full ones (1721 * 4 / 64, a sequence's
    window need over its full need at max_model_len); with max_model_len 8 (2 full blocks a sequence, fewer than
    a window's 4) no pool saves anything, so every layer goes to the full pool."""
    from types import SimpleNamespace
    from nanovllm.engine.kv_cache import plan_num_blocks
    platform = SimpleNamespace(measures_memory=False, device=CPU)
    for seqs, length, pooled, pressured, blocks in ((4, 256, True, False, 1949), (256, 256, True, True, 1721),
                                                    (256, 8, False, False, 512)):
        spec = KVCacheSpec(4, 64, 256, BS, torch.float32, windows=[W, W, 0, W])
        spec.plan_window_pool(_config(length, seqs))
        n = plan_num_blocks(spec, fixed=None, utilization=0.9, platform=platform, max_blocks_per_seq=2,
                            max_model_len=length, probe=lambda: [])
        assert (bool(spec.window), spec.pressured, n) == (pooled, pressured, blocks)
        assert n * spec.bytes_per_block + spec.num_window_blocks(n) * spec.bytes_per_window_block <= 1 << 30
    assert spec.num_window_blocks(n) == 0


def test_a_pool_that_may_run_out_shares_the_budget_by_a_window_over_max_model_len():
    """W = 6 over blocks of 4, 256 sequences of up to 256 tokens: a sequence needs ceil(5 / 4) + 2 = 4 window blocks
    and 64 full ones, so the pool has 4 / 64 of the full blocks, at least one sequence's 4 and a step's 64 (256
    tokens), at most the never-run-out bound (256 * 4 + 64), and keeps none for prefix hits; the budget fits the
    most full blocks beside it."""
    from types import SimpleNamespace
    spec = KVCacheSpec(4, 64, 256, BS, torch.float32, windows=[W, W, 0, W])
    spec.plan_window_pool(_config(256, 256))
    spec.pressured = True
    assert (spec.window_need, spec.full_need, spec.step_blocks, spec.window_bound) == (4, 64, 64, 1088)
    assert [spec.num_window_blocks(n) for n in (10, 1088, 1089, 6400, 17408, 10**6)] == \
        [68 + 1, 68 + 1, 69 + 1, 400 + 1, 1088 + 1, 1088 + 1]
    block, window = spec.bytes_per_block, spec.bytes_per_window_block
    for budget in (500 * block, 3000 * block + 7, 1 << 30):
        n = spec.blocks_within(budget)
        assert n * block + spec.num_window_blocks(n) * window <= budget
        assert (n + 1) * block + spec.num_window_blocks(n + 1) * window > budget
    assert spec.blocks_within(69 * window) == 0  # the pool's least alone fills it
    mistral = KVCacheSpec(2, 2, 16, BS, torch.float32, windows=[W, W])  # full blocks cost nothing: as many as
    mistral.plan_window_pool(SimpleNamespace(max_model_len=256, max_num_seqs=256, max_step_tokens=16))
    mistral.pressured = True  # the pool's share allows, at most every sequence's twice
    assert mistral.blocks_within(201 * mistral.bytes_per_window_block) == 200 * 64 // 4
    assert mistral.blocks_within(1 << 40) == mistral.free_full_blocks == 2 * 256 * 64
