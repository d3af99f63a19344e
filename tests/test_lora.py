"""Multi-LoRA end to end on the CPU, PEFT as the oracle: greedy float32 tokens equal transformers + PEFT's for
random adapters (rank 8 on all seven projections, rank 16 on q v down, rank 8 rsLoRA on the MLP only).

Checked: a batch mixing three adapters and the base (Qwen3, Llama and Gemma 3 with its sliding window, eager and
graph mode); one adapter per call; removing an adapter and loading another between calls (an unknown id is a no-op,
a pinned one refuses); a bad adapter (rank above max_lora_rank, DoRA) raises naming it and queues nothing; three
adapters through one device slot, and the bound on how many requests may pass one waiting for a slot; prefix-cache
blocks keyed by adapter; and the refusals (a MoE family, lora_request without enable_lora, a list of the wrong length).
``test_lora_variants.py``: tensor parallel, FP8 and int4 weights, n-gram speculation.
"""
import os

import pytest

from conftest import build_checkpoint
from lora_helpers import ENGINE, PROMPTS, build_family, expected, generate, make_adapter
from nanovllm import LLM, LoRARequest, SamplingParams
from nanovllm.engine.sequence import SequenceStatus

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", params=["qwen3", pytest.param("llama", marks=pytest.mark.slow),
                                        pytest.param("gemma3", marks=pytest.mark.slow)])
def family(request, tmp_path_factory):
    base, paths = build_family(str(tmp_path_factory.mktemp(request.param)), request.param)
    return base, {name: LoRARequest(name, i + 1, p) for i, (name, p) in enumerate(sorted(paths.items()))}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    base, paths = build_family(str(tmp_path_factory.mktemp("qwen3")), "qwen3")
    return base, {name: LoRARequest(name, i + 1, p) for i, (name, p) in enumerate(sorted(paths.items()))}


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_a_batch_mixing_three_adapters_and_the_base(family, eager):
    base, a = family
    requests = [a["a1"], None, a["a2"], a["a3"]]
    llm = LLM(base, **dict(ENGINE, enforce_eager=eager, graph_batch_sizes=[2, 4]))
    assert generate(llm, PROMPTS, requests) == expected(base, requests, PROMPTS)
    # the base model alone, then the same batch again (the adapters now sit in their slots)
    assert generate(llm, PROMPTS, None) == expected(base, [None] * 4, PROMPTS)
    requests = requests[::-1]
    assert generate(llm, PROMPTS, requests) == expected(base, requests, PROMPTS)


def test_one_adapter_per_call(qwen3):
    base, a = qwen3
    llm = LLM(base, **ENGINE)
    for r in a.values():
        assert generate(llm, PROMPTS, r) == expected(base, [r] * 4, PROMPTS)


def test_remove_then_load_another_and_bad_adapters(qwen3, tmp_path):
    base, a = qwen3
    llm = LLM(base, **dict(ENGINE, max_loras=2))
    assert generate(llm, PROMPTS[:2], [a["a1"], a["a2"]]) == expected(base, [a["a1"], a["a2"]], PROMPTS[:2])
    llm.engine.remove_lora(a["a1"].lora_int_id)
    llm.engine.remove_lora(999)  # unknown: a no-op (SlotManager.remove)
    assert a["a1"].lora_int_id not in llm.engine.runner.loras.slots.loaded_ids()
    # a new adapter under a new id, and a different adapter under the freed id
    new = LoRARequest("new", 7, a["a3"].lora_path)
    reused = LoRARequest("reused", a["a1"].lora_int_id, a["a2"].lora_path)
    requests = [new, reused, a["a2"], None]
    assert generate(llm, PROMPTS, requests) == expected(base, requests, PROMPTS)
    # an id stays bound to its path until removed
    with pytest.raises(ValueError, match="needs another id"):
        generate(llm, PROMPTS[:1], LoRARequest("other", 7, a["a1"].lora_path))
    # a running sequence pins its adapter: removing it then refuses
    seq = llm.engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), None, a["a2"])
    llm.engine.step()
    assert seq.lora_slot
    with pytest.raises(ValueError, match="in use"):
        llm.engine.remove_lora(a["a2"].lora_int_id)
    slot = seq.lora_slot
    llm.engine.abort(seq)
    while llm.engine.has_work():
        llm.engine.step()
    assert llm.engine.runner.loras.slots.pins(slot) == 0  # abort released the pin
    # bad adapters: ValueError naming them, nothing queued, the next call still works
    big = make_adapter(base, str(tmp_path / "rank32"), 32, ["q_proj"], 4)
    dora = make_adapter(base, str(tmp_path / "dora"), 8, ["q_proj", "v_proj"], 5, use_dora=True)
    for path, why in ((big, "rank 32 is above max_lora_rank=16"), (dora, "DoRA")):
        with pytest.raises(ValueError, match=why) as info:
            generate(llm, PROMPTS[:2], [a["a2"], LoRARequest("bad", 9, path)])
        assert os.path.basename(path) in str(info.value)
        assert not llm.engine.scheduler.waiting and not llm.engine.scheduler.running
    assert generate(llm, PROMPTS[:2], [a["a2"], None]) == expected(base, [a["a2"], None], PROMPTS[:2])


