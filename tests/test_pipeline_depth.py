"""Steps queued ahead of the host (``pipeline_depth``): same tokens at every depth, and the scheduler's rules for
tokens that are still being sampled (cut after a stop token, late prefix-cache publication, late readmission)."""
import pytest
import torch

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.engine.block_manager import BlockManager, chain_hash
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from test_parity import mixed_prompts

EOS = 2


def _scheduler(num_blocks=16, block_size=16) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=4, max_num_batched_tokens=256,
                     max_model_len=256, eos_token_ids=(EOS,), mixed_prefill=False)


def _launch(scheduler: Scheduler):
    batch = scheduler.schedule()
    scheduler.advance(batch)
    return batch


def _generate_counting_queue(llm, prompts, params) -> tuple[list[list[int]], int]:
    """Token ids, and the most steps queued on the device after any engine step."""
    engine = llm.engine
    seqs = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    queued = 0
    while engine.has_work():
        engine.step()
        queued = max(queued, len(engine.pipeline))
    return [s.completion_token_ids for s in seqs], queued


@pytest.mark.slow
def test_every_depth_gives_the_same_tokens(tmp_path):
    """Stop tokens at different steps, seeded sampling and more prompts than rows, at depths 1-3, in a tiny KV
    cache (preemption) and again in a roomy one twice (prefix-cache hits): the same tokens everywhere, and
    transformers' where greedy."""
    path = build_checkpoint(tmp_path, "qwen3")
    prompts = mixed_prompts(9, seed=7, max_len=30) + [[4] * 20 + [9, 9], [4] * 20 + [17]]
    full = hf_greedy(path, prompts, 16)
    params = [SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[ids[i % 5 + 1]])
              for i, ids in enumerate(full[:6])]
    params += [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)] * 3
    params += [SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True, seed=5 + i) for i in range(2)]
    outputs = []
    for depth in (1, 2, 3):
        tight = LLM(path, enforce_eager=True, max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=4,
                    max_model_len=64, pipeline_depth=depth)
        out, most_queued = _generate_counting_queue(tight, prompts, params)
        assert most_queued == depth
        assert tight.engine.scheduler.num_preemptions > 0
        assert sorted(tight.engine.scheduler.free_slots) == list(range(4))  # every token slot came back
        roomy = LLM(path, enforce_eager=True, max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=64,
                    max_model_len=64, pipeline_depth=depth)
        first, _ = _generate_counting_queue(roomy, prompts, params)
        again, _ = _generate_counting_queue(roomy, prompts, params)
        assert roomy.engine.block_manager.cache_hit_tokens > 0
        outputs += [out, first, again]
    assert all(out == outputs[0] for out in outputs)
    for ids, p, got in zip(full, params, outputs[0]):
        if p.temperature == 0:
            stop = p.stop_token_ids[0] if p.stop_token_ids else None
            assert got == (ids[:ids.index(stop) + 1] if stop in ids else ids)
    assert any(len(got) < 16 for got in outputs[0][:6])  # some stop tokens did stop a sequence early


def test_a_stop_token_cuts_tokens_sampled_after_it_and_the_sequence_is_reported_once():
    """Depth 2: step n samples EOS while steps n+1 and n+2 are already advanced, and n+2 finished the sequence
    on max_tokens.  The output ends at EOS; the sequence is reported once, when step n+2 resolves."""
    scheduler = _scheduler()
    seq = Sequence(0, [5] * 10, SamplingParams(max_tokens=3), seed=0)
    scheduler.add(seq)
    prefill, first, second = _launch(scheduler), _launch(scheduler), _launch(scheduler)
    assert seq.status is SequenceStatus.FINISHED and second.finished == [seq]  # on length, tokens pending
    assert seq.completion_token_ids == [PENDING_TOKEN] * 3
    assert scheduler.resolve(prefill, [7]) == []
    assert scheduler.resolve(first, [EOS]) == []  # already finished on length: not reported twice
    assert seq.completion_token_ids == [7, EOS]
    assert scheduler.resolve(second, [8]) == [seq]
    assert seq.completion_token_ids == [7, EOS]


def test_a_stop_token_finishes_a_running_sequence_whose_next_token_is_pending():
    scheduler = _scheduler()
    seq = Sequence(0, [5] * 10, SamplingParams(max_tokens=8), seed=0)
    scheduler.add(seq)
    prefill, first = _launch(scheduler), _launch(scheduler)
    assert scheduler.resolve(prefill, [EOS]) == [seq]
    assert seq.status is SequenceStatus.FINISHED and seq.completion_token_ids == [EOS]
    assert scheduler.resolve(first, [9]) == [] and seq.completion_token_ids == [EOS]
    assert not scheduler.has_work() and scheduler.block_manager.num_free_blocks == 16


