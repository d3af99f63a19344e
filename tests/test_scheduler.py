"""Host-side engine behaviour: scheduler order, the prefix-cache reset, decode input staging (no model)."""
import dataclasses

import pytest

import torch

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.decode_inputs import DecodeInputBuilder
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


def test_decode_rows_come_longest_context_first():
    scheduler = Scheduler(BlockManager(64, 16), max_num_seqs=8, max_num_batched_tokens=512, max_model_len=256,
                          eos_token_ids=(), mixed_prefill=False)
    lengths = [5, 40, 12, 40, 3]
    seqs = [Sequence(i, [i + 1] * n, SamplingParams(max_tokens=4), seed=0) for i, n in enumerate(lengths)]
    for seq in seqs:
        scheduler.add(seq)
    prefill = scheduler.schedule()
    assert prefill.is_prefill and prefill.seqs == seqs  # prefill keeps admission order
    scheduler.advance(prefill)
    scheduler.resolve(prefill, [7] * len(prefill.seqs))
    decode = scheduler.schedule()
    assert not decode.is_prefill
    assert [len(s) for s in decode.seqs] == sorted((n + 1 for n in lengths), reverse=True)
    assert [s.seq_id for s in decode.seqs][:2] == [1, 3]  # ties keep admission order


def test_reset_prefix_cache_forgets_cached_blocks_and_refuses_while_blocks_are_held():
    bm = BlockManager(8, 4)
    first = Sequence(0, list(range(9)), SamplingParams(), seed=0)
    assert bm.try_allocate(first)
    first.num_computed_tokens = 9
    bm.register_computed(first)
    with pytest.raises(RuntimeError, match="blocks in use"):
        bm.reset_prefix_cache()
    bm.free(first)
    again = Sequence(1, list(range(9)), SamplingParams(), seed=0)
    assert bm.try_allocate(again) and bm.cache_hit_tokens == 8  # two full blocks served from the cache
    bm.free(again)
    bm.reset_prefix_cache()
    fresh = Sequence(2, list(range(9)), SamplingParams(), seed=0)
    assert bm.try_allocate(fresh) and bm.cache_hit_tokens == 8  # no new hits after the reset


def test_prefix_cache_statistics_count_first_admissions_as_vllm_does():
    """``prefix_cache_queries``/``_hits`` (the server's counters): every prompt token at a sequence's first admission
    and those served from the cache; a readmission after preemption and a sequence wanting prompt logprobs (which
    takes no hit) are left out, as vLLM leaves them out of its counters."""
    scheduler = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32,
                          eos_token_ids=(), mixed_prefill=False)
    bm = scheduler.block_manager
    first = Sequence(0, list(range(9)), SamplingParams(), seed=0)
    assert bm.try_allocate(first)
    first.num_computed_tokens = 9
    bm.register_computed(first)
    bm.free(first)
    again = Sequence(1, list(range(9)), SamplingParams(), seed=0)
    scheduler.add(again)
    scheduler.schedule()
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (18, 8)  # two full blocks served from the cache
    scheduler._preempt(again)
    assert again.num_preemptions == 1
    assert bm.try_allocate(again) and bm.cache_hit_tokens == 16  # a hit again, not counted again
    logprobs = Sequence(2, list(range(9)), SamplingParams(prompt_logprobs=1), seed=0)
    assert bm.try_allocate(logprobs)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (18, 8)


def _decoding(seq_id: int, length: int) -> Sequence:
    seq = Sequence(seq_id, list(range(1, length + 1)), SamplingParams(), seed=seq_id)
    seq.block_table = [seq_id]
    return seq


def test_decode_chunks_of_one_bucket_get_their_own_staging():
    """A step split into two chunks of the same bucket (and the next step) must not overwrite inputs whose
    asynchronous copy to the device may still be pending."""
    builder = DecodeInputBuilder(device=torch.device("cpu"), pin_memory=False, block_size=16, table_width=4, scratch_slot=9)
    first = builder.build([_decoding(0, 5), _decoding(1, 7)], rows=2, chunk=0, slot=1)
    expected = {f.name: getattr(first, f.name).clone() for f in dataclasses.fields(first)}
    second = builder.build([_decoding(2, 3)], rows=2, chunk=1, slot=1)  # the step's next chunk, same bucket
    following = builder.build([_decoding(3, 9)], rows=2, chunk=0, slot=0)  # the next step's first chunk
    for name, t in expected.items():
        assert torch.equal(getattr(first, name), t), name
    assert second.context_lens.tolist() == [3, 0] and following.context_lens.tolist() == [9, 0]
    assert first.context_lens.tolist() == [5, 7]