def test_more_adapters_than_device_slots(qwen3):
    base, a = qwen3
    llm = LLM(base, **dict(ENGINE, max_loras=1, max_cpu_loras=2))
    requests = [a["a1"], a["a2"], None, a["a3"], a["a1"]]
    prompts = PROMPTS + [[42, 43]]
    assert generate(llm, prompts, requests) == expected(base, requests, prompts)
    # the one slot holds a1: a2 and a3 wait, and the base request and a1's second go past them, keeping their places
    engine = llm.engine
    seqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=2), None, r)
            for p, r in zip(prompts, requests)]
    engine.step()
    assert [s.seq_id for s in engine.scheduler.running] == [seqs[i].seq_id for i in (0, 2, 4)]
    assert [s.seq_id for s in engine.scheduler.waiting] == [seqs[i].seq_id for i in (1, 3)]
    while engine.has_work():
        engine.step()


def test_at_most_a_batch_passes_a_request_waiting_for_a_slot(qwen3):
    """One slot, held by a1 under a steady stream of a1 requests: a2's request lets ``max_num_seqs`` of them go
    first, then the queue waits until a1's running requests finish and a2 gets the slot."""
    base, a = qwen3
    llm = LLM(base, **dict(ENGINE, max_loras=1, max_cpu_loras=2))
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)  # a1's slot stays pinned while it runs
    seqs = [engine.add_request([7, 8, 9], long, None, a["a1"]), engine.add_request([4, 5], params, None, a["a2"])]
    seqs += [engine.add_request([10 + i, 11], params, None, a["a1"]) for i in range(12)]
    admitted = []
    while engine.has_work():
        engine.step()
        admitted += [s.seq_id for s in seqs if s.status is not SequenceStatus.WAITING and s.seq_id not in admitted]
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    assert admitted.index(seqs[1].seq_id) == 1 + ENGINE["max_num_seqs"]  # the first, then a batch of the stream


def test_prefix_blocks_are_keyed_by_adapter(qwen3):
    base, a = qwen3
    prompt = list(range(20, 70))  # three full 16-token blocks and two tokens
    llm = LLM(base, **ENGINE)
    requests = [a["a1"], a["a2"], None]
    want = expected(base, requests, [prompt] * 3)
    assert len({tuple(w) for w in want}) == 3
    blocks = llm.engine.scheduler.block_manager
    for r, w in zip(requests, want):  # in sequence: no call finds the blocks of another adapter's
        assert generate(llm, [prompt], [r]) == [w]
    assert blocks.cache_hit_tokens == 0
    assert generate(llm, [prompt] * 3, requests) == want  # in one batch: each finds its own three blocks
    assert blocks.cache_hit_tokens == 3 * 48
    assert generate(llm, [prompt] * 3, requests[::-1]) == want[::-1]


def test_refusals(qwen3, tmp_path):
    base, a = qwen3
    moe = build_checkpoint(tmp_path / "moe", "qwen3_moe")
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM"):
        LLM(moe, **ENGINE)
    plain = LLM(base, **dict(ENGINE, enable_lora=False))
    with pytest.raises(ValueError, match="enable_lora"):
        generate(plain, PROMPTS[:1], a["a1"])
    llm = LLM(base, **ENGINE)
    with pytest.raises(ValueError, match="entries for 2 prompts"):
        generate(llm, PROMPTS[:2], [a["a1"]])
    assert not llm.engine.scheduler.waiting