def test_a_full_block_is_published_only_once_its_tokens_are_resolved():
    scheduler = _scheduler()
    bm = scheduler.block_manager
    seq = Sequence(0, list(range(3, 17)), SamplingParams(max_tokens=8, ignore_eos=True), seed=0)  # 14 tokens
    scheduler.add(seq)
    prefill, first = _launch(scheduler), _launch(scheduler)  # first computes position 14
    assert scheduler.resolve(prefill, [40]) == []
    second = _launch(scheduler)  # computes position 15, the block's last, whose token (step first's) is pending
    assert seq.num_computed_tokens == 16 and seq.token_ids[15] == PENDING_TOKEN
    assert bm.seq_hashes[0] == [] and not bm.hash_to_block  # not published with a pending token in it
    scheduler.resolve(first, [41])
    block_tokens = tuple(range(3, 17)) + (40, 41)
    assert bm.seq_hashes[0] == [chain_hash(0, block_tokens)]
    assert bm.block_tokens[seq.block_table[0]] == block_tokens
    scheduler.resolve(second, [42])


def test_a_preempted_sequence_waits_for_its_pending_tokens_before_readmission():
    scheduler = _scheduler()
    seq = Sequence(0, [5] * 10, SamplingParams(max_tokens=8, ignore_eos=True), seed=0)
    scheduler.add(seq)
    prefill, first = _launch(scheduler), _launch(scheduler)
    scheduler._preempt(seq)  # as the decode scheduler does when the cache is full
    assert seq.token_ids[-2:] == [PENDING_TOKEN] * 2
    scheduler.resolve(prefill, [6])
    assert not scheduler.schedule().seqs  # one token still pending: its prefill could not hold it
    scheduler.resolve(first, [7])
    again = scheduler.schedule()
    assert again.is_prefill and again.seqs == [seq] and seq.token_ids[-2:] == [6, 7]


def test_pipeline_depth_must_be_a_positive_int(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3")
    with pytest.raises(ValueError, match="pipeline_depth"):
        LLM(path, enforce_eager=True, num_kvcache_blocks=16, pipeline_depth=0)
    with pytest.raises(TypeError, match="pipeline_depth"):
        LLM(path, enforce_eager=True, num_kvcache_blocks=16, pipeline_depth=1.5)


def test_a_pipeline_slot_is_not_handed_out_before_its_step_is_collected():
    from nanovllm.engine.pipeline import StepPipeline
    pipe = StepPipeline(2, lambda: torch.zeros(4, dtype=torch.int64))
    for i in range(3):  # depth + 1 slots, all queued
        slot = pipe.next_slot()
        slot.host_tokens[:1] = i
        pipe.push(f"step{i}", slot, 1, None)
    with pytest.raises(RuntimeError, match="before its step was collected"):
        pipe.next_slot()
    assert pipe.should_collect(launched=True) and pipe.collect() == ("step0", [0], None, None)
    assert pipe.next_slot().index == 0 and len(pipe) == 2


def test_an_adaptive_pipeline_keeps_the_fewest_steps_that_cover_the_host():
    """``paced``: one 22 ms device step covers 2 ms of host work plus LEAD_SECONDS; 6 ms ones need two; 3 ms ones
    three, the cap.  Intervals before the host first waits (the queue filling) are not the device's pace."""
    from nanovllm.engine.pipeline import LEAD_SECONDS, StepPipeline

    def settle(device, host, steps=40):
        pipe = StepPipeline(3, lambda: torch.zeros(4, dtype=torch.int64), adaptive=True)
        pipe.paced(0.0, steady=False, host_seconds=host)
        pipe.paced(0.0005, steady=False, host_seconds=host)  # not steady: no sample
        assert pipe.device_seconds is None and pipe.depth == 3
        for i in range(steps):
            pipe.paced(0.0005 + (i + 1) * device, steady=True, host_seconds=host)
        return pipe

    assert LEAD_SECONDS == 0.008
    assert settle(0.022, 0.002).depth == 1
    assert settle(0.006, 0.002).depth == 2
    assert settle(0.003, 0.002).depth == 3
    fixed = StepPipeline(3, lambda: torch.zeros(4, dtype=torch.int64))
    fixed.paced(0.0, True, 0.002)
    fixed.paced(0.022, True, 0.002)
    assert fixed.depth == 3 and fixed.device_seconds is None  # not adaptive: the depth asked for


def test_a_fallen_depth_collects_the_steps_past_it():
    from nanovllm.engine.pipeline import StepPipeline
    pipe = StepPipeline(3, lambda: torch.zeros(4, dtype=torch.int64), adaptive=True)
    for i in range(4):
        pipe.push(f"step{i}", pipe.next_slot(), 1, None)
    pipe.depth = 1
    collected = 0
    while pipe.should_collect(launched=True):
        pipe.collect()
        collected += 1
    assert collected == 3 and len(pipe) == 1


def test_a_cpu_engine_keeps_the_depth_asked_for(tmp_path):
    """The host runs a CPU step as it is queued: nothing to adapt to, so tests see the depth they ask for."""
    path = build_checkpoint(tmp_path, "qwen3")
    llm = LLM(path, enforce_eager=True, num_kvcache_blocks=16, pipeline_depth=2)
    assert not llm.engine.pipeline.adaptive and llm.engine.pipeline.depth == 2