def test_decode_staging_is_one_buffer_that_moves_in_one_copy():
    """Every staged input is a view of one aligned byte buffer; ``to`` and ``copy_into`` move that buffer whole."""
    builder = DecodeInputBuilder(device=torch.device("cpu"), pin_memory=False, block_size=16, table_width=4, scratch_slot=9)
    staged = builder.build([_decoding(0, 5), _decoding(1, 12)], rows=3)
    base = staged.buffer.data_ptr()
    for f in dataclasses.fields(staged):
        t = getattr(staged, f.name)
        assert t.untyped_storage().data_ptr() == staged.buffer.untyped_storage().data_ptr(), f.name
        assert (t.data_ptr() - base) % 64 == 0 and t.is_contiguous(), f.name
    moved = staged.to("cpu")
    assert moved.layout == staged.layout and torch.equal(moved.buffer, staged.buffer)
    target = builder.build([], rows=3, chunk=0, slot=1).to("cpu")  # like a graph's static inputs: padding only
    with torch.inference_mode():  # as the executors call it
        staged.copy_into(target)
    for f in dataclasses.fields(staged):
        assert torch.equal(getattr(target, f.name), getattr(staged, f.name)), f.name
    assert torch.equal(target.buffer, staged.buffer)
    assert target.context_lens.tolist() == [5, 12, 0] and target.block_tables[1].tolist() == [1, 0, 0, 0]
    assert target.cu_seqlens_q.tolist() == [0, 1, 2, 3] and target.slot_mapping.tolist() == [4, 27, -1]


def test_decode_step_data_reused_from_the_last_batch_equals_data_built_anew():
    """Drive the scheduler through decode steps (three launched ahead of their tokens, a small KV cache so that
    sequences are preempted and readmitted, lengths that cross blocks, batches that change row count and come
    back): the builder that reuses its last batch per row count gives the inputs a fresh builder gives."""
    import random
    rng = random.Random(0)
    scheduler = Scheduler(BlockManager(14, 4), max_num_seqs=6, max_num_batched_tokens=64, max_model_len=64,
                          eos_token_ids=(), mixed_prefill=False)
    for i in range(9):
        params = SamplingParams(temperature=0.5 + i / 10, top_k=i + 1, max_tokens=rng.randint(5, 40), ignore_eos=True)
        scheduler.add(Sequence(i, [rng.randint(1, 99) for _ in range(rng.randint(1, 9))], params, seed=i))
    reusing = DecodeInputBuilder(device=torch.device("cpu"), pin_memory=False, block_size=4, table_width=16, scratch_slot=6)
    in_flight, decode_steps, reused = [], 0, 0
    while scheduler.has_work() or in_flight:
        batch = scheduler.schedule()
        slots = [s.token_slot for s in scheduler.running]  # each running sequence holds a slot of its own
        assert None not in slots and len(set(slots)) == len(slots)
        assert sorted(slots + scheduler.free_slots) == list(range(6))
        if batch.seqs and not batch.is_prefill:
            rows = 4 if len(batch.seqs) <= 4 else 8  # two row counts: a batch can leave one and come back to it
            last = reusing._batches.get((rows, 0))
            reused += last is not None and last.seqs == batch.seqs
            got = reusing.build(batch.seqs, rows)
            fresh = DecodeInputBuilder(device=torch.device("cpu"), pin_memory=False, block_size=4, table_width=16, scratch_slot=6)
            want = fresh.build(batch.seqs, rows)
            for f in dataclasses.fields(want):
                assert torch.equal(getattr(got, f.name), getattr(want, f.name)), (decode_steps, f.name)
            decode_steps += 1
        if batch.seqs:
            in_flight.append(batch)
        if in_flight and (len(in_flight) > 3 or not batch.seqs):
            done = in_flight.pop(0)
            scheduler.resolve(done, [rng.randint(1, 99) for _ in done.seqs])
        if batch.seqs:
            scheduler.advance(batch)
    assert decode_steps > 50 and reused > 40 and scheduler.num_preemptions > 0
    assert sorted(scheduler.free_slots) == list(range(6))  # every slot came back


def test_decode_step_data_of_a_batch_that_comes_back_after_steps_in_another_row_count_is_rebuilt():
    seqs = [_decoding(i, 3 + i) for i in range(3)]
    extra = _decoding(3, 2)
    builder = DecodeInputBuilder(device=torch.device("cpu"), pin_memory=False, block_size=4, table_width=4, scratch_slot=9)
    builder.build(seqs, rows=4)
    for step in range(5):  # five steps with a fourth sequence, in the 8-row batch: blocks fill and new ones open
        for seq in seqs + [extra]:
            seq.token_ids.append(7)
            if len(seq.block_table) * 4 < len(seq.token_ids):
                seq.block_table.append(10 + 4 * seq.seq_id + len(seq.block_table))
        builder.build(seqs + [extra], rows=8)
    got = builder.build(seqs, rows=4)  # back to 4 rows: the 4-row batch it kept is five steps old
    want = DecodeInputBuilder(device=torch.device("cpu"), pin_memory=False, block_size=4, table_width=4, scratch_slot=9).build(seqs, 4)
    for f in dataclasses.fields(want):
        assert torch.equal(getattr(got, f.name), getattr(want, f.name)), f.name
    assert got.block_tables[2].tolist() == [2, 19, 20, 0]
