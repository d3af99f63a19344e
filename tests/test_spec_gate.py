"""``SpecGate`` (``engine/spec_gate.py``) on a fake clock: plain steps are measured first; a verify step whose
kept tokens do not pay for its cycle sends the next decode steps plain, the run doubling up to ``MAX_BACKOFF``;
one that pays resets it; the ranks' verdicts are agreed; a decode step with nothing to propose backs off without
doubling; the engine asks the scheduler for no proposals while the gate says wait."""
import pytest

from nanovllm.engine import spec_gate
from nanovllm.engine.spec_gate import BACKOFF, MAX_BACKOFF, SpecGate


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(spec_gate.time, "perf_counter", lambda: now[0])
    return now


def run(gate, clock, plain_seconds=1.0, verify_seconds=2.0, kept=0, sequences=4, cycles=1):
    """Decode steps as the engine runs them: plain ones while the gate says wait, then one verify step."""
    for _ in range(cycles):
        while not gate.may_propose:
            gate.launched(True, False, steady=True)
            clock[0] += plain_seconds
        gate.launched(True, True, steady=True)
        clock[0] += verify_seconds
        gate.resolved(sequences, kept)


def test_a_verify_step_that_does_not_pay_backs_off_doubling(clock):
    gate = SpecGate()
    run(gate, clock)  # plain not measured yet: measure it
    assert gate.wait == BACKOFF and gate.plain is None
    run(gate, clock)  # gain 1, cycles 2 s against 1 s
    assert gate.plain == 1.0 and gate.verify == 2.0 and gate.wait == BACKOFF and gate.backoff == 2 * BACKOFF
    run(gate, clock, cycles=6)
    assert gate.backoff == MAX_BACKOFF and gate.wait == MAX_BACKOFF
    run(gate, clock, kept=12, cycles=3)  # 4 tokens a sequence: pays, the average catches up
    assert gate.may_propose and gate.backoff == BACKOFF


def test_ranks_agree_and_a_plain_engine_never_backs_off_after_verifying(clock):
    gate = SpecGate(agree=lambda pays: 0)  # another rank found it does not pay
    run(gate, clock, kept=40, cycles=2)
    assert gate.wait == BACKOFF and gate.backoff == 2 * BACKOFF
    gate = SpecGate(adaptive=False)
    run(gate, clock, cycles=3)
    assert gate.may_propose and gate.gain == 1.0


def test_nothing_to_propose_backs_off_and_a_prefill_breaks_the_timing(clock):
    gate = SpecGate()
    gate.launched(True, False, steady=False)  # tried, nothing proposed
    assert gate.wait == BACKOFF and gate.backoff == BACKOFF and gate.backoffs["nothing proposed"] == 1
    gate.launched(False, False, steady=True)
    clock[0] += 100.0
    gate.launched(True, False, steady=True)
    assert gate.plain is None and gate.verify is None


class Always:
    num_speculative_tokens = 2

    def propose_all(self, seqs, limits):
        return [[1] * limit for limit in limits]


def test_the_scheduler_proposes_nothing_while_the_gate_says_wait(tmp_path):
    """All tokens resolved (a fresh batch after its prefill), yet a waiting gate keeps the decode step plain."""
    from conftest import build_checkpoint
    from nanovllm import LLM, SamplingParams
    llm = LLM(build_checkpoint(tmp_path, "qwen3"), enforce_eager=True, num_kvcache_blocks=16, max_model_len=128,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    engine = llm.engine
    engine.add_request([5, 6, 7, 5, 6, 7, 5, 6], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()  # the prefill
    while len(engine.pipeline):  # resolve it: nothing pending
        engine._collect([])
    engine.scheduler.speculative = Always()
    engine.spec_gate.wait = 3
    assert engine.scheduler.schedule(propose=engine.spec_gate.may_propose).proposals is None
    assert engine.scheduler.schedule(propose=True).proposals == [[1, 1]]
    llm.close()
