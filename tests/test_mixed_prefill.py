"""``mixed_prefill``: decoding sequences ride in prefill steps, one token each (``engine/scheduler.py``), reading a
token still being sampled from its token slot (``engine/prefill_inputs.py``).

* the scheduler adds every decoding sequence the token budget and free blocks allow, but not one with a grammar,
  nor any to a step that runs eagerly (prompt logprobs);
* requests that arrive while others decode give the same tokens with and without it (greedy ones transformers'
  tokens too; seeded sampling, a repetition penalty and logprobs alike), with steps queued ahead (``pipeline_depth``
  3, so the riding rows' newest tokens are still pending), in eager and compiled mode, and at two ranks.
"""
import pytest

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence

ENGINE = dict(max_num_seqs=6, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=128, device="cpu")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _scheduler(budget=256, blocks=32) -> Scheduler:
    return Scheduler(BlockManager(blocks, 16), max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=256,
                     eos_token_ids=(2,), mixed_prefill=True)


def _decoding(scheduler: Scheduler, *prompts) -> list[Sequence]:
    """Sequences prefilled by one step, each with its first token still pending."""
    seqs = [Sequence(i, list(p), GREEDY, seed=0) for i, p in enumerate(prompts)]
    for s in seqs:
        scheduler.add(s)
    batch = scheduler.schedule()
    assert batch.is_prefill and batch.seqs == seqs
    scheduler.advance(batch)
    assert all(s.token_ids[-1] == PENDING_TOKEN for s in seqs)
    return seqs


def test_a_prefill_step_carries_each_decoding_sequence_one_token():
    scheduler = _scheduler()
    a, b = _decoding(scheduler, [5] * 20, [6] * 7)
    c = Sequence(9, [7] * 30, GREEDY, seed=0)
    scheduler.add(c)
    batch = scheduler.schedule()
    assert batch.is_prefill and batch.seqs == [c, a, b] and batch.num_new_tokens == [30, 1, 1]
    assert batch.sampling() == [True, True, True]
    scheduler.advance(batch)
    assert [len(s.token_ids) - s.num_prompt_tokens for s in (a, b, c)] == [2, 2, 1]


def test_the_budget_free_blocks_grammars_and_eager_steps_limit_the_riders():
    scheduler = _scheduler(budget=31)
    a, b = _decoding(scheduler, [5] * 20, [6] * 7)
    c = Sequence(9, [7] * 30, GREEDY, seed=0)
    scheduler.add(c)
    assert scheduler.schedule().seqs == [c, a]  # 30 prompt tokens and one rider fill the 31

    scheduler = _scheduler()
    a, b = _decoding(scheduler, [5] * 20, [6] * 7)
    a.grammar = object()  # constrained: its mask waits for its pending token
    scheduler.add(c := Sequence(9, [7] * 30, GREEDY, seed=0))
    assert scheduler.schedule().seqs == [c, b]

    scheduler = _scheduler()
    _decoding(scheduler, [5] * 20, [6] * 7)
    d = Sequence(9, [7] * 30, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1), seed=0)
    scheduler.add(d)
    assert scheduler.schedule().seqs == [d]  # prompt logprobs run eagerly, whole: no riders

    scheduler = _scheduler(blocks=4)  # 16 tokens a block: a's 17th token needs its second block
    a, = _decoding(scheduler, [5] * 16)
    scheduler.add(c := Sequence(9, [7] * 40, GREEDY, seed=0))  # takes the 3 blocks left
    batch = scheduler.schedule()
    assert batch.seqs == [c] and len(a.block_table) == 1  # no free block for a: it waits for a decode step


def _staggered(llm, prompts, params, first: int) -> tuple[list[list[int]], list, int]:
    """Tokens and logprobs of ``prompts`` when the first ``first`` arrive at once and the rest after three steps
    (while those decode); and how many prefill steps carried a decoding sequence."""
    engine, riders = llm.engine, [0]
    add = engine.scheduler._add_decode_rows

    def counting(seqs, counts, budget):
        before = len(seqs)
        add(seqs, counts, budget)
        riders[0] += len(seqs) > before
    engine.scheduler._add_decode_rows = counting
    seqs = [engine.add_request(p, q) for p, q in zip(prompts[:first], params[:first])]
    for _ in range(3):
        engine.step()
    seqs += [engine.add_request(p, q) for p, q in zip(prompts[first:], params[first:])]
    while engine.has_work():
        engine.step()
    return [s.completion_token_ids for s in seqs], [s.logprobs for s in seqs], riders[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


PROMPTS = [[3 + i % 50 for i in range(n)] for n in (9, 23, 40, 17, 31, 5)]
PARAMS = [GREEDY, SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True),  # the first four ride
          SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3),
          SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3), GREEDY,
          SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)]


def check_same_tokens(model, params=PARAMS, **options):
    """``_staggered``'s tokens with and without ``mixed_prefill``, same, and transformers' for the greedy prompts;
    ``options`` override ``ENGINE`` (tests/gpu/test_mixed_prefill.py passes ``device="auto"``)."""
    got = {}
    for mixed in (False, True):
        with LLM(model, mixed_prefill=mixed, **dict(ENGINE, **options)) as llm:
            got[mixed] = _staggered(llm, PROMPTS, params, first=4)
    (tokens, logprobs, riders), (mixed_tokens, mixed_logprobs, mixed_riders) = got[False], got[True]
    assert riders == 0 and mixed_riders > 0
    assert mixed_tokens == tokens
    for plain, mixed in zip(logprobs, mixed_logprobs):
        for a, b in zip(plain or [], mixed or []):
            assert a[1] == b[1] and max(abs(x - y) for x, y in zip(a[2], b[2])) < 1e-4
    greedy = [i for i, p in enumerate(params) if p.temperature == 0 and p.repetition_penalty == 1]
    want = hf_greedy(model, [PROMPTS[i] for i in greedy], 12)
    assert [tokens[i] for i in greedy] == want


def test_staggered_requests_give_the_same_tokens_mixed_or_not_eager(model):
    check_same_tokens(model, enforce_eager=True)


@pytest.mark.slow
def test_staggered_requests_give_the_same_tokens_mixed_or_not_compiled(model):
    plain = [p for p in PARAMS if p.logprobs is None and p.repetition_penalty == 1]  # the plain step (no variants)
    check_same_tokens(model, plain + plain[:6 - len(plain)], enforce_eager=False)


@pytest.mark.slow
def test_staggered_requests_give_the_same_tokens_mixed_or_not_at_two_ranks(model):
    check_same_tokens(model, enforce_eager=True, tensor_parallel_size=2)
